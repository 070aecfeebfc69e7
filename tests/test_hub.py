"""Standard artefacts: timm's data config reproduces the data code's evaluation decode pixel for pixel, and
LoRA-family adapters written in HF peft's format load with peft onto the plain timm model and compute the same."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from peftbench.data.base import NORMALIZE
from peftbench.data.fewshot import FewShotTask
from peftbench.data.fgvc import FGVCTask
from peftbench.data.vtab import VTABTask
from peftbench.hub import (
    PEFT_CONFIG,
    NotRepresentable,
    data_config,
    eval_transform,
    save_peft,
)
from peftbench.layers.binary_lora import BinaryLoRALinear
from peftbench.methods.base import prepare_model
from peftbench.methods.bi_lora import BiLoRA
from peftbench.methods.bias import BitFit
from peftbench.methods.heart_lora import HeartLoRA, deactivate_heads, head_layers
from peftbench.methods.lora import LoRA
from peftbench.methods.spt_lora import SPTLoRA
from tests.helpers import BlobTask

peft = pytest.importorskip("peft")  # test-only dependency: reading the adapter needs peft, writing it does not

TASKS = {
    "vtab": VTABTask("cifar", root="/nonexistent", num_classes=100),
    "fgvc": FGVCTask("cub", root="/nonexistent", num_classes=200),
    "fewshot": FewShotTask("food101", root="/nonexistent", num_classes=101, shots=1),
    "embedded": BlobTask(),
}


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 200), (200, 457),
                                                                                          (64, 64), (500, 500))]


@pytest.mark.parametrize("size", [32, 224, 384])
@pytest.mark.parametrize("kind", list(TASKS))
def test_timm_data_config_reproduces_the_evaluation_decode(kind: str, size: int):
    transform = eval_transform(TASKS[kind], size)
    cfg = data_config(transform, "inception")
    assert cfg["input_size"] == (3, size, size) and (cfg["mean"], cfg["std"]) == NORMALIZE["inception"]
    expected = {"vtab": ("bicubic", "squash", 1.0), "fgvc": ("bilinear", "center", None),
                "fewshot": ("bicubic", "squash", None), "embedded": ("bicubic", "squash", 1.0)}[kind]
    assert (cfg["interpolation"], cfg["crop_mode"]) == expected[:2]
    assert expected[2] is None or cfg["crop_pct"] == expected[2]
    timm_pixels = create_transform(**cfg, is_training=False, normalize=False)  # uint8 tensors, no normalisation
    for img in images():
        ours = torch.from_numpy(transform.apply(img))  # (3, size, size) uint8
        assert torch.equal(timm_pixels(img), ours), (kind, size, img.size)


# --- HF peft ---------------------------------------------------------------------------------------------------
def micro() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_micro", pretrained=False, num_classes=5, depth=3).eval()


def adapt(method, base: torch.nn.Module, state: dict | None = None) -> torch.nn.Module:
    """The method applied to a copy of ``base``, with non-zero random factors and head (as after training)."""
    model = copy.deepcopy(base)
    prepare_model(model, method, state=state)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05 if "lora_A" in name else 0.3)
    return model.eval()


def peft_roundtrip(model: torch.nn.Module, base: torch.nn.Module, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    save_peft(model, folder, base_model="vit_micro")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()  # offline-ok: a local folder
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return loaded(x), model(x)


def test_lora_qv_and_other_targets_in_peft(tmp_path: Path):
    base = micro()
    model = adapt(LoRA(rank=4, targets=("q", "v", "fc1", "proj"), scale=2.5), base)
    got, expected = peft_roundtrip(model, base, tmp_path)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    cfg = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["head"] and cfg["base_model_name_or_path"]
    assert sorted(cfg["target_modules"]) == sorted(f"blocks.{i}.{t}" for i in range(3)
                                                   for t in ("attn.qkv", "attn.proj", "mlp.fc1"))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == pytest.approx(10.0)  # fc1, proj: rank r, alpha = s * r
    assert set(cfg["rank_pattern"].values()) == {8} and len(cfg["rank_pattern"]) == 3  # qkv: q and v, rank 2r
    assert set(cfg["alpha_pattern"].values()) == {20.0}
    weights = peft.utils.load_peft_weights(str(tmp_path))
    b = weights["base_model.model.blocks.1.attn.qkv.lora_B.weight"]  # (3C, 2r): q rows x first r, v rows x last r
    layer = model.blocks[1].attn.qkv
    c = 192
    assert b.shape == (3 * c, 8) and torch.count_nonzero(b[c : 2 * c]) == 0  # k rows: zero
    assert torch.count_nonzero(b[:c, 4:]) == 0 and torch.count_nonzero(b[2 * c :, :4]) == 0  # block structure
    assert torch.equal(b[:c, :4], layer.lora_B[0].detach()) and torch.equal(b[2 * c :, 4:], layer.lora_B[1].detach())
    assert torch.equal(weights["base_model.model.head.weight"], model.head.weight.detach())


@pytest.mark.parametrize("granularity", ["layer", "pooled"])
def test_heart_lora_active_heads_only_in_peft(tmp_path: Path, granularity: str):
    base = micro()
    method = HeartLoRA(rank=2, scale=3.0, ne=4, granularity=granularity, score="random")
    model = adapt(method, base)
    state = method.choose_heads(model, method.select(model, None), None)
    deactivate_heads(model, state["deactivated"])  # B shrinks to the active heads' rows
    assert any(layer.lora_B.shape[1] < 192 for layer in head_layers(model).values())
    got, expected = peft_roundtrip(model, base, tmp_path)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    weights = peft.utils.load_peft_weights(str(tmp_path))
    for name, layer in head_layers(model).items():
        b = weights[f"base_model.model.{name}.lora_B.weight"]  # (3C, 2r)
        for h in layer.deactivated():  # a deactivated head's q and v rows are zero rows
            assert torch.count_nonzero(b[h * 16 : (h + 1) * 16]) == 0
            assert torch.count_nonzero(b[2 * 192 + h * 16 : 2 * 192 + (h + 1) * 16]) == 0


def test_heart_lora_layer_without_active_heads_in_peft(tmp_path: Path):
    base = micro()
    model = adapt(HeartLoRA(rank=2, scale=3.0, ne=11), base)
    deactivate_heads(model, {"blocks.1.attn.qkv": list(range(12)), "blocks.2.attn.qkv": [0, 5]})
    assert model.blocks[1].attn.qkv.lora_B.shape == (2, 0, 2)
    got, expected = peft_roundtrip(model, base, tmp_path)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    b = peft.utils.load_peft_weights(str(tmp_path))["base_model.model.blocks.1.attn.qkv.lora_B.weight"]
    assert b.shape == (3 * 192, 4) and torch.count_nonzero(b) == 0


@pytest.mark.parametrize("quantizer", ["mean_abs", "gaussian"])
def test_bi_lora_effective_factors_in_peft(tmp_path: Path, quantizer: str):
    base = micro()
    model = adapt(BiLoRA(rank=4, scale=0.7, quantizer=quantizer), base)
    got, expected = peft_roundtrip(model, base, tmp_path)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    a = peft.utils.load_peft_weights(str(tmp_path))["base_model.model.blocks.0.attn.qkv.lora_A.weight"]
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, BinaryLoRALinear)
    assert a[:4].unique().numel() == 2 and torch.equal(a[:4], layer.binary_factors()[0][0].detach())  # 1-bit codes


def spt_state(structured: list[str], sparse: dict | None = None, vectors: list | None = None) -> dict:
    return {"structured": structured, "units": [], "sparse": sparse or {}, "vectors": vectors or []}


def test_spt_lora_with_lora_modules_only_is_representable(tmp_path: Path):
    base = micro()
    state = spt_state(["blocks.0.attn.qkv.weight:q", "blocks.2.attn.qkv.weight:k", "blocks.1.mlp.fc1.weight"])
    model = adapt(SPTLoRA(rank=2, scale=1.5), base, state)
    got, expected = peft_roundtrip(model, base, tmp_path)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    cfg = json.loads((tmp_path / PEFT_CONFIG).read_text())
    assert cfg["target_modules"] == ["blocks.0.attn.qkv", "blocks.1.mlp.fc1", "blocks.2.attn.qkv"]


@pytest.mark.parametrize(
    ("method", "state", "message"),
    [
        (BitFit(), None, r"trains patch_embed\.proj\.bias"),
        (SPTLoRA(rank=2), spt_state(["blocks.0.attn.qkv.weight:q"], {"blocks.0.attn.qkv": torch.tensor([5, 900])}),
         "blocks.0.attn.qkv is a SparseLoRALinear"),
        (SPTLoRA(rank=2), spt_state([], {"blocks.1.mlp.fc2": torch.tensor([3])}), "blocks.1.mlp.fc2 is a SparseDelta"),
        (SPTLoRA(rank=2), spt_state(["blocks.0.mlp.fc1.weight"], vectors=["blocks.2.norm2.weight"]),
         r"trains blocks\.2\.norm2\.weight"),
    ],
)
def test_what_peft_cannot_hold_is_named(tmp_path: Path, method, state, message: str):
    model = adapt(method, micro(), state)
    with pytest.raises(NotRepresentable, match=message):
        save_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
