"""SPT-Adapter (He et al., ICCV 2023): sensitivity-aware allocation of adapters and unstructured sparse deltas.

The allocation is :class:`~peftbench.methods.spt_lora.SPT`'s. The structured module of a sensitive matrix is a
bottleneck adapter of hidden width n (8, following NOAH as the paper does) on THAT matrix's output: "inserting an
adapter module sequentially after the sensitive weight matrices" (paper Sec. 3.2), as the authors' sequential
block does (``BlockSPTSeq``): q, k, v each get an adapter C -> n -> C on their C outputs before attention (slices
of the fused qkv), fc1 one 4C -> n -> 4C on its output before the GELU, fc2 one C -> n -> C on its output. One
adapter per sensitive matrix: 2*d*n + n + d parameters (d = that matrix's output width, biases on both
projections as the authors' ``--structured_vector`` runs), so the threshold is that count / alpha.

proj: the authors' sequential block feeds proj's adapter with proj's INPUT (the attention output, no dropout)
and adds it to proj's output, a parallel branch of the same size; ``proj_adapter: parallel`` (default) does
that, ``sequential`` puts it on proj's output as the paper's sentence says.
Dropout ``dropout`` on each adapter's input (authors' code: 0.1; none on proj's). Not reparameterisable.
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.layers.adapter import Bottleneck, ParallelAdapter, SliceAdapter
from peftbench.layers.sparse import SparseDeltaLinear
from peftbench.methods.spt_lora import SPT

PROJ_ADAPTERS = ("parallel", "sequential")


class SPTAdapter(SPT):
    """SPT with one bottleneck adapter on the output of each structured matrix.

    Args:
        n: adapter hidden width.
        act: activation inside the adapter (the authors': GELU).
        proj_adapter: ``parallel`` (authors' code: from proj's input, added to its output) or ``sequential``.
        (others: :class:`~peftbench.methods.spt_lora.SPT`.)
    """

    reparameterisable = False

    def __init__(self, n: int = 8, act: str = "gelu", proj_adapter: str = "parallel", **kwargs) -> None:
        super().__init__(**kwargs)
        if proj_adapter not in PROJ_ADAPTERS:
            raise ConfigError(f"proj_adapter must be one of {PROJ_ADAPTERS}, got {proj_adapter!r}")
        self.n, self.act, self.proj_adapter = int(n), act, proj_adapter

    @property
    def name(self) -> str:
        return "spt_adapter"

    @staticmethod
    def width(block: anatomy.BlockView, target: str) -> int:
        """Output width d of ``target``'s matrix (q/k/v: C rows of the fused qkv; fc1: 4C)."""
        rows = block.rows(target)
        return len(rows) if rows is not None else block.linear(target).weight.shape[0]

    def structured_params(self, block: anatomy.BlockView, target: str) -> int:
        d = self.width(block, target)
        return 2 * d * self.n + self.n + d  # down (n, d) + b (n) + up (d, n) + b (d)

    def make_layer(
        self, block: anatomy.BlockView, layer: nn.Module, chosen: list[str], indices: torch.Tensor | None
    ) -> nn.Module | None:
        if indices is not None and indices.numel():
            layer = SparseDeltaLinear(layer, indices)  # entries of this linear's unstructured matrices
        if not chosen:
            return layer if isinstance(layer, SparseDeltaLinear) else None
        w = layer.weight
        adapters = [Bottleneck(self.width(block, t), self.n, self.act, device=w.device, dtype=w.dtype) for t in chosen]
        if chosen == ["proj"] and self.proj_adapter == "parallel":
            return ParallelAdapter(layer, adapters[0], scale=1.0)  # y = proj(x) + adapter(x), as the authors'
        return SliceAdapter(layer, adapters, [block.rows(t) for t in chosen], dropout=self.branch_dropout(chosen[0]))
