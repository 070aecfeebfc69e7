"""Run folders: signals leave a record and a non-zero exit, folders are never shared or overwritten, the index
survives a short write, and results.json is as readable as any other output."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftbench.records.results import append_index, read_index
from tests.helpers import TINY, train_cli

ROOT = Path(__file__).resolve().parent.parent


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, f"paths.output_dir={tmp_path / 'out'}", f"run_dir={tmp_path / 'run'}", *extra]


def _results(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "results.json").read_text())


def _index(tmp_path: Path) -> list[dict]:
    return read_index(tmp_path / "out" / "index.jsonl")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_leaves_an_interrupted_record_and_the_run_resumes(tmp_path, signum, code):
    kill = f"+callbacks.kill={{_target_: tests.helpers.SignalAtEpoch, epoch: 0, signum: {int(signum)}}}"
    rc, _, err = train_cli(*_args(tmp_path, "trainer.max_epochs=2", kill))
    assert rc == code, err
    assert "interrupted" in err.strip().splitlines()[-1] and "resume=true" in err
    record = _results(tmp_path)
    assert record["status"] == "interrupted" and record["signal"] == signal.Signals(signum).name
    assert [r["status"] for r in _index(tmp_path)] == ["interrupted"]
    # the same overrides (the kill fires at the end of epoch 0, which a resume from epoch 1 never reaches)
    rc, out, err = train_cli(*_args(tmp_path, "trainer.max_epochs=2", kill, "resume=true"))
    assert rc == 0, err
    assert _results(tmp_path)["status"] == "ok" and _results(tmp_path)["epochs"] == 2
    assert [r["status"] for r in _index(tmp_path)] == ["interrupted", "ok"]


def test_sigterm_stops_a_whole_sweep_with_143_and_records_the_run(tmp_path):
    """In a real process: a SIGTERM during the first run of a 2-run sweep ends the sweep (exit 143)."""
    kill = "+callbacks.kill={_target_: tests.helpers.SignalAtEpoch, epoch: 0}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [*TINY, f"paths.output_dir={tmp_path / 'out'}", "trainer.max_epochs=1", kill, "seed=0,1"]
    out = subprocess.run([sys.executable, "-m", "peftbench.train", "--multirun", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 143, out.stderr[-2000:]
    records = _index(tmp_path)
    assert [r["status"] for r in records] == ["interrupted"]  # the second run never started
    assert json.loads((Path(records[0]["run_dir"]) / "results.json").read_text())["status"] == "interrupted"


def test_a_finished_run_folder_is_never_overwritten(tmp_path):
    assert train_cli(*_args(tmp_path, "trainer.max_epochs=1"))[0] == 0
    finished = (tmp_path / "run" / "results.json").read_text()
    for extra in (["method=full"], ["trainer.max_epochs=1", "method.rank=1000000"], ["method=full", "resume=true"]):
        rc, _, err = train_cli(*_args(tmp_path, "trainer.max_epochs=1", *extra))
        assert rc == 1 and "peftbench: error:" in err.strip().splitlines()[-1]
        assert (tmp_path / "run" / "results.json").read_text() == finished
    assert [r["status"] for r in _index(tmp_path)] == ["ok"]
    rc, out, _ = train_cli(*_args(tmp_path, "trainer.max_epochs=1", "resume=true"))  # its own resume: a no-op
    assert rc == 0 and "test_acc" in out and (tmp_path / "run" / "results.json").read_text() == finished


def test_a_resume_with_other_overrides_is_refused(tmp_path):
    kill = "+callbacks.kill={_target_: tests.helpers.SignalAtEpoch, epoch: 0}"
    assert train_cli(*_args(tmp_path, "trainer.max_epochs=2", kill))[0] == 143
    rc, _, err = train_cli(*_args(tmp_path, "trainer.max_epochs=2", "method.rank=4", "resume=true"))
    assert rc == 1 and "holds another run" in err
    assert _results(tmp_path)["status"] == "interrupted"


def test_a_folder_in_use_is_refused(tmp_path):
    from peftbench.errors import PeftbenchError
    from peftbench.records.guard import claim

    with claim(tmp_path / "run", "k", resume=False):
        with pytest.raises(PeftbenchError, match="in use by another peftbench process"):
            with claim(tmp_path / "run", "k", resume=False):
                pass


_FROZEN_NOW = textwrap.dedent(
    """
    import datetime, runpy, sys
    import hydra.core.utils as hydra_utils

    class Frozen(datetime.datetime):  # every sweep starts in the same second (the same microsecond, even)
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5, 678901)

    hydra_utils.datetime = Frozen
    sys.argv = ["peftbench.train", *sys.argv[1:]]
    runpy.run_module("peftbench.train", run_name="__main__")
    """
)


def test_four_sweeps_started_in_the_same_second_never_share_a_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["--multirun", *TINY, f"paths.output_dir={tmp_path / 'out'}", "trainer.max_epochs=1"]
    procs = [
        subprocess.Popen([sys.executable, "-c", _FROZEN_NOW, *common, f"seed={seed}"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for seed in range(4)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    records = _index(tmp_path)
    assert sorted(r["seed"] for r in records) == [0, 1, 2, 3] and all(r["status"] == "ok" for r in records)
    assert len({r["run_dir"] for r in records}) == 4
    for r in records:  # every record points at its own results and task file
        assert json.loads((Path(r["run_dir"]) / "results.json").read_text())["key"] == r["key"]


def test_the_index_survives_a_short_write(tmp_path, monkeypatch, capsys):
    index = tmp_path / "index.jsonl"
    append_index(index, {"key": "a", "status": "ok"})
    real_write = os.write

    def disk_full(fd, data):  # writes part of the line, then the disk is full
        real_write(fd, data[:7])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError):
        append_index(index, {"key": "b", "status": "ok"})
    monkeypatch.setattr(os, "write", real_write)
    assert index.read_text().endswith("\n") and len(index.read_text().splitlines()) == 1  # cut back
    with open(index, "a") as f:
        f.write('{"key": "frag')  # a fragment left by some other failed writer
    append_index(index, {"key": "c", "status": "ok"})
    assert [r["key"] for r in read_index(index)] == ["a", "c"]  # c is not glued to the fragment
    assert "skipped 1 damaged line(s) (line 2)" in capsys.readouterr().err
    read_index(index)
    assert capsys.readouterr().err == ""  # reported once


def test_results_json_is_as_readable_as_other_outputs(tmp_path):
    assert train_cli(*_args(tmp_path, "trainer.max_epochs=1"))[0] == 0
    mode = stat.S_IMODE((tmp_path / "run" / "results.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "run" / "task.pt").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_checkpoint_holds_what_training_changes_and_goes_when_the_run_is_ok(tmp_path):
    assert train_cli(*_args(tmp_path, "trainer.max_epochs=1", "keep_checkpoint=true"))[0] == 0
    ckpt_file = tmp_path / "run" / "checkpoints" / "last.ckpt"
    import torch

    ckpt = torch.load(ckpt_file, weights_only=True)
    record = _results(tmp_path)
    trainable = record["params"]["trainable_backbone"] + record["params"]["trainable_head"]
    assert all("lora_" in k or k.startswith("model.head.") for k in ckpt["state_dict"])  # no frozen tensor
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == trainable
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert record["storage"]["checkpoint_bytes"] == ckpt_file.stat().st_size
    assert record["storage"]["checkpoint_bytes"] < 0.1 * record["params"]["total"] * 4  # far below the fp32 model
    rc, _, _ = train_cli(*_args(tmp_path / "b", "trainer.max_epochs=1"))  # default: removed once ok
    assert rc == 0 and not (tmp_path / "b" / "run" / "checkpoints").exists()
    assert (tmp_path / "b" / "run" / "task.pt").exists()
    assert _results(tmp_path / "b")["storage"]["checkpoint_kept"] is False


def test_wandb_names_tags_and_a_killed_run_still_shows_its_config(tmp_path):
    """A real process: W&B (offline) gets ``<method>-<dataset>-s<seed>`` plus the overrides, the protocol tag and the
    config at the start, so a run killed in its first epoch still shows what it was."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    kill = "+callbacks.kill={_target_: tests.helpers.SignalAtEpoch, epoch: 0}"
    args = [o for o in TINY if o != "logger=none"] + [
        "logger=wandb", f"paths.output_dir={tmp_path / 'out'}", f"run_dir={tmp_path / 'run'}", "trainer.max_epochs=2",
        "method.scale=4.0", kill,
    ]
    out = subprocess.run([sys.executable, "-m", "peftbench.train", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 143, out.stderr[-2000:]
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb")
    blob = log.read_bytes()
    assert b"lora-blobs-s0-" in blob and b"method.scale=4.0" in blob  # the run's name
    assert b"protocol:tune" in blob  # its tags
    assert b"label_smoothing" in blob and b"tests.helpers.BlobTask" in blob  # its config, logged at the start
    for notice in ("anonymous", "Tip:", "`weights_only` was not set", "LeafSpec"):  # nobody can act on these
        assert notice not in out.stderr, notice


def test_a_warm_up_as_long_as_the_run_is_flagged(tmp_path):
    code, _, err = train_cli(*_args(tmp_path, "trainer.max_epochs=1"))  # the blobs recipe warms up for 1 epoch
    assert code == 0 and "the warm-up (1 epochs, scheduler.warmup_epochs) is not shorter than the run" in err
    code, _, err = train_cli(*_args(tmp_path / "b", "trainer.max_epochs=2"))
    assert code == 0 and "warm-up" not in err


def test_scoring_says_what_it_does(tmp_path):
    code, _, err = train_cli(*_args(tmp_path, "trainer.max_epochs=1", "method=spt_lora",
                                    "scoring.n_samples=16"))
    assert code == 0, err
    assert "scoring the pre-trained model with Sensitivity on the first 16 training images" in err
    assert "scored and selected in" in err
