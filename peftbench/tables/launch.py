"""Launch a table's missing runs through the normal training entry point, as Hydra multiruns.

``python -m peftbench.train --multirun <common> dataset=<a>,<b> seed=<s> protocol=<p> [<key>=<v1>,<v2>] skip_done=true
group=<table>-<scale> [hydra/launcher=<launcher>]``: a failing run is recorded in the index (status ``failed``) and the
sweep goes on; a run already ``ok`` is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from peftbench.tables.plan import Run, format_value


def _ordered(values) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def sweeps(runs: list[Run], by_values: bool) -> list[tuple[list[str], list[Run]]]:
    """Group ``runs`` into multirun command lines (overrides after ``--multirun``) covering all of them.

    Phase 1 (``by_values=False``) sweeps tasks x seeds x the grid in one multirun per row (a done run in the product
    is skipped by ``skip_done``); phase 2 (``by_values=True``) launches one multirun per (chosen values, seed).
    """
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        key = (tuple(r.common), tuple(r.column[1:]), r.protocol)
        if by_values:
            key += (r.seed, tuple((k, format_value(v)) for k, v in r.values.items()))
        groups[key].append(r)
    out = []
    for (common, col_extra, protocol, *_), members in groups.items():
        datasets = _ordered(r.column[0].split("=", 1)[1] for r in members)
        seeds = _ordered(r.seed for r in members)
        args = [
            *common,
            f"dataset={','.join(datasets)}",
            *col_extra,
            f"seed={','.join(map(str, seeds))}",
            f"protocol={protocol}",
        ]
        for k in members[0].values:
            args.append(f"{k}={','.join(_ordered(format_value(r.values[k]) for r in members))}")
        out.append((args, members))
    return out


def launch(
    args: list[str], *, group: str, sweep_dir: Path, log_file: Path, launcher: str | None, hydra: list[str] = (),
    tags: list[str] = (),
) -> int:
    """Run one multirun; its output goes to ``log_file``. Returns the exit code."""
    cmd = [
        sys.executable,
        "-m",
        "peftbench.train",
        "--multirun",
        *args,
        "skip_done=true",
        f"group={group}",
        *([f"++logger.tags=[{','.join(tags)}]"] if tags else []),
        f"hydra.sweep.dir={sweep_dir}",
    ]
    if launcher:
        cmd.append(f"hydra/launcher={launcher}")
    cmd += list(hydra)
    env = {**os.environ}
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "row"


def run_all(
    runs: list[Run],
    *,
    by_values: bool,
    group: str,
    out_root: Path,
    table_dir: Path,
    launcher: str | None,
    label: str,
    hydra: list[str] = (),
    tags: list[str] = (),
) -> dict[str, str]:
    """Launch every sweep that covers ``runs``; return ``key -> error`` for runs of a sweep that exited non-zero."""
    errors: dict[str, str] = {}
    for n, (args, members) in enumerate(sweeps(runs, by_values)):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{os.getpid()}-{slug(members[0].row)}-{members[0].protocol}-{n}"
        log_file = table_dir / "logs" / f"{name}.log"
        start = time.perf_counter()
        print(f"peftbench.tables: {label}: {len(members)} run(s), protocol {members[0].protocol} ...", flush=True)
        rc = launch(
            args,
            group=group,
            sweep_dir=out_root / "multiruns" / group / name,
            log_file=log_file,
            launcher=launcher,
            hydra=hydra,
            tags=tags,
        )
        took = time.perf_counter() - start
        if rc != 0:
            tail = [line for line in log_file.read_text().splitlines() if line.strip()][-1:] or [""]
            print(
                f"peftbench.tables: {label}: sweep exited with code {rc} after {took:.0f}s: {tail[0][:200]}"
                f" (log: {log_file})",
                flush=True,
            )
            for r in members:
                errors[r.key] = f"sweep exited with code {rc}: {tail[0][:200]} (log: {log_file})"
        else:
            print(f"peftbench.tables: {label}: done in {took:.0f}s (log: {log_file})", flush=True)
    return errors
