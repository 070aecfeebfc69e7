"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685) on any of q, k,
v, proj, fc1, fc2 of every block.

Trainable backbone parameters = sum over blocks and targets of r * (d_in + d_out_target); with the default
(r=8 on q and v of ViT-B/16): 12 x 2 x (768 x 8 + 8 x 768) = 294,912. q/k/v deltas act on their rows of
timm's fused qkv (one LoRALinear per qkv holding a row group per target).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import check_range
from peftbench.layers.lora import LoRALinear
from peftbench.methods.base import Method, State, freeze


class LoRA(Method):
    """Low-rank deltas on the chosen linear targets; B is zero-initialised so step 0 equals the base model.

    Args:
        rank: r.
        targets: any of q, k, v, proj, fc1, fc2.
        scale: s, the multiplier of the delta (FacT/Bi-LoRA's s; searched over {0.01, 0.1, 1, 10, 100}).
        alpha: if set, scale = alpha / rank (the LoRA paper's convention) and ``scale`` is ignored.
        dropout: dropout on the adapter input.
        fused_qkv: when q, k and v are all targeted, one rank-r adapter spans the whole fused qkv output (HF peft's
            LoRA on timm's ``qkv`` Linear: r x (C + 3C) per block) instead of one rank-r adapter per target.
    """

    reparameterisable = True

    def __init__(
        self,
        rank: int = 8,
        targets: Sequence[str] = ("q", "v"),
        scale: float = 1.0,
        alpha: float | None = None,
        dropout: float = 0.0,
        fused_qkv: bool = False,
    ) -> None:
        check_range("method.rank", rank, 1, integer=True)
        check_range("method.dropout", dropout, 0.0, 1.0)
        self.rank, self.targets, self.dropout, self.fused_qkv = int(rank), tuple(targets), float(dropout), fused_qkv
        self.scale = float(alpha) / self.rank if alpha is not None else float(scale)

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        by_layer: dict[str, tuple[anatomy.BlockView, list[str]]] = {}
        for block, target in anatomy.iter_linear_targets(model, self.targets):
            by_layer.setdefault(block.linear_path(target), (block, []))[1].append(target)
        for block, targets in by_layer.values():
            rows = [block.rows(t) for t in targets]
            if rows == [None] or (self.fused_qkv and set(targets) == {"q", "k", "v"}):
                rows = None
            block.set_linear(targets[0], self.make_layer(block.linear(targets[0]), rows))

    def make_layer(self, base_layer: nn.Module, rows: list | None) -> nn.Module:
        """The tuner layer wrapping ``base_layer`` for the given row groups (None = all rows)."""
        return LoRALinear(base_layer, self.rank, rows, scale=self.scale, dropout=self.dropout)
