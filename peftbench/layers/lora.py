"""LoRA on a frozen nn.Linear, optionally on a subset of its output rows (q and v inside a fused qkv).

    y = base_layer(x);  y[..., rows_g] += scale * dropout(x) @ A_g^T @ B_g^T   for each row group g

``B`` is zero-initialised, so at step 0 the wrapped layer computes exactly what the base layer computes.
Trainable parameters are prefixed ``lora_``; ``merge()`` folds the delta into the base weight and
``unmerge()`` takes it out again.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftbench.errors import ConfigError, check_range
from peftbench.layers.base import MATRIX, MergeableWrapper


class LoRALinear(MergeableWrapper):
    """A LoRA adapter around ``base_layer`` acting on ``len(row_groups)`` equally sized groups of output rows.

    Args:
        base_layer: the frozen nn.Linear(in, out) being adapted.
        rank: LoRA rank r.
        row_groups: one index tensor per group (e.g. the q rows and the v rows of qkv); None = all rows.
        scale: multiplier s of the delta (``alpha / r`` in the LoRA paper's notation).
        dropout: dropout on the adapter's input (Bi-LoRA/FacT use 0.1).
    """

    param_roles = {"lora_A": MATRIX, "lora_B": MATRIX}  # factors of the weight delta

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        row_groups: list[torch.Tensor] | None = None,
        scale: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_range("dropout", dropout, 0.0, 1.0)
        self.base_layer = base_layer
        self.rank, self.scale = rank, float(scale)
        n_in, n_out = base_layer.in_features, base_layer.out_features
        if row_groups is None:
            groups, out_g, rows = 1, n_out, None
        else:
            sizes = {len(g) for g in row_groups}
            if len(sizes) != 1:
                raise ConfigError(f"LoRA row groups must have equal sizes, got {sorted(sizes)}")
            groups, out_g = len(row_groups), sizes.pop()
            rows = torch.cat([g.long() for g in row_groups])  # (groups*out_g,)
        # a rank above min(in, out) adds parameters but no expressiveness (and rank 1e5 would allocate gigabytes)
        check_range("rank", rank, 1, min(n_in, out_g), integer=True)
        self.register_buffer("lora_rows", rows, persistent=rows is not None)
        dev, dtype = base_layer.weight.device, base_layer.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(groups, rank, n_in, device=dev, dtype=dtype))  # (G, r, in)
        self.lora_B = nn.Parameter(torch.zeros(groups, out_g, rank, device=dev, dtype=dtype))  # (G, out_g, r)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as HF peft and the LoRA reference code
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors the forward uses: A (G, r, in), B (G, out_g, r). Subclasses transform them (Bi-LoRA)."""
        return self.lora_A, self.lora_B

    def hidden(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The rank-r hidden of every group, (..., G, r), from the input (..., in); dropout on the input."""
        return (self.lora_dropout(x) @ a.flatten(0, 1).T).unflatten(-1, a.shape[:2])

    def delta_weight(self) -> torch.Tensor:
        """The dense weight delta (out, in) this adapter adds."""
        a, b = self.factors()
        dw = torch.bmm(b, a).flatten(0, 1) * self.scale  # (G*out_g, in)
        if self.lora_rows is None:
            return dw
        full = torch.zeros_like(self.base_layer.weight)  # (out, in)
        return full.index_add(0, self.lora_rows, dw.to(full.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out)
        return out if self.merged else self.add_delta(x, out)

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (..., out) plus this adapter's delta for input ``x`` (..., in), on its rows."""
        a, b = self.factors()
        d = torch.einsum("...gr,gor->...go", self.hidden(x, a), b).flatten(-2) * self.scale  # (..., G*out_g)
        if self.lora_rows is None:
            return out + d
        return out.index_add(-1, self.lora_rows, d.to(out.dtype))

    def extra_repr(self) -> str:
        groups, rank, n_in = self.lora_A.shape
        return f"rank={rank}, groups={groups}, in={n_in}, out_per_group={self.lora_B.shape[1]}, scale={self.scale}"
