"""The benchmark driver: presets compose, a tiny bench yields the fields and ratios, failures are recorded."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from peftbench.bench.run import check_targets, jobs, markdown, moonshot, pipeline_jobs, run_bench, wrappers
from peftbench.compose import compose_config
from peftbench.methods.base import prepare_model, unwrap


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_presets_compose(preset):
    """Both presets compose into jobs; gpu is ViT-B/16 at 224, batch 64, bf16 and fp32, with the moonshot."""
    cfg = compose_config(config_name="bench", overrides=[f"bench={preset}"])
    todo = jobs(cfg)
    assert todo and {j["method"] for j in todo} >= {"lora", "full", "spt_lora", "cdra_spt"}
    for job in (j for j in todo if j["method"] in ("spt_lora", "cdra_spt")):  # the method brings its scorer
        assert compose_config([*job["overrides"], f"method={job['method']}"])._choices_["scorer"] == "sensitivity"
    if preset == "gpu":
        assert cfg.bench.device == "cuda" and list(cfg.bench.dtypes) == ["bf16", "fp32"]
        assert {j["batch_size"] for j in todo} == {64}
        assert compose_config(["backbone=vit_b16_in21k"]).backbone.image_size == 224
        assert cfg.bench.moonshot.tasks == 19 and len(cfg.bench.moonshot.test_images) == 19
        assert pipeline_jobs(cfg) == []
    else:
        assert {j["backbone"] for j in todo} == {"vit_micro", "vit_b16_in21k (random weights)"}
        pipeline = pipeline_jobs(cfg)  # the training-pipeline rows: loader, resident, checkpoints every epoch
        assert [j["variant"].split(",")[0] for j in pipeline] == ["loader", "resident", "loader"]
        for job in pipeline:
            run = compose_config(job["overrides"])
            assert run.trainer.limit_train_batches == 4 and run.data.resident == ("resident" in job["variant"])


def test_moonshot_arithmetic():
    """1.9M training images (19 x 100 x 1,000) plus the test sets, at the LoRA bf16 row's throughputs."""
    spec = compose_config(config_name="bench", overrides=["bench=gpu"]).bench.moonshot
    rows = [{"method": "lora", "dtype": "bf16", "status": "ok", "train_img_s": 2000.0, "eval_img_s": 8000.0}]
    m = moonshot(rows, spec)
    test = sum(spec.test_images.values())
    assert m["train_images"] == 1_900_000 and m["test_images"] == test
    assert m["predicted_s"] == pytest.approx(1_900_000 / 2000 + test / 8000)
    assert m["needed_train_img_s"] == pytest.approx(1_900_000 / (1800 - test / 8000))
    assert m["met"] == (m["predicted_s"] <= 1800)
    assert moonshot([], spec)["status"].startswith("no successful")


def test_merged_model_has_no_wrappers():
    """What the bench times as 'merged': LoRA's wrappers are gone after unwrap, outputs unchanged."""
    from timm.models.vision_transformer import VisionTransformer

    from peftbench.methods.lora import LoRA

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5).eval()
    prepare_model(model, LoRA(rank=4))
    assert wrappers(model)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    merged = unwrap(model)
    assert wrappers(merged) == []
    torch.testing.assert_close(merged(x), expected)


def test_tiny_bench(tmp_path):
    """vit_micro (random weights, synthetic data), lora + full + a failing method: rows, ratios, JSON, table."""
    cfg = compose_config(config_name="bench", overrides=["bench=cpu", f"out_dir={tmp_path}"])
    tiny = {
        "name": "tiny",
        "overrides": ["backbone=vit_micro", "backbone.pretrained=false"],
        "data": "synthetic",
        "num_classes": 10,
        "batch_size": 8,
        "infer_batch": 8,
        "scoring": {"sensitivity": 16, "batch_size": 8},
        "score_targets": True,
        "methods": ["lora", "no_such_method", "full", "spt_lora"],
    }
    with open_dict(cfg):
        cfg.bench.runs = [tiny]
        cfg.bench.pipeline = None  # the pipeline rows have their own test below
        cfg.bench.update(warmup_steps=2, timed_steps=3, latency_rounds=2, threads=1, timeout_s=120)
    report = run_bench(cfg)
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["lora", "no_such_method", "full", "spt_lora"]
    assert rows["no_such_method"]["status"] == "failed" and "no_such_method" in rows["no_such_method"]["error"]
    lora, full, spt = rows["lora"], rows["full"], rows["spt_lora"]
    assert lora["status"] == full["status"] == spt["status"] == "ok", (lora, full, spt)
    for key in ("step_ms", "peak_mb", "plain_ms", "unmerged_ms", "merged_ms", "task_bytes", "params"):
        assert key in lora, key
    assert lora["step_vs_lora"] == 1.0 and lora["peak_vs_lora"] == 1.0 and full["step_vs_full"] == 1.0
    assert lora["step_vs_full"] == pytest.approx(lora["step_ms"] / full["step_ms"])
    assert full["peak_vs_lora"] == pytest.approx(full["peak_mb"] / lora["peak_mb"])
    assert lora["merged_vs_plain"] == pytest.approx(lora["merged_ms"] / lora["plain_ms"])
    assert lora["params"]["trainable_backbone"] < full["params"]["trainable_backbone"]
    assert spt["scoring_samples"] == 16 and spt["scoring_s"] > 0 and spt["epoch_s"] > 0
    assert any(t["method"] == "spt_lora" and t["target"].startswith("sensitivity") for t in report["targets"])

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in saved["rows"]] == list(rows)
    table = (tmp_path / "bench.md").read_text()
    assert table == markdown(report)
    for method in rows:
        assert sum(line.startswith(f"| {method} |") for line in table.splitlines()) == 1, method
    assert "| no_such_method | failed" in table


def test_targets_verdicts():
    """Each target reads the right figures and compares with its limit."""
    targets = compose_config(config_name="bench", overrides=[]).targets
    row = {
        "status": "ok",
        "backbone": "b",
        "dtype": "fp32",
        "reparameterisable": True,
        "merged_vs_plain": 1.01,
        "peak_vs_lora": 1.10,
        "step_vs_full": 0.8,
        "scoring_s": 3.0,
        "epoch_s": 1.0,
        "scoring_samples": 800,
    }
    out = check_targets([{**row, "method": "spt_lora"}], OmegaConf.create(OmegaConf.to_container(targets)))
    verdict = {t["target"].split(" (")[0]: t["met"] for t in out}
    assert verdict == {
        "merged latency / plain backbone": True,
        "peak training memory / LoRA": False,
        "sensitivity scoring": False,
        "training step / full fine-tuning": True,
    }


@pytest.mark.parametrize("autocast", [False, True])
def test_sparse_linear_matches_autograd_and_saves_no_weight(autocast):
    """The memory fix of the sparse layers: same output and gradients as autograd through index_add + F.linear
    (x, delta, a trainable bias; fp32 and bf16 autocast), and no formed (out, in) weight saved for the backward."""
    from peftbench.layers.sparse import SparseDeltaLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16)
    base.weight.requires_grad_(False)
    layer = SparseDeltaLinear(base, torch.randperm(24 * 16)[:40])
    with torch.no_grad():
        layer.sparse_delta.normal_()
    x = torch.randn(3, 5, 24, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
    weights = [t for t in saved if t.shape == (16, 24)]  # only W0 itself (a reference), never a formed W
    assert all(t.data_ptr() == base.weight.data_ptr() for t in weights)
    grads = torch.autograd.grad(y.float().square().sum(), [x, layer.sparse_delta, base.bias])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_ref = torch.nn.functional.linear(x, layer.sparse_weight(), base.bias)
    refs = torch.autograd.grad(y_ref.float().square().sum(), [x, layer.sparse_delta, base.bias])
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, refs):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-2 if autocast else 1e-5, atol=1e-2 if autocast else 1e-5)


def test_pipeline_rows_time_the_loader_and_resident_data_and_count_bytes_written(tmp_path):
    """bench.pipeline: short runs through the training path, one process each: steps/s with the loader and with
    resident data, checkpoint writes as configured, the run's bytes written (checkpoints + task file + records)."""
    from tests.helpers import TINY

    cfg = compose_config(config_name="bench", overrides=["bench=cpu", f"out_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.bench.runs = []
        cfg.bench.update(threads=1, timeout_s=120)
        cfg.bench.pipeline = {
            "overrides": [*TINY, "trainer.max_epochs=4", "checkpoint_every=2"],
            "skip_epochs": 1,
            "variants": {"loader": ["data.resident=false"], "resident": ["data.resident=true"],
                         "every epoch": ["checkpoint_every=1"]},
        }
    report = run_bench(cfg)
    rows = {r["variant"]: r for r in report["pipeline"]}
    assert list(rows) == ["loader", "resident", "every epoch"]
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["loader"]["data_resident"] == [] and rows["resident"]["data_resident"] == ["test", "train", "val"]
    for r in rows.values():
        assert r["steps_per_s"] > 0 and r["timed_steps"] == 3 * 4  # 64 images at batch 16, epoch 0 left out
        assert r["bytes_written"] > r["checkpoint_bytes_written"] + r["task_file_bytes"]
    assert [rows[v]["checkpoint_writes"] for v in rows] == [2, 2, 4]
    every, loader = rows["every epoch"]["checkpoint_bytes_written"], rows["loader"]["checkpoint_bytes_written"]
    assert every == pytest.approx(2 * loader, rel=1e-3)  # twice the writes of the same size (+- a few header bytes)
    table = markdown(report)
    assert "**Training pipeline**" in table and "| resident | test, train, val |" in table
    assert json.loads((tmp_path / "bench.json").read_text())["pipeline"][1]["variant"] == "resident"
