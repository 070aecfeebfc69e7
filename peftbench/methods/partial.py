"""Partial-k (the partial fine-tuning baseline of VPT, Jia et al. 2022): train the last k blocks and the head.

The final norm (after the last block) trains too: it belongs to the top of the network and only ever sees the
tuned blocks' output. Blocks are counted in forward order over the whole model (for Swin: the last k blocks of
the last stages, not the patch-merging layers in between).

Trainable backbone parameters on a ViT of width C (MLP ratio 4, biases everywhere) =
    k x (12C^2 + 13C)  [qkv 3C^2+3C, proj C^2+C, fc1 4C^2+4C, fc2 4C^2+C, norm1/norm2 2C each]  +  2C (final norm);
ViT-B/16, k=1: 7,087,872 + 1,536 = 7,089,408 (8.2628 % of 85,798,656).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.methods.base import Method, State, freeze


class Partial(Method):
    """Train the last ``k`` blocks (and the final norm) in full; everything before them stays frozen.

    Args:
        k: number of top blocks to train, 1 <= k <= depth.
    """

    reparameterisable = True

    def __init__(self, k: int = 1) -> None:
        self.k = int(k)

    def select(self, model: nn.Module, scores: Any) -> State:
        depth = len(anatomy.blocks(model))
        if not 1 <= self.k <= depth:
            raise ConfigError(f"partial: k must be in [1, {depth}] (the depth), got {self.k} (k=0 is method=linear)")
        return {"blocks": list(range(depth - self.k, depth))}

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        views = anatomy.blocks(model)
        for i in state["blocks"]:
            views[int(i)].module.requires_grad_(True)
        norm = anatomy.final_norm(model)
        if norm is not None:
            norm.requires_grad_(True)

    def describe(self, state: State) -> dict[str, Any]:
        return {"blocks": [int(i) for i in state["blocks"]]}
