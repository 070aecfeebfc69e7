"""SPT sensitivity scorer: equals brute-force loops, is pure, deterministic, and scores the right candidates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy
from peftbench.scorers.sensitivity import Sensitivity


def micro(seed: int = 0, drop_path: float = 0.1) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=3, drop_path_rate=drop_path
    ).eval()


def data(n: int = 6, bs: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)
    return list(zip(x.split(bs), y.split(bs)))


def expected(model: torch.nn.Module, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map accumulated per-parameter squares onto the scorer's keys (q/k/v row slices of qkv)."""
    out = {}
    for b in anatomy.blocks(model):
        for t in anatomy.TARGETS:
            name = f"{b.linear_path(t)}.weight"
            rows = b.rows(t)
            out[f"{name}:{t}" if rows is not None else name] = grads[name] if rows is None else grads[name][rows]
    return out


def brute(model: torch.nn.Module, batches, per_sample: bool, train: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    torch.manual_seed(seed)
    model.train(train)
    units = [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(len(x))] if per_sample else batches
    for x, y in units:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad.square()
    model.zero_grad(set_to_none=True)
    model.eval()
    return acc


def test_per_sample_equals_loop_over_single_samples():
    model, batches = micro(drop_path=0.0), data()
    scores = Sensitivity(mode="per_sample", model_mode="eval", chunk_size=2)(model, batches)
    ref = brute(model, batches, per_sample=True, train=False)
    exp = expected(model, ref)
    for k, v in exp.items():
        torch.testing.assert_close(scores[k], v, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scores["blocks.0.norm1.weight"], ref["blocks.0.norm1.weight"], rtol=1e-4, atol=1e-9)


def test_per_batch_equals_manual_loop_with_drop_path_active():
    model, batches = micro(), data()
    scores = Sensitivity(mode="per_batch", model_mode="train", seed=3)(model, batches)
    ref = brute(model, batches, per_sample=False, train=True, seed=3)  # same seed: same drop-path draws
    for k, v in expected(model, ref).items():
        torch.testing.assert_close(scores[k], v, rtol=1e-4, atol=1e-9)
    assert not torch.equal(
        scores["blocks.0.mlp.fc1.weight"],
        Sensitivity(mode="per_batch", model_mode="eval")(model, batches)["blocks.0.mlp.fc1.weight"],
    )  # drop-path matters


def test_candidates_shapes_and_exclusions():
    model = micro()
    scores = Sensitivity()(model, data(3, 3))
    assert scores["blocks.1.attn.qkv.weight:v"].shape == (24, 24)
    assert scores["blocks.1.mlp.fc1.weight"].shape == (96, 24)
    assert "blocks.1.attn.qkv.bias" in scores and "norm.weight" in scores
    for k in scores:
        assert not k.startswith(("head", "cls_token", "pos_embed", "patch_embed")), k
    assert "patch_embed.proj.weight" in Sensitivity(exclude=("class_token",))(model, data(3, 3))  # a role kept
    with pytest.raises(ValueError, match="unknown role"):
        Sensitivity(exclude=("blocks",))


@pytest.mark.parametrize("mode", ["per_batch", "per_sample"])
def test_scorer_is_pure_and_deterministic(mode):
    model, batches = micro(), data()
    model.train()
    model.blocks[0].eval()  # a mixed mode the scorer must restore
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("blocks.1"))
    model.head.weight.grad = torch.ones_like(model.head.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    scorer = Sensitivity(mode=mode, model_mode="train", chunk_size=4)
    a, b = scorer(model, batches), scorer(model, batches)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG untouched
