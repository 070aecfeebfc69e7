"""Att-blocks / MLP-blocks (TINA's baselines): train every attention, or every MLP, sub-block in full.

``part=attn`` trains each block's attention module (qkv and output projection, with biases; Swin also its
relative position bias table); ``part=mlp`` each block's MLP (fc1, fc2). The norms in front of them stay frozen.

Trainable backbone parameters on a ViT of width C and depth L (MLP ratio 4, biases everywhere):
    attn: L x (4C^2 + 4C)  -> ViT-B/16: 12 x 2,362,368 = 28,348,416 (33.0406 % of 85,798,656)
    mlp:  L x (8C^2 + 5C)  -> ViT-B/16: 12 x 4,722,432 = 56,669,184 (66.0490 % of 85,798,656)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.methods.base import Method, State, freeze

PARTS = ("attn", "mlp")


class Blocks(Method):
    """Train one kind of sub-block (attention or MLP) in every block.

    Args:
        part: ``attn`` or ``mlp``.
    """

    reparameterisable = True

    def __init__(self, part: str = "attn") -> None:
        if part not in PARTS:
            raise ConfigError(f"blocks: part must be one of {list(PARTS)}, got {part!r}")
        self.part = part

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        for block in anatomy.blocks(model):
            module = block.attn if self.part == "attn" else block.mlp
            if module is None:
                raise ConfigError(f"blocks: {block.path} has no {self.part} sub-block (e.g. ConvNeXt has no attention)")
            module.requires_grad_(True)

    def describe(self, state: State) -> dict[str, Any]:
        return {"part": self.part}
