"""Compact LoRA (CDRA-SPT, Chen et al., CVPR 2025): LoRA on sub-matrices (rows R x cols K) of a frozen nn.Linear.

    W = W0 + scatter(delta) + sum_b scatter_{R_b x K_b}(scale * B_b @ A_b)
    y = x @ W^T + b,  computed as  y = F.linear(x, W0 + scatter(delta), b);
                                   y[..., R_b] += scale * x[..., K_b] @ A_b^T @ B_b^T   (per block b)

Each block b adapts the sub-matrix W[R_b][:, K_b] (|R_b| x |K_b|) with its own rank r_b: A_b (r_b, |K_b|),
B_b (|R_b|, r_b). B is zero-initialised, so step 0 equals the base layer. Rows are output rows and cols input
columns of the torch (out, in) weight (the paper's Alg. 1 writes x @ w with w (in, out), i.e. transposed).
A block over all rows of a q/k/v slice and all columns is plain LoRA on that slice (SPT's Case 2 when CDRA is
ablated off). An optional sparse delta (SPT's unstructured entries) shares the layer, as in SparseLoRALinear.
``merge()`` folds everything into the base weight; ``unmerge()`` takes it out again.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.layers.base import MATRIX, MergeableWrapper
from peftbench.layers.sparse import _SparseDelta


class CompactLoRALinear(_SparseDelta, MergeableWrapper):
    """A frozen nn.Linear plus LoRA blocks on sub-matrices and an optional sparse delta.

    Args:
        base_layer: the frozen nn.Linear(in, out).
        blocks: one ``(rows, cols, rank)`` per adapted sub-matrix: rows (|R|,) output-row indices, cols (|K|,)
            input-column indices, rank >= 1.
        indices: (nnz,) unique flat indices ``row * in + col`` of sparse entries (None/empty = none).
        scale: multiplier s of every block's delta.
    """

    param_roles = {"lora_A": MATRIX, "lora_B": MATRIX, "sparse_delta": MATRIX}

    def __init__(
        self,
        base_layer: nn.Linear,
        blocks: list[tuple[torch.Tensor, torch.Tensor, int]],
        indices: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale = float(scale)
        w = base_layer.weight  # (out, in)
        self.lora_A = nn.ParameterList()  # [(r_b, |K_b|)]
        self.lora_B = nn.ParameterList()  # [(|R_b|, r_b)]
        for i, (rows, cols, rank) in enumerate(blocks):
            rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
            if rank < 1 or rows.numel() == 0 or cols.numel() == 0:
                raise ConfigError(f"compact LoRA block {i} needs rank >= 1 and non-empty rows/cols")
            if int(rows.max()) >= w.shape[0] or int(cols.max()) >= w.shape[1] or min(rows.min(), cols.min()) < 0:
                raise ConfigError(f"compact LoRA block {i} indexes outside the ({w.shape[0]}, {w.shape[1]}) weight")
            self.register_buffer(f"rows_{i}", rows.to(w.device))  # (|R_b|,)
            self.register_buffer(f"cols_{i}", cols.to(w.device))  # (|K_b|,)
            a = nn.Parameter(torch.empty(int(rank), cols.numel(), device=w.device, dtype=w.dtype))  # (r, |K|)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoRALinear
            self.lora_A.append(a)
            self.lora_B.append(nn.Parameter(torch.zeros(rows.numel(), int(rank), device=w.device, dtype=w.dtype)))
        self.has_sparse = indices is not None and torch.as_tensor(indices).numel() > 0
        self._init_sparse(indices if self.has_sparse else torch.zeros(0, dtype=torch.long))
        if not self.has_sparse:
            self.sparse_delta.requires_grad_(False)  # an empty (0,) placeholder: nothing to train
        self.merged = False

    def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """[(rows (|R|,), cols (|K|,), A (r, |K|), B (|R|, r))] per block."""
        return [
            (getattr(self, f"rows_{i}"), getattr(self, f"cols_{i}"), a, b)
            for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B))
        ]

    def delta_weight(self) -> torch.Tensor:
        """The dense weight delta (out, in): every block's scale * B @ A at rows x cols, plus the sparse entries."""
        full = self.sparse_dense_delta()  # (out, in), zeros when there is no sparse delta
        for rows, cols, a, b in self.blocks():
            full = full.index_put((rows[:, None], cols[None, :]), (b @ a).to(full.dtype) * self.scale, accumulate=True)
        return full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        out = self.sparse_linear(x) if self.has_sparse else self.base_layer(x)  # (..., out)
        for rows, cols, a, b in self.blocks():
            d = (x.index_select(-1, cols) @ a.T) @ b.T * self.scale  # (..., |K|) -> (..., r) -> (..., |R|)
            out = out.index_add(-1, rows, d.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{b.shape[0]}x{a.shape[1]}@r{a.shape[0]}" for _, _, a, b in self.blocks())
        return f"blocks=[{shapes}], nnz={self.nnz}, in={self.in_features}, out={self.out_features}, scale={self.scale}"
