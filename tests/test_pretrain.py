"""Fractal renderer and the pre-training script of the embedded backbone (plus the shipped asset)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peftbench.backbones import vit_micro
from peftbench.pretrain import fractals
from peftbench.pretrain import run as pretrain


def test_categories_deterministic_and_filled() -> None:
    a, b = fractals.sample_categories(6, seed=3), fractals.sample_categories(6, seed=3)
    assert np.array_equal(a.A, b.A) and np.array_equal(a.b, b.b) and np.array_equal(a.p, b.p)
    assert np.allclose(a.p.sum(1), 1) and (np.linalg.norm(a.A, ord=2, axis=(-2, -1)) < 1).all()  # contractive
    assert (fractals.filling_rate(a, seed=5) > 0.05).all()
    assert not np.array_equal(a.A, fractals.sample_categories(6, seed=4).A)


def test_render_deterministic_and_categories_differ() -> None:
    cats = fractals.sample_categories(4, seed=0)
    x1, y1 = fractals.render_dataset(cats, 3, seed=7)
    x2, y2 = fractals.render_dataset(cats, 3, seed=7)
    assert x1.shape == (12, 3, 32, 32) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and y1.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert not np.array_equal(x1, fractals.render_dataset(cats, 3, seed=8)[0])
    plain = fractals.render(cats, seed=0, variation=False).astype(float)  # canonical view of each category
    assert all(np.abs(plain[i] - plain[j]).mean() > 5 for i in range(4) for j in range(i))
    assert x1.std() > 10


def test_lr_schedule() -> None:
    lrs = [pretrain.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] < 0.05


@pytest.mark.parametrize("budget", [["--steps", "2"], ["--minutes", "0.05", "--calib-steps", "2"]])
def test_tiny_pretrain_run(tmp_path: Path, budget: list[str]) -> None:
    small = ["--categories", "3", "--per-category", "4", "--batch-size", "4", "--heldout-per-category", "2"]
    pretrain.main([*budget, *small, "--out", str(tmp_path), "--no-probe", "--threads", "1"])
    weights, meta = tmp_path / "vit_micro.safetensors", json.loads((tmp_path / "vit_micro.json").read_text())
    assert meta["sha256"] == pretrain.sha256(weights) and meta["training"]["steps"] >= 2
    assert meta["source"]["categories"] == 3 and "torch" in meta["versions"]
    state = load_file(str(weights))
    assert all(v.dtype == torch.float16 for v in state.values()) and not any(k.startswith("head") for k in state)
    pretrain.load_vit_micro(tmp_path)  # strict load, checks the SHA-256 against the json


def test_tiny_pretrain_is_deterministic(tmp_path: Path) -> None:
    args = ["--steps", "2", "--categories", "2", "--per-category", "2", "--batch-size", "4", "--no-probe"]
    args += ["--heldout-per-category", "1", "--threads", "1"]
    pretrain.main([*args, "--out", str(tmp_path / "a")])
    pretrain.main([*args, "--out", str(tmp_path / "b")])
    a, b = (load_file(str(tmp_path / run / "vit_micro.safetensors")) for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shipped_asset() -> None:
    weights, meta_path = pretrain.ASSETS / "vit_micro.safetensors", pretrain.ASSETS / "vit_micro.json"
    # the pre-training CLI writes where the registered timm model reads: the packaged weights, which are committed
    assert weights == Path(vit_micro.asset_path()) and weights.exists()
    meta = json.loads(meta_path.read_text())
    assert meta["sha256"] == pretrain.sha256(weights)
    assert weights.stat().st_size <= 10 * 2**20
    model = pretrain.build_vit_micro(10)
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected


@pytest.mark.slow
def test_probe_cli_records_both_numbers(tmp_path: Path) -> None:
    small = ["--steps", "1", "--categories", "2", "--per-category", "2", "--batch-size", "4"]
    pretrain.main([*small, "--heldout-per-category", "1", "--out", str(tmp_path), "--no-probe"])
    pretrain.main(["--probe", "--out", str(tmp_path), "--probe-tasks", "digits"])
    probe = json.loads((tmp_path / "vit_micro.json").read_text())["linear_probe"]["tasks"]["digits"]
    assert 0.5 < probe["random_init"] <= 1 and 0.5 < probe["pretrained"] <= 1
