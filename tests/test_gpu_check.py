"""The prepared GPU check runs end to end in smoke mode (vit_micro on the CPU) and says what it misses in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1",
           **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_check_smoke_runs_end_to_end(tmp_path):
    """GPU_CHECK_SMOKE=1: every part measured (10 methods, eval, 2 runs at once, compile, projection), JSON + table."""
    out = _check(tmp_path, GPU_CHECK_SMOKE="1")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["mode"] == "smoke" and report["backbone"] == "vit_micro" and report["skipped"] == []
    rows = {r["method"]: r for r in report["methods"]}
    assert list(rows) == ["full", "linear", "lora", "spt_lora", "cdra_spt", "adapter", "vpt_deep", "heart_lora",
                          "hifi", "tina"]
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("error"))
        assert row["train_img_s"] > 0 and row["eval_img_s"] > 0 and row["images"] == 4 * 8, name
        assert row["resident"] == ["test", "trainval"], name  # the data was held resident, not loaded
    assert rows["linear"]["trainable"] < rows["lora"]["trainable"] < rows["full"]["trainable"]
    (two,) = report["concurrency"]
    assert two["status"] == "ok" and two["n"] == 2 and two["combined_img_s"] > 0 and len(two["per_run_img_s"]) == 2
    assert report["compile"]["status"] == "ok" and report["compile"]["backend"] == "eager"
    one = report["projection"]["one run at a time"]
    assert one["status"] == "ok" and one["train_images"] == 1_900_000 and one["predicted_s"] > 0
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table in out.stdout and "| lora |" in table and "2 LoRA runs at once" in table


def test_gpu_check_without_hydra_or_wheels_is_one_line(tmp_path):
    """An interpreter without hydra-core and no wheels to install: exit 2 and a pointer to the instructions."""
    fake = tmp_path / "python-without-hydra"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    out = _check(tmp_path, PYTHON=str(fake), GPU_CHECK_WHEELS=str(tmp_path / "none"))
    assert out.returncode == 2
    assert "hydra-core / omegaconf are missing" in out.stderr and "header" in out.stderr
