"""Per-head attention outputs (peftbench.backbones.heads) against a manual softmax(q k^T / sqrt(D)) v, fused on and
off."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy
from peftbench.backbones.heads import capture_heads, head_outputs


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=3).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_heads_match_manual_attention(fused):
    model = tiny_vit()
    views = anatomy.blocks(model)
    attn_in: dict[int, torch.Tensor] = {}
    attn_out: dict[int, torch.Tensor] = {}
    hooks = []
    for b in views:
        b.attn.fused_attn = fused  # timm's switch between SDPA and the explicit softmax path
        hooks.append(b.attn.register_forward_pre_hook(lambda m, a, i=b.index: attn_in.__setitem__(i, a[0])))
        hooks.append(b.attn.register_forward_hook(lambda m, a, o, i=b.index: attn_out.__setitem__(i, o)))
    x = torch.randn(2, 3, 32, 32)
    out = head_outputs(model, x)
    for h in hooks:
        h.remove()
    assert sorted(out) == [b.index for b in views]
    for b in views:
        H, D = b.num_heads, b.head_dim
        xin = attn_in[b.index]  # (B, N, C)
        B, N, C = xin.shape
        qkv = b.linear("q")(xin).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k, v = qkv[0], qkv[1], qkv[2]
        manual = torch.softmax(q @ k.transpose(-2, -1) / D**0.5, dim=-1) @ v  # (B, H, N, D)
        got = out[b.index]
        assert got.shape == (B, N, H, D)
        torch.testing.assert_close(got, manual.permute(0, 2, 1, 3), atol=1e-5, rtol=1e-5)
        # and the captured tensor is exactly what proj consumes
        torch.testing.assert_close(b.linear("proj")(got.flatten(2)), attn_out[b.index], atol=1e-6, rtol=1e-6)


def test_hooks_removed_and_calls_recorded():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), capture_heads(model, blocks=[1]) as cap:
        model(x)
        model(x)
    assert list(cap) == [1] and len(cap[1]) == 2
    for b in anatomy.blocks(model):
        assert not b.linear("proj")._forward_pre_hooks
