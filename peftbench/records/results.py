"""results.json (one per run, written atomically) and the results index (one JSON line per run)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = "results.json"

# top-level config keys that do not change a run's outcome: left out of its key
KEY_EXCLUDES = (
    "run_dir", "resume", "keep_checkpoint", "checkpoint_every", "skip_done", "group", "suite", "logger", "paths",
    "_choices_", "hydra",
)
#: keys of the data block that change how batches are served, never what they hold (bit-identical batches)
DATA_KEY_EXCLUDES = ("num_workers", "resident", "resident_max_share")


def run_key(config: dict[str, Any]) -> str:
    """A short hash naming what a run computes: its resolved config minus where it writes and how it logs.

    Two runs with the same key are the same experiment (same data, model, method, recipe, seed, protocol), however
    their overrides were spelled; sweeps and tables use it to skip runs that are already ``ok`` in the index.
    """
    kept = {k: v for k, v in config.items() if k not in KEY_EXCLUDES}
    if isinstance(kept.get("data"), dict):  # loader parallelism never changes the numbers
        kept["data"] = {k: v for k, v in kept["data"].items() if k not in DATA_KEY_EXCLUDES}
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: readers never see half a file.

    The file gets the permissions of any other output (0666 minus the umask), not mkstemp's private 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_index(index_file: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the results index, under an exclusive lock (parallel sweeps share it).

    A line always starts on a line boundary (a fragment left by an earlier failed write is closed first), and a
    write that fails part-way (disk full, quota) is cut back, so the index never glues two records together.
    """
    index_file.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(index_file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            line = b"\n" + line  # close a fragment left by an earlier short write
        try:
            written = 0
            while written < len(line):  # os.write may write part of the line
                written += os.write(fd, line[written:])
        except BaseException:
            os.ftruncate(fd, end)  # cut back a partial write: the index ends where it did
            raise
    finally:
        os.close(fd)  # releases the lock


_warned: set[str] = set()


def read_index(index_file: Path) -> list[dict[str, Any]]:
    """All records of the index; damaged lines are skipped, reported once per file on stderr."""
    if not Path(index_file).exists():
        return []
    records, bad = [], []
    for lineno, line in enumerate(Path(index_file).read_bytes().decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(lineno)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(lineno)
    if bad and str(index_file) not in _warned:
        _warned.add(str(index_file))
        print(f"peftbench: warning: {index_file}: skipped {len(bad)} damaged line(s) (line {bad[0]}"
              f"{' ...' if len(bad) > 1 else ''}); the other records are used", file=sys.stderr)
    return records


def latest_by_key(index_file: Path) -> dict[str, dict[str, Any]]:
    """Run key -> its newest record in the index (an ``ok`` record is never replaced by a later failure of the same
    key: a finished result is not lost because a re-run crashed)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in read_index(index_file):
        key = record.get("key")
        if key is None:
            continue
        if latest.get(key, {}).get("status") == "ok" and record.get("status") != "ok":
            continue
        latest[key] = record
    return latest


def read_results(run_dir: Path) -> dict[str, Any]:
    """The results.json of ``run_dir``."""
    return json.loads((Path(run_dir) / RESULTS).read_text())
