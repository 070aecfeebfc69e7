"""The baseline zoo (BitFit, Partial-k, MLP-k, Att/MLP-blocks, VPT): trainable sets, parameter formulas,
VPT's token bookkeeping, frozen weights after training, and training above chance on the embedded digits."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from peftbench.accounting import backbone_size, parameter_report
from peftbench.backbones import anatomy
from peftbench.backbones.build import build_backbone
from peftbench.compose import compose_config
from peftbench.methods.base import Method, prepare_model
from peftbench.methods.bias import BitFit
from peftbench.methods.blocks import Blocks
from peftbench.methods.mlp_head import MLPHead
from peftbench.methods.partial import Partial
from peftbench.methods.vpt import VPT, remove_prompts
from peftbench.train import build, execute
from tests.helpers import TINY, full_state_overrides

C, L, K = 768, 12, 100  # ViT-B/16 width, depth; classes of the test head
VIT_B_BACKBONE = 85_798_656


@pytest.fixture(scope="module")
def vit_b_meta() -> nn.Module:
    """ViT-B/16 with a 100-way head on the meta device: real shapes and names, no memory, no download."""
    with torch.device("meta"):
        return build_backbone("vit_b16_in21k", num_classes=K, timm_name="vit_base_patch16_224", pretrained=False)


def prepared(model: nn.Module, method: Method) -> tuple[nn.Module, dict, set[str]]:
    """A copy of ``model`` with ``method`` applied: (model, parameter report, trainable names)."""
    model = copy.deepcopy(model)
    total = backbone_size(model)
    prepare_model(model, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return model, parameter_report(model, total), trainable


def micro(seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    arch = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=3) | kwargs
    return VisionTransformer(**arch).eval()


# --- trainable sets and parameter formulas on ViT-B/16 ------------------------------------------------------


def test_bitfit_trains_every_bias_and_nothing_else(vit_b_meta):
    model, report, trainable = prepared(vit_b_meta, BitFit())
    names = {n for n, _ in model.named_parameters()}
    assert trainable == {n for n in names if n.endswith(".bias")} | {"head.weight"}
    # per block: norm1 C + qkv 3C + proj C + norm2 C + fc1 4C + fc2 C = 11C; + patch embedding C + final norm C
    assert report["pretrained_backbone"] == VIT_B_BACKBONE
    assert report["trainable_backbone"] == (11 * L + 2) * C == 102_912
    assert report["trainable_head"] == C * K + K


@pytest.mark.parametrize("k", [1, 2])
def test_partial_trains_last_k_blocks_and_final_norm(vit_b_meta, k):
    model, report, trainable = prepared(vit_b_meta, Partial(k=k))
    names = {n for n, _ in model.named_parameters()}
    top = tuple(f"blocks.{i}." for i in range(L - k, L)) + ("norm.", "head.")
    assert trainable == {n for n in names if n.startswith(top)}
    block = 12 * C**2 + 13 * C  # qkv 3C^2+3C, proj C^2+C, fc1 4C^2+4C, fc2 4C^2+C, two norms 2C each
    assert report["trainable_backbone"] == k * block + 2 * C
    if k == 1:
        assert report["trainable_backbone"] == 7_089_408


@pytest.mark.parametrize("k", [0, L + 1])
def test_partial_rejects_k_out_of_range(vit_b_meta, k):
    with pytest.raises(ValueError, match="k must be in \\[1, 12\\] \\(the depth\\)"):
        prepared(vit_b_meta, Partial(k=k))


@pytest.mark.parametrize(
    ("part", "per_block", "expected"), [("attn", 4 * C**2 + 4 * C, 28_348_416), ("mlp", 8 * C**2 + 5 * C, 56_669_184)]
)
def test_blocks_trains_one_kind_of_sub_block(vit_b_meta, part, per_block, expected):
    model, report, trainable = prepared(vit_b_meta, Blocks(part=part))
    names = {n for n, _ in model.named_parameters()}
    assert trainable == {n for n in names if f".{part}." in n} | {"head.weight", "head.bias"}
    assert report["trainable_backbone"] == L * per_block == expected


def test_blocks_attn_on_convnext_is_a_clear_error():
    with torch.device("meta"):
        convnext = timm.create_model("convnext_atto", num_classes=3)
    with pytest.raises(ValueError, match="has no attn sub-block"):
        prepare_model(convnext, Blocks(part="attn"))
    with pytest.raises(ValueError, match="part must be one of"):
        Blocks(part="norm")


def test_mlp_head_structure_and_size(vit_b_meta):
    model, report, trainable = prepared(vit_b_meta, MLPHead(k=3))
    head = anatomy.head(model)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Dropout"] * 2 + ["Linear"]
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(C, C), (C, C), (C, K)]
    assert trainable == {f"head.{n}" for n, _ in head.named_parameters()}
    assert report["trainable_backbone"] == 0
    assert report["trainable_head"] == 2 * (C * C + C + 2 * C) + C * K + K == 1_261_156
    _, plain, _ = prepared(vit_b_meta, MLPHead(k=3, batchnorm=False, activation="gelu"))
    assert plain["trainable_head"] == 2 * (C * C + C) + C * K + K == 1_258_084
    _, linear, _ = prepared(vit_b_meta, MLPHead(k=1))
    assert linear["trainable_head"] == C * K + K


@pytest.mark.parametrize(("deep", "expected"), [(False, 10 * C), (True, L * 10 * C)])
def test_vpt_trains_prompts_only(vit_b_meta, deep, expected):
    model, report, trainable = prepared(vit_b_meta, VPT(tokens=10, deep=deep))
    assert trainable == {"vpt.vpt_prompts", "head.weight", "head.bias"}
    assert report["trainable_backbone"] == expected == (92_160 if deep else 7_680)


def test_reparameterisable_flags():
    assert BitFit.reparameterisable and Partial.reparameterisable and Blocks.reparameterisable
    assert not MLPHead.reparameterisable and not VPT.reparameterisable


# --- VPT: what the blocks see ---------------------------------------------------------------------------------


def record_block_inputs(model: nn.Module) -> list[torch.Tensor]:
    """Register (after VPT's hooks) pre-hooks that store each block's input, then the last block's final output."""
    seen: list[torch.Tensor] = []
    views = anatomy.blocks(model)
    for view in views:
        view.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    views[-1].module.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    return seen


@pytest.mark.parametrize("reg_tokens", [0, 2])
@pytest.mark.parametrize("deep", [False, True])
def test_vpt_sequence_layout(deep, reg_tokens):
    model = micro(reg_tokens=reg_tokens, global_pool="avg" if reg_tokens else "token")
    x, P = torch.randn(2, 3, 32, 32), 5
    prefix, n_patches = anatomy.prefix_tokens(model), 16
    prepare_model(model, VPT(tokens=P, deep=deep))
    seen = record_block_inputs(model)
    model(x)
    *block_inputs, final = seen
    assert [t.shape[1] for t in block_inputs] == [prefix + P + n_patches] * 3  # prompts at every block
    assert final.shape[1] == prefix + n_patches  # removed after the last block: norm and pooling see no prompts
    prompts = model.vpt.vpt_prompts.detach()  # (n, P, C)
    assert prompts.shape == ((3 if deep else 1), P, 48)
    for i, t in enumerate(block_inputs):
        at_prompts = t[:, prefix : prefix + P]  # (B, P, C)
        if i == 0 or deep:  # inserted (block 0) / replaced (deep) in eval mode: exactly the block's prompts
            torch.testing.assert_close(at_prompts, prompts[i].expand(2, -1, -1), rtol=0, atol=0)
        else:  # shallow: the prompts travelled through the previous block
            assert not torch.allclose(at_prompts, prompts[0].expand(2, -1, -1))
    if deep:
        assert all(not torch.equal(prompts[i], prompts[j]) for i in range(3) for j in range(i))


def test_vpt_prompt_init_range_and_dropout():
    model, x = micro(), torch.randn(2, 3, 32, 32)
    prepare_model(model, VPT(tokens=50, dropout=1.0))
    v = math.sqrt(6 / (3 * 8**2 + 48))  # VPT: sqrt(6 / (3 * patch^2 + dim))
    prompts = model.vpt.vpt_prompts.detach()
    assert prompts.abs().max() <= v and prompts.abs().max() > 0.95 * v
    seen = record_block_inputs(model)
    model.train()
    model(x)
    assert seen[0][:, 1:51].abs().max() == 0  # dropout acts on the prompts (p=1 zeroes them in training)
    assert seen[0][:, 51:].abs().max() > 0


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_changes_output_and_removal_restores_base(deep):
    model, x = micro(), torch.randn(4, 3, 32, 32)
    base = model(x)
    prepare_model(model, VPT(tokens=4, deep=deep))
    prompted = model(x)
    assert prompted.shape == base.shape
    assert (prompted - base).abs().max() > 1e-4  # VPT is not the base model at step 0
    with torch.no_grad():
        model.vpt.vpt_prompts.add_(torch.randn_like(model.vpt.vpt_prompts))  # (a constant shift: LayerNorm'd away)
    assert (model(x) - prompted).abs().max() > 1e-4  # the pooled cls output depends on the prompts
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    grad = model.vpt.vpt_prompts.grad  # (n, P, C)
    assert grad is not None and all(g.abs().sum() > 0 for g in grad)  # every block's prompts get a gradient
    model.eval()
    remove_prompts(model)
    assert not hasattr(model, "vpt")
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_vpt_works_under_gradient_checkpointing():
    model, x = micro(), torch.randn(2, 3, 32, 32)
    prepare_model(model, VPT(tokens=3, deep=True))
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_vpt_rejects_non_vit_and_double_application():
    with torch.device("meta"):
        convnext = timm.create_model("convnext_atto", num_classes=3)
    with pytest.raises(ValueError, match="VPT needs a plain ViT"):
        prepare_model(convnext, VPT())
    model = micro()
    prepare_model(model, VPT())
    with pytest.raises(ValueError, match="already has prompts"):
        prepare_model(model, VPT())


def test_mlp_head_forward_shape():
    model, x = micro(), torch.randn(4, 3, 32, 32)
    prepare_model(model, MLPHead(k=3))
    assert model(x).shape == (4, 3)


# --- training: frozen weights stay bit-identical, and every method beats chance on digits --------------------

#: the embedded digits task on a small random ViT with JAX-style (Xavier) init: timm's default init (std 0.02)
#: gives near-constant cls features that bias-only methods wash out; the shipped pre-trained weights may be absent
DIGITS = [o for o in TINY if not o.startswith("dataset=")] + [
    "dataset=embedded/digits",
    "++backbone.depth=2",
    "++backbone.embed_dim=48",
    "++backbone.num_heads=4",
    "backbone.drop_path_rate=0",
    "++backbone.weight_init=jax",
    "trainer.max_epochs=2",
    "scheduler.warmup_epochs=0",
    "optimizer.lr=3e-3",
]
c, depth = 48, 2
TRAINABLE: dict[str, tuple[Callable[[str], bool], int]] = {  # method -> (is trainable(name), backbone count)
    "bias": (lambda n: n.endswith("bias") or n.startswith("head."), (11 * depth + 2) * c),
    "partial": (lambda n: n.startswith(("blocks.1.", "norm.", "head.")), 12 * c**2 + 13 * c + 2 * c),
    "mlp_head": (lambda n: n.startswith("head."), 0),
    "blocks": (lambda n: ".attn." in n or n.startswith("head."), depth * (4 * c**2 + 4 * c)),
    "vpt_shallow": (lambda n: n == "vpt.vpt_prompts" or n.startswith("head."), 10 * c),
    "vpt_deep": (lambda n: n == "vpt.vpt_prompts" or n.startswith("head."), depth * 10 * c),
}


@pytest.mark.parametrize("method", list(TRAINABLE))
def test_trains_above_chance_and_frozen_weights_bit_identical(tmp_path: Path, method: str):
    cfg = compose_config(
        DIGITS + [f"method={method}", f"paths.output_dir={tmp_path}/outputs", *full_state_overrides(tmp_path / "f.pt")]
    )
    record = execute(cfg, tmp_path / "run")
    assert record["status"] == "ok", record.get("error")
    assert record["metrics"]["test_acc"] > 0.2 and record["metrics"]["val_acc"] > 0.2  # chance: 0.1 (797 / 200)
    is_trainable, count = TRAINABLE[method]
    assert record["params"]["trainable_backbone"] == count
    _, _, module, _ = build(cfg)
    module.configure_model()  # same seed: the run's pre-trained weights and initial method parameters
    trained = torch.load(tmp_path / "f.pt", weights_only=True)
    for name, p in module.model.named_parameters():
        assert p.requires_grad == is_trainable(name), name
        if p.requires_grad:
            assert not torch.equal(trained[f"model.{name}"], p.detach()), f"trainable {name} did not change"
        else:
            assert torch.equal(trained[f"model.{name}"], p.detach()), f"frozen {name} changed"
