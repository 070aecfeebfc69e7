"""End-to-end training on a tiny synthetic task: results, frozen weights, protocols, resume, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftbench.compose import compose_config
from peftbench.errors import PeftbenchError, TrainingDiverged
from peftbench.records.results import read_index
from peftbench.train import build, execute
from tests.helpers import TINY, full_state_overrides


def run(tmp_path: Path, *extra: str, name: str = "run") -> tuple[dict, Path]:
    cfg = compose_config(TINY + [f"paths.output_dir={tmp_path}/outputs", "keep_checkpoint=true", *extra])
    run_dir = tmp_path / name
    return execute(cfg, run_dir), run_dir


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors the run's resumable checkpoint holds."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.parametrize("method", ["lora", "linear", "full"])
def test_frozen_entries_bit_identical_after_training(tmp_path, method):
    record, run_dir = run(tmp_path, f"method={method}", *full_state_overrides(tmp_path / "full.pt"))
    assert record["status"] == "ok"
    cfg = compose_config(TINY + [f"method={method}"])
    _, _, module, _ = build(cfg)
    module.configure_model()  # same seed -> same pre-trained weights and selection as the run
    trained = torch.load(tmp_path / "full.pt", weights_only=True)
    changed = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            changed.append(not torch.equal(trained[name], p.detach()))
        else:
            assert torch.equal(trained[name], p.detach()), f"frozen {name} changed"
    assert any(changed)
    expected = {"linear": 0, "lora": 6 * 2 * (192 * 8 + 8 * 192), "full": record["params"]["pretrained_backbone"]}
    assert record["params"]["trainable_backbone"] == expected[method]


def test_results_json_and_index(tmp_path):
    record, run_dir = run(tmp_path)
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["method"] == "lora" and on_disk["dataset"] == "blobs"
    assert set(on_disk["metrics"]) == {"val_acc", "val_acc_max", "best_epoch", "test_acc"}
    assert on_disk["params"]["trainable_head"] == 192 * 4 + 4
    assert {"scoring_s", "training_s", "evaluation_s"} <= set(on_disk["timings"])
    (line,) = read_index(tmp_path / "outputs" / "index.jsonl")
    assert line["run_dir"] == str(run_dir.resolve()) and line["status"] == "ok"


def test_protocols_final_and_paper(tmp_path):
    final, _ = run(tmp_path, "protocol=final", name="final")
    assert set(final["metrics"]) == {"test_acc"}
    paper, _ = run(tmp_path, "protocol=paper", name="paper")
    assert set(paper["metrics"]) == {"test_acc", "test_acc_last", "best_epoch"}
    assert paper["metrics"]["test_acc"] == max(acc for _, acc in paper["history"])
    assert "papers' habit" in paper["protocol_label"]


def test_resume_matches_uninterrupted_and_reuses_selection(tmp_path):
    marker = tmp_path / "scored.txt"
    common = ["method=one_block", "scorer=counting", f"scorer.marker={marker}", "dataset.recipe.epochs=4"]
    straight, _ = run(tmp_path, *common, name="straight")
    assert marker.read_text().count("scored") == 1

    crash = ["+callbacks.crash._target_=tests.helpers.CrashAfterEpoch", "+callbacks.crash.epoch=1"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, *common, *crash, name="resumed")
    failed = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]
    assert marker.read_text().count("scored") == 2

    resumed, _ = run(tmp_path, *common, *crash, "resume=true", name="resumed")  # the same overrides; epoch 1 is past
    assert marker.read_text().count("scored") == 2  # the selection was restored, not recomputed
    assert resumed["selection"] == straight["selection"]
    assert resumed["history"] == straight["history"]
    assert resumed["metrics"] == straight["metrics"]
    assert torch.equal(
        torch.cat([v.flatten().float() for v in final_state(tmp_path / "straight").values()]),
        torch.cat([v.flatten().float() for v in final_state(tmp_path / "resumed").values()]),
    )


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(PeftbenchError, match="holds no run"):
        run(tmp_path, "resume=true", name="never-ran")


def test_nan_loss_stops_with_clear_message(tmp_path):
    with pytest.raises(TrainingDiverged, match="loss is nan|loss is inf"):
        run(tmp_path, "optimizer.lr=1e30", "scheduler=constant", "method=full", name="nan")
    failed = json.loads((tmp_path / "nan" / "results.json").read_text())
    assert failed["status"] == "failed" and "TrainingDiverged" in failed["error"]


def test_wandb_offline_run_records_config_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record, run_dir = run(tmp_path, "logger=wandb", name="wb")
    assert record["status"] == "ok"
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert list(offline.glob("*.wandb")), "no offline W&B run file"


def test_csv_logger_writes_metrics(tmp_path):
    record, run_dir = run(tmp_path, "logger=csv", name="csv")
    text = (run_dir / "csv" / "metrics.csv").read_text()
    assert "val/acc" in text and "final/test_acc" in text
