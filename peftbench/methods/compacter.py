"""PHM-Adapter and Compacter (Karimi Mahabadi, Henderson and Ruder, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers", NeurIPS 2021, arXiv:2106.04647): adapters whose down/up are PHM layers.

Both are :class:`~peftbench.methods.adapter.Adapter` (same placement, hidden width n or C / sigma, activation,
zero step-0 delta) with each projection W = sum_{i=1..k} A_i ⊗ B_i (k = ``phm_dim``, A_i: k x k):

* PHM-Adapter: A_i and B_i are free in every PHM layer. Per adapter: 2 k^3 + 2 n C / k + n + C.
* Compacter: one set {A_i} (k^3) shared by every layer (down and up of all adapters), B_i = s_i t_i^T of
  rank 1. Per adapter: (n + C) for down + (C + n) for up + (n + C) biases = 3 (n + C); plus k^3 once.

Placement ``mlp`` (the default) is Compacter++'s; ``both`` is Compacter's / Houlsby's. The up-projection's
B (PHM) or s (Compacter) and its bias start at zero, so step 0 equals the pre-trained model.
ViT-B/16 (12 blocks, C = 768), n = 8, k = 4, placement mlp:
  PHM-Adapter: 12 x (2*64 + 2*8*768/4 + 8 + 768) = 47,712 (0.0556% of 85,798,656)
  Compacter:   12 x 3 x (8 + 768) + 64             = 28,000 (0.0326%)
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.layers.adapter import Bottleneck
from peftbench.layers.phm import PHMLinear, new_rule
from peftbench.methods.adapter import Adapter
from peftbench.methods.base import State


class PHMAdapter(Adapter):
    """Adapters with PHM down/up projections, every A_i and B_i free per layer.

    Args:
        phm_dim: k, the number of Kronecker terms; must divide C and the hidden width.
        n, sigma, placement, act, dropout: as :class:`Adapter`.
    """

    #: rank of B_i = s_i t_i^T (None: full B_i)
    rank: int | None = None

    def __init__(
        self,
        phm_dim: int = 4,
        n: int = 8,
        sigma: float | None = None,
        placement: str = "mlp",
        act: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(n=n, sigma=sigma, placement=placement, act=act, dropout=dropout)
        self.phm_dim = int(phm_dim)
        self.shared_rule: nn.Parameter | None = None

    def bottleneck(self, width: int, device: torch.device, dtype: torch.dtype) -> Bottleneck:
        n, k, rule = self.hidden(width), self.phm_dim, self.shared_rule
        factory = dict(rule=rule, rank=self.rank, device=device, dtype=dtype)
        down = PHMLinear(width, n, k, **factory)  # (n, C) = sum_i A_i ⊗ B_i
        up = PHMLinear(n, width, k, zero=True, **factory)  # (C, n), zero at step 0
        return Bottleneck(width, n, self.act, self.dropout, down=down, up=up)


class Compacter(PHMAdapter):
    """PHM adapters with a rule {A_i} shared across all layers and rank-1 B_i = s_i t_i^T."""

    rank = 1

    def apply(self, model: nn.Module, state: State) -> None:
        weight = next(model.parameters())
        self.shared_rule = new_rule(self.phm_dim, weight.device, weight.dtype)  # one (k, k, k) per model
        super().apply(model, state)
