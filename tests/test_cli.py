"""The command line as a user types it: config printing, a tiny run, one-line errors, DDP on 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY

ROOT = Path(__file__).resolve().parent.parent


def cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cfg_job_prints_resolved_config():
    out = cli("peftbench.train", "--cfg", "job", "method=lora", "method.rank=4")
    assert out.returncode == 0, out.stderr
    assert "_target_: peftbench.methods.lora.LoRA" in out.stdout and "rank: 4" in out.stdout


def test_tiny_run_prints_summary(tmp_path):
    run_dir = tmp_path / "run"
    out = cli("peftbench.train", *TINY, f"paths.output_dir={tmp_path}", f"run_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val_acc" in out.stdout and "test_acc" in out.stdout and str(run_dir) in out.stdout
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("backbone.checkpoint={tmp}/nope.safetensors", "nope.safetensors does not exist"),
        ("backbone.checkpoint={tmp}/weights.xyz", "unknown format '.xyz'"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_failed_result(tmp_path, override, needle):
    (tmp_path / "weights.xyz").write_text("?")
    run_dir = tmp_path / "run"
    weights = ["backbone.pretrained=true", override.format(tmp=tmp_path)]  # offline-ok: a local checkpoint file
    args = [*TINY, *weights, f"paths.output_dir={tmp_path}",
            f"run_dir={run_dir}"]
    out = cli("peftbench.train", *args)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("peftbench: error:") and needle in last
    assert "Traceback" not in out.stderr
    result = json.loads((run_dir / "results.json").read_text())
    assert result["status"] == "failed" and needle in result["error"]


def test_ddp_two_cpu_ranks_identical_selection_and_weights(tmp_path):
    """Each rank would pick a different block (rank-dependent select); the broadcast makes them agree."""
    run_dir, digests = tmp_path / "run", tmp_path / "digests"
    args = [*TINY, "trainer=ddp_cpu", "method=one_block", "scorer=counting", f"paths.output_dir={tmp_path}",
            f"run_dir={run_dir}", "+callbacks.digest._target_=tests.helpers.DigestCallback",
            f"+callbacks.digest.out_dir={digests}"]
    out = cli("peftbench.train", *args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0 = json.loads((digests / "rank0.json").read_text())
    rank1 = json.loads((digests / "rank1.json").read_text())
    assert rank0["trainable"] == rank1["trainable"]
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    assert any(name.startswith("blocks.") for name in rank0["trainable"])
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"


DDP_METHODS = {  # methods that select from data or change the model during fit, under 2 DDP ranks
    "tina": ["method=tina", "method.sigma0=8", "method.sigma_target=32", "method.epochs_per_cycle=1",
             "method.score=activation", "scoring.n_samples=32", "trainer.max_epochs=3"],
    "heart_lora": ["method=heart_lora", "method.ne=2", "method.warmup_epochs=1", "scoring.n_samples=32",
                   "trainer.max_epochs=2"],
    "spt_lora": ["method=spt_lora", "method.budget=20K", "scoring.n_samples=32",
                 "scoring.batch_size=16", "trainer.max_epochs=1"],
}


@pytest.mark.parametrize("method", sorted(DDP_METHODS))
def test_ddp_two_ranks_methods_that_select_or_shrink(tmp_path, method):
    """Scoring (SPT), mid-fit head selection (Heart-LoRA) and structural pruning (TINA) under 2 gloo ranks:
    both ranks end with the same trainable set and bit-identical weights."""
    run_dir, digests = tmp_path / "run", tmp_path / "digests"
    args = [*TINY, "trainer=ddp_cpu", *DDP_METHODS[method], f"paths.output_dir={tmp_path}", f"run_dir={run_dir}",
            "+callbacks.digest._target_=tests.helpers.DigestCallback", f"+callbacks.digest.out_dir={digests}"]
    out = cli("peftbench.train", *args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "ok"
    if method == "tina":
        assert record["selection"]["prunes_done"] == 2
    if method == "heart_lora":  # B rows of 2 of 12 heads dropped mid-fit (DDP re-wrapped): 36,864 - 2 x 6 x 2 x 16 x 8
        assert record["params"]["trainable_backbone"] == 33_792
