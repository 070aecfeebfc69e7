"""Many runs, one GPU: the shared-device launcher runs a sweep's runs at once; `make table-<name> scale=paper` uses
it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import lightning as L

from peftbench.records.results import read_index
from peftbench.tables import cli as tables_cli
from tests.helpers import TINY
from tests.test_cli import cli
from tests.test_sweep import _compose_with_hydra

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_shared_launcher_composes():
    launcher = _compose_with_hydra(["hydra/launcher=gpu_shared"]).hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 4 and launcher.backend == "loky"
    opts = tables_cli.parse(["spt_1", "scale=paper", "launcher=gpu_shared", "hydra.launcher.n_jobs=3"])
    assert opts["launcher"] == "gpu_shared" and opts["hydra"] == ["hydra.launcher.n_jobs=3"]


def _make_n(*args: str) -> str:
    out = subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
    return next(line for line in out.stdout.splitlines() if "peftbench.tables" in line)


def test_make_table_at_paper_scale_runs_several_per_gpu():
    """scale=paper: launcher=gpu_shared with jobs (4) processes; smoke: one at a time; both can be overridden."""
    assert _make_n("table-spt-1", "scale=paper").split()[-3:] == [
        "scale=paper", "launcher=gpu_shared", "hydra.launcher.n_jobs=4"]
    assert "launcher" not in _make_n("table-spt-1")
    assert _make_n("table-spt-1", "scale=paper", "jobs=2").split()[-1] == "hydra.launcher.n_jobs=2"
    slurm = _make_n("table-spt-1", "scale=paper", "launcher=slurm")
    assert "launcher=slurm" in slurm and "n_jobs" not in slurm
    assert "launcher" not in _make_n("table-spt-1", "scale=paper", "launcher=")


class Rendezvous(L.Callback):
    """At fit start, marks this run and waits (up to ``wait_s``) until ``n`` runs have marked ``folder``: the runs
    must be in flight at the same time, or this one fails. Records its process id and time window."""

    def __init__(self, folder: str, n: int, wait_s: float = 120.0) -> None:
        self.folder, self.n, self.wait_s = Path(folder), n, wait_s

    def on_fit_start(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        (self.folder / f"{os.getpid()}.start").touch()
        while len(list(self.folder.glob("*.start"))) < self.n:
            if time.time() - self.start > self.wait_s:
                raise RuntimeError("the other run never started: the runs did not overlap")
            time.sleep(0.05)

    def on_fit_end(self, trainer, pl_module) -> None:
        (self.folder / f"{os.getpid()}.json").write_text(json.dumps({"start": self.start, "end": time.time()}))


def test_a_sweep_runs_two_at_once_on_one_device(tmp_path):
    """hydra/launcher=gpu_shared with n_jobs=2 (here on the CPU): both runs of the sweep are in flight at once in two
    processes, and both finish ok in the shared index."""
    meet = tmp_path / "meet"
    out = cli("peftbench.train", "--multirun", *TINY, "trainer.max_epochs=1", "seed=0,1",
              f"paths.output_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/multirun", "hydra/launcher=gpu_shared",
              "hydra.launcher.n_jobs=2",
              f"+callbacks.meet={{_target_: tests.test_many_runs.Rendezvous, folder: '{meet}', n: 2}}")
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_index(tmp_path / "index.jsonl")
    assert sorted(r["status"] for r in records) == ["ok", "ok"] and sorted(r["seed"] for r in records) == [0, 1]
    windows = [json.loads(p.read_text()) for p in meet.glob("*.json")]
    assert len(windows) == 2  # two processes
    assert windows[0]["start"] < windows[1]["end"] and windows[1]["start"] < windows[0]["end"]  # overlapping
