"""What every figure shares: clear one-line errors, loading score files, run dirs and the results index, saving.

Errors: :func:`fail` raises ``SystemExit("peftbench.plots: <file>: <what is wrong and what to do>")``, so the
command prints one line to stderr and exits with status 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from peftbench.records.results import read_index  # noqa: E402

PREFIX = "peftbench.plots"
#: matrix types of a ViT block in figure order; ``o`` is the attention output projection (``proj``)
TYPES = ("q", "k", "v", "o", "fc1", "fc2")


def fail(path: Path | str, message: str) -> NoReturn:
    """Stop with ``peftbench.plots: <path>: <message>`` (exit status 1)."""
    raise SystemExit(f"{PREFIX}: {path}: {message}")


def save(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` (creating its folder), close it and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def out_dir(out: Path | None, source: Path) -> Path:
    """The output folder: ``out``, else ``source`` itself when it is a folder, else its parent."""
    if out is not None:
        return Path(out)
    source = Path(source)
    return source if source.is_dir() else source.parent


def slug(text: str) -> str:
    """A file-name-safe version of ``text`` (``embedded/digits`` -> ``embedded-digits``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


# --- overrides --------------------------------------------------------------------------------------------
def override(overrides: Iterable[str] | None, key: str) -> str | None:
    """The value of ``key=`` (also ``+key=`` / ``++key=``) in a list of Hydra overrides; the last one wins."""
    value = None
    for item in overrides or []:
        name, sep, rest = str(item).lstrip("+").partition("=")
        if sep and name == key:
            value = rest
    return value


def parse_list(value: str | None) -> list[str] | None:
    """``[q, v]`` or ``q,v`` -> ``["q", "v"]``; None stays None."""
    if value is None:
        return None
    return [v.strip().strip("'\"") for v in value.strip().strip("[]").split(",") if v.strip()]


def parse_float(value: str | None) -> float | None:
    """A float from an override value; None (or ``null``) stays None."""
    if value is None or value.strip().lower() in ("null", "none", "~", ""):
        return None
    try:
        return float(value)
    except ValueError:
        return None


# --- score files and run dirs -----------------------------------------------------------------------------
def load_score_file(path: Path) -> dict[str, Any]:
    """A ``python -m peftbench.score`` file: {"scores", "state", "summary", "overrides"} (tensors on the CPU)."""
    import torch

    path = Path(path)
    if not path.is_file():
        fail(path, "no such file; pass a file written by `python -m peftbench.score ... out=<file>`")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        fail(path, f"cannot read it with torch.load ({type(err).__name__}); is it a peftbench.score file?")
    if not isinstance(record, dict) or not isinstance(record.get("scores"), dict):
        fail(path, "has no 'scores' dict; write it with `python -m peftbench.score scorer=... out=<file>`")
    record.setdefault("state", None)
    record.setdefault("overrides", [])
    return record


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(results.json record, method_state.pt or None) of a run dir."""
    import torch

    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        fail(path, "does not exist; pass a run dir written by `python -m peftbench.train`")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        fail(path, f"is not valid JSON ({err.msg}, line {err.lineno})")
    state = None
    state_file = run_dir / "method_state.pt"
    if state_file.is_file():
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - the results record may still be enough
            state = None
    return record, state


def label_of(overrides: Iterable[str] | None, fallback: str) -> str:
    """A task label: the ``dataset=`` override, else ``fallback``."""
    return override(overrides, "dataset") or fallback


# --- matrix keys ------------------------------------------------------------------------------------------
def split_matrix_key(key: str) -> tuple[str, str] | None:
    """``blocks.3.attn.qkv.weight:q`` -> (``blocks.3``, ``q``); ``...attn.proj.weight`` -> (..., ``o``);
    ``...mlp.fc1.weight`` -> (..., ``fc1``); anything else (vectors, head scores) -> None."""
    from peftbench.backbones.anatomy import matrix_target  # torch only for the figures that need it

    name, _, part = key.partition(":")
    found = matrix_target(name)
    if found is None:
        return None
    block, target = found
    kind = {"qkv": part, "proj": "o"}.get(target, target)
    return (block, kind) if kind in TYPES else None


# --- the results index ------------------------------------------------------------------------------------
def index_records(index: Path, group: str | None = None) -> list[dict[str, Any]]:
    """``ok`` records of a results index, the latest per run (its ``key``, else its ``run_dir``), in file order.

    ``group``: keep only records whose ``group`` field (else their ``group=`` override) equals it; None keeps all.
    """
    index = Path(index)
    if not index.is_file():
        fail(index, "no such results index; runs append to <paths.output_dir>/index.jsonl")
    latest: dict[str, dict[str, Any]] = {}
    for n, record in enumerate(read_index(index)):
        if not isinstance(record, dict) or record.get("status") != "ok":
            continue
        if group is not None and record.get("group", override(record.get("overrides"), "group")) != group:
            continue
        ident = record.get("key") or record.get("run_dir") or f"line {n}"
        latest.pop(ident, None)  # re-insert: the latest record keeps its place at the end
        latest[ident] = record
    return list(latest.values())


def metric(record: dict[str, Any], name: str) -> float | None:
    """``record["metrics"][name]`` as a float (None when absent)."""
    value = (record.get("metrics") or {}).get(name)
    return None if value is None else float(value)
