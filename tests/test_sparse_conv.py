"""SparseDeltaConv2d and the patch embedding seen as a matrix: exact W0 + scatter(delta), frozen entries, merge."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy
from peftbench.layers.sparse import SparseDeltaConv2d


def conv_and_indices(seed: int = 0) -> tuple[torch.nn.Conv2d, torch.Tensor]:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 6, kernel_size=4, stride=4)  # a patch embedding: 6 x 48 matrix per 4x4 patch
    conv.requires_grad_(False)
    return conv, torch.randperm(conv.weight.numel())[:20]


def test_patch_embedding_matrix_is_the_conv_per_flattened_patch():
    """The (C, 3*P*P) view applied to each flattened patch equals timm's patch embedding, flat indices shared."""
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=12, depth=1, num_heads=2, num_classes=3)
    assert anatomy.patch_embedding_path(model) == "patch_embed.proj"
    conv = anatomy.patch_embedding(model)
    w = anatomy.patch_embedding_matrix(conv.weight)  # (12, 3 * 8 * 8)
    assert w.shape == (12, 192) and w.data_ptr() == conv.weight.data_ptr()
    x = torch.randn(2, 3, 16, 16)
    patches = F.unfold(x, kernel_size=8, stride=8)  # (B, 3*8*8, L): channel-major, as the weight's flattening
    expected = (w @ patches + conv.bias[:, None]).transpose(1, 2)  # (B, L, 12)
    torch.testing.assert_close(model.patch_embed(x), expected, rtol=1e-5, atol=1e-5)
    assert anatomy.patch_embedding_path(torch.nn.Linear(2, 2)) is None


def test_identity_at_init_forward_and_gradient_match_the_dense_formulation():
    conv, idx = conv_and_indices()
    sparse = SparseDeltaConv2d(conv, idx)
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(sparse(x), conv(x))
    with torch.no_grad():
        sparse.sparse_delta.normal_()
    dense = conv.weight.flatten().clone()
    dense[sparse.sparse_indices] += sparse.sparse_delta.detach()
    w = dense.view_as(conv.weight).requires_grad_(True)
    ref = F.conv2d(x, w, conv.bias, stride=4)
    torch.testing.assert_close(sparse(x), ref, rtol=0, atol=1e-6)
    sparse(x).square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(sparse.sparse_delta.grad, w.grad.flatten()[sparse.sparse_indices])
    assert [n for n, p in sparse.named_parameters() if p.requires_grad] == ["sparse_delta"]


def test_adamw_leaves_unselected_entries_bit_identical_and_merge_round_trips():
    conv, idx = conv_and_indices(1)
    w0 = conv.weight.detach().clone()
    sparse = SparseDeltaConv2d(conv, idx)
    opt = torch.optim.AdamW([sparse.sparse_delta], lr=1e-2, weight_decay=0.1)
    x = torch.randn(3, 3, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        sparse(x).sum().backward()
        opt.step()
    out = sparse(x)
    sparse.merge()
    merged = conv.weight.detach().flatten()
    keep = torch.ones(w0.numel(), dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(merged[keep], w0.flatten()[keep]) and not torch.equal(merged[~keep], w0.flatten()[~keep])
    torch.testing.assert_close(sparse(x), out, rtol=1e-5, atol=1e-6)
    sparse.unmerge()
    torch.testing.assert_close(conv.weight, w0, rtol=0, atol=1e-6)
