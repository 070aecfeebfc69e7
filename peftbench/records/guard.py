"""A run folder's safety: one process at a time, a finished result never overwritten, signals become records.

* :func:`claim` takes an exclusive lock on the run folder for the whole run (two processes never write into one
  folder, whatever the folders are called) and refuses to reuse a finished run's folder, or to resume a folder that
  holds another configuration.
* :func:`signals_raise` turns SIGTERM (SLURM time limit, ``timeout``, ``kill``) and SIGINT (Ctrl-C) into
  :class:`Interrupted`, so the run writes an ``interrupted`` record and exits with 128 + the signal's number.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftbench.errors import PeftbenchError
from peftbench.records.results import RESULTS

LOCK_FILE = ".peftbench.lock"
CHECKPOINT = Path("checkpoints") / "last.ckpt"


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived during a run (a BaseException: no ``except Exception`` may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + self.signum


def _raise(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise :class:`Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGTERM and SIGINT are held off while a record is written (a second Ctrl-C cannot cut it in half)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def read_previous(run_dir: Path) -> dict[str, Any] | None:
    """The results.json already in ``run_dir`` (None when there is none); a damaged one raises one line."""
    path = run_dir / RESULTS
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PeftbenchError(
            f"{path} is damaged ({type(err).__name__}); move it away or choose another run_dir"
        ) from None
    if not isinstance(record, dict):
        raise PeftbenchError(f"{path} is not a results record; move it away or choose another run_dir")
    return record


@contextmanager
def claim(run_dir: Path, key: str, resume: bool) -> Iterator[dict[str, Any] | None]:
    """Hold ``run_dir`` for one run of config ``key``; yield the record already there (or None).

    Refused with one line: a folder in use by another process; a finished (``ok``) run's folder, unless this is
    a resume of the same key (then the finished record is yielded and nothing may run); a resume whose key
    differs from the folder's run; a resume of a folder that holds no run.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PeftbenchError(
                f"run_dir {run_dir} is in use by another peftbench process; wait for it or choose another run_dir"
            ) from None
        previous = read_previous(run_dir)
        if previous is not None:
            what = f"{previous.get('method')} on {previous.get('dataset')}, key {previous.get('key')}"
            if previous.get("status") == "ok" and not (resume and previous.get("key") == key):
                raise PeftbenchError(
                    f"run_dir {run_dir} holds a finished run ({what}): a finished result is never overwritten; "
                    "choose another run_dir"
                )
            if resume and previous.get("key") != key:
                raise PeftbenchError(
                    f"resume=true: run_dir {run_dir} holds another run ({what}) than these overrides (key {key}); "
                    f"resume it with its own overrides: {' '.join(previous.get('overrides') or []) or '(none)'}"
                )
        elif resume and not (run_dir / CHECKPOINT).exists():
            raise PeftbenchError(
                f"resume=true but run_dir {run_dir} holds no run (no {RESULTS}, no {CHECKPOINT}); "
                "pass run_dir=<the interrupted run>"
            )
        yield previous
    finally:
        os.close(fd)  # releases the lock
