"""results.json (one per run, written atomically) and the results index (one JSON line per run)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

RESULTS = "results.json"

# top-level config keys that do not change a run's outcome: left out of its key
KEY_EXCLUDES = ("run_dir", "resume", "skip_done", "group", "logger", "paths", "_choices_", "hydra")


def run_key(config: dict[str, Any]) -> str:
    """A short hash naming what a run computes: its resolved config minus where it writes and how it logs.

    Two runs with the same key are the same experiment (same data, model, method, recipe, seed, protocol), however
    their overrides were spelled; sweeps and tables use it to skip runs that are already ``ok`` in the index.
    """
    kept = {k: v for k, v in config.items() if k not in KEY_EXCLUDES}
    if isinstance(kept.get("data"), dict):  # loader parallelism never changes the numbers
        kept["data"] = {k: v for k, v in kept["data"].items() if k != "num_workers"}
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_index(index_file: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the results index, under an exclusive lock (parallel sweeps share it)."""
    index_file.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with open(index_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_index(index_file: Path) -> list[dict[str, Any]]:
    """All records of the index (a damaged line is skipped, never fatal)."""
    if not Path(index_file).exists():
        return []
    records = []
    for line in Path(index_file).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
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
