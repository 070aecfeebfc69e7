"""Bi-LoRA (Jie, Wang and Deng, "Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision
Redundancy", ICCV 2023, arXiv:2307.16867): LoRA on q and v whose factors are binarised to 1 bit in the forward.

Training keeps float latent factors (trained through a straight-through estimator, see
:mod:`peftbench.layers.binary_lora`); what is stored is 1 bit per factor weight plus a float32 scale (and,
for the ``gaussian`` quantizer, an offset) per matrix. As in the authors' code each target has its own A and
B, the delta is scaled by s, dropout 0.1 acts on the rank-r hidden (their code, not on the adapter's input), and
B starts trunc-normal with std 1e-3, so the step-0 delta is small, not 0 (``init=zeros`` gives an exact identity
instead).

Trainable backbone parameters = sum over blocks and targets of r * (C + C) (float latents, as LoRA);
ViT-B/16, r = 32 on q and v: 12 x 2 x (768*32 + 32*768) = 1,179,648 (1.375% of 85,798,656).
Stored bytes = sum over adapted matrices of (numel / 8 + 4 * k), k = 2 (gaussian: mean and std, as the authors
store them) or 1 (mean_abs); ViT-B/16, r = 32, q and v: 1,179,648 / 8 + 8 * 48 = 147,840 bytes (mean_abs: 147,648).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.layers.binary_lora import BinaryLoRALinear
from peftbench.methods.lora import LoRA


class BiLoRA(LoRA):
    """1-bit LoRA; merge/unmerge fold the binarised delta s * B_b A_b into the frozen weight.

    Args:
        rank: r (32 in the paper).
        targets: any of q, k, v, proj, fc1, fc2 (q and v in the paper).
        scale: s, searched per dataset over {0.01, 0.1, 1, 10, 100} in the authors' setup.
        dropout: dropout on the rank-r hidden.
        init: ``trunc_normal`` (authors) or ``zeros`` (exact identity at step 0).
        quantizer: ``gaussian`` (the authors' mean + 0.674 std code, gradient through the live statistics) or
            ``mean_abs`` (scale mean|W|, identity straight-through).
    """

    def __init__(
        self,
        rank: int = 32,
        targets: Sequence[str] = ("q", "v"),
        scale: float = 1.0,
        dropout: float = 0.1,
        init: str = "trunc_normal",
        quantizer: str = "gaussian",
    ) -> None:
        super().__init__(rank=rank, targets=targets, scale=scale, dropout=dropout)
        self.init, self.quantizer = init, quantizer

    def make_layer(self, base_layer: nn.Module, rows: list | None) -> nn.Module:
        return BinaryLoRALinear(
            base_layer, self.rank, rows, scale=self.scale, dropout=self.dropout, init=self.init,
            quantizer=self.quantizer,
        )


def pack(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The 1-bit storage of every Bi-LoRA layer, keyed by module path."""
    return {name: m.pack() for name, m in model.named_modules() if isinstance(m, BinaryLoRALinear)}


def load_packed(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]]) -> None:
    """Make every Bi-LoRA layer of ``model`` (prepared with the same config) compute with the packed factors."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BinaryLoRALinear)}
    if set(layers) != set(packed):
        raise ConfigError(f"packed Bi-LoRA layers {sorted(packed)} do not match the model's {sorted(layers)}")
    for name, layer in layers.items():
        layer.load_packed(packed[name])


def packed_bytes(packed: dict[str, dict[str, torch.Tensor]]) -> int:
    """Bytes of the packed storage: sign bits plus scales (and offsets)."""
    return sum(t.numel() * t.element_size() for entry in packed.values() for t in entry.values())
