"""Per-head attention outputs of a timm ViT, captured without touching timm internals.

The input of each block's attention output projection (``proj``) is the concatenation of the heads'
outputs, (B, N, H*D) head-major, whether timm's fused SDPA path or the explicit softmax path ran
(timm's ``Attention.forward``). A forward pre-hook on that linear therefore sees every head:

    O[b, n, h, :] = softmax(q_h k_h^T / sqrt(D)) v_h  [b, n, :]       (B, N, H, D) after a view

The linear is addressed through :mod:`peftbench.backbones.anatomy` (``block.linear("proj")``), so this module
knows no timm attribute names; a peftbench wrapper around ``proj`` (LoRA, sparse delta) is hooked the same way
since it receives the same input. Caveat (timm, not HiFi): if an Attention uses ``scale_norm`` or a gate, the
hook sees the normed/gated head outputs, i.e. exactly what ``proj`` consumes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from peftbench.backbones import anatomy


@contextmanager
def capture_heads(
    model: nn.Module, blocks: Sequence[int] | None = None, detach: bool = True
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record per-head outputs of every forward run inside the context.

    Args:
        model: a timm model with attention blocks.
        blocks: block indices (``BlockView.index``) to hook; None = every block with attention.
        detach: store detached tensors (True) or keep the autograd graph (False).

    Yields:
        {block index: [one (B, N, H, D) tensor per forward call, in call order]}; filled as forwards run.
        Hooks are removed on exit (also on error).
    """
    views = [b for b in anatomy.blocks(model) if b.attn is not None]
    if blocks is not None:
        wanted = set(blocks)
        views = [b for b in views if b.index in wanted]
    captured: dict[int, list[torch.Tensor]] = {b.index: [] for b in views}
    handles = []

    def make_hook(block: anatomy.BlockView):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # (B, N, H*D): heads concatenated head-major (h*D + d)
            out = x.view(*x.shape[:-1], block.num_heads, block.head_dim)  # (B, N, H, D)
            captured[block.index].append(out.detach() if detach else out)

        return hook

    try:
        for b in views:
            handles.append(b.linear("proj").register_forward_pre_hook(make_hook(b)))
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def head_outputs(model: nn.Module, x: torch.Tensor, blocks: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """Per-head outputs of one forward pass on ``x`` (B, 3, H, W): {block index: (B, N, H, D)}.

    Runs the model as it is (train/eval mode untouched; call it inside ``model.eval()`` for deterministic
    outputs). No gradients.
    """
    with capture_heads(model, blocks) as captured:
        model(x)
    return {i: outs[0] for i, outs in captured.items() if outs}
