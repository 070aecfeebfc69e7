"""Bottleneck adapters (Houlsby et al., 2019; AdaptFormer, Chen et al., 2022) around a frozen module.

    Bottleneck:        r = up(dropout(act(down(x))))        down: Linear(n_in -> n), up: Linear(n -> n_in)
    SequentialAdapter: y = h + r(h),       h = base_layer(x)   (Houlsby: after a sub-layer's output projection)
    ParallelAdapter:   y = base_layer(x) + s * r(x)            (AdaptFormer: a scaled branch beside the MLP)
    SliceAdapter:      y = h,  y[..., rows_g] += r_g(drop(h[..., rows_g]))   (SPT-Adapter: one bottleneck per
                       output slice of one linear, e.g. q, k, v of a fused qkv, or the whole output of fc1 / fc2)

``up`` is zero-initialised (weight and bias), so at step 0 every wrapper computes exactly what its base layer
computes. ``down`` keeps nn.Linear's default (Kaiming-uniform) weight with a zero bias, AdaptFormer's "lora"
init. A bottleneck holds n_in*n + n + n*n_in + n_in parameters with Linear projections; TINA prunes its hidden
neurons (rows of ``down``, columns of ``up``). Trainable parameters live under the wrapper's ``adapter.`` prefix.
"""

from __future__ import annotations

import torch
from timm.layers import QuickGELU
from torch import nn

from peftbench.errors import ConfigError
from peftbench.layers.base import BaseLayerWrapper

# quick_gelu: x * sigmoid(1.702 x), the activation of NOAH's adapter (whose numbers SPT's Adapter rows cite)
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}


class Bottleneck(nn.Module):
    """r = up(dropout(act(down(x)))): (..., n_in) -> (..., n_in) through a hidden width n.

    Args:
        n_in: input (and output) width.
        n: hidden width (n >= 0; 0 is an adapter pruned away, which adds only ``up``'s bias).
        act: one of gelu, quick_gelu, relu, silu, identity.
        dropout: dropout on the hidden activations.
        down, up: replacement projections (e.g. PHM layers); the defaults are nn.Linear, ``up`` zero-initialised.
            A replacement ``up`` must itself be zero at init for the identity at step 0.
        device, dtype: where the default projections are created.
    """

    def __init__(
        self,
        n_in: int,
        n: int,
        act: str = "gelu",
        dropout: float = 0.0,
        down: nn.Module | None = None,
        up: nn.Module | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if n < 0:
            raise ConfigError(f"adapter hidden width must be >= 0, got {n}")
        if act not in ACTIVATIONS:
            raise ConfigError(f"unknown adapter activation {act!r}; choose from {sorted(ACTIVATIONS)}")
        self.n_in, self.n = n_in, n
        if down is None:
            down = nn.Linear(n_in, n, device=device, dtype=dtype)  # weight (n, n_in): Kaiming-uniform default
            nn.init.zeros_(down.bias)
        if up is None:
            up = nn.Linear(n, n_in, device=device, dtype=dtype)  # weight (n_in, n)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.down, self.up = down, up
        self.act = ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))  # (..., n_in) -> (..., n) -> (..., n_in)

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n={self.n}"


class SequentialAdapter(BaseLayerWrapper):
    """y = h + adapter(h) with h = base_layer(x) (Houlsby placement: on a sub-layer's output, inside its residual).

    Args:
        base_layer: the frozen module (attention ``proj`` or MLP ``fc2``), output width = ``adapter.n_in``.
        adapter: the bottleneck.
    """

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # (..., C)
        return h + self.adapter(h)


class ParallelAdapter(BaseLayerWrapper):
    """A branch beside a block's MLP (AdaptFormer):

        y = base_layer(x) + scale * adapter(x)                               residual None

    or, holding the MLP residual's own modules (the block's are nn.Identity, so the block adds y to x):

        y = drop_path(layer_scale(base_layer(norm(x)))) + scale * adapter(b),   b = x or norm(x)

    which puts the branch outside the MLP's drop-path and layer scale, as AdaptFormer's code.

    Args:
        base_layer: the frozen module (a block's MLP), mapping width C to C = ``adapter.n_in``.
        adapter: the bottleneck.
        scale: s, the branch's multiplier.
        residual: (norm, layer_scale, drop_path) of the block's MLP residual, or None.
        normalised_input: the branch sees norm(x) instead of x (only with ``residual``).
    """

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck, scale: float = 0.1,
                 residual: tuple[nn.Module, nn.Module, nn.Module] | None = None,
                 normalised_input: bool = False) -> None:
        super().__init__()
        self.base_layer, self.adapter, self.scale = base_layer, adapter, float(scale)
        # named so they never shadow a timm Mlp's own children (fc1, act, drop1, norm, fc2, drop2)
        self.pre_norm, self.post_scale, self.post_drop_path = residual if residual is not None else (None, None, None)
        self.normalised_input = bool(normalised_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm is None:
            return self.base_layer(x) + self.scale * self.adapter(x)  # (..., C)
        h = self.pre_norm(x)  # (..., C): the MLP's input
        y = self.post_drop_path(self.post_scale(self.base_layer(h)))
        return y + self.scale * self.adapter(h if self.normalised_input else x)  # (..., C)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class SliceAdapter(BaseLayerWrapper):
    """Sequential bottlenecks on slices of a frozen linear's output (SPT-Adapter: one per sensitive matrix).

        h = base_layer(x)                                   (..., out)
        y = h;  y[..., rows_g] += adapter_g(dropout(h[..., rows_g]))   for each group g

    A group's rows are the output rows of one matrix held by ``base_layer`` (q, k or v of a fused qkv: C of its
    3C rows; None = the whole output, e.g. fc1's 4C before the activation). Every ``adapter_g`` maps its slice
    width to itself and starts at zero (``up`` zero-initialised), so step 0 is the base layer's output.

    Args:
        base_layer: the frozen module (an nn.Linear or a tuner wrapper around one).
        adapters: one bottleneck per group, ``n_in`` = the group's width.
        rows: one row-index tensor per group (None = every output row; then the only group).
        dropout: dropout on each adapter's input (SPT's authors' code: 0.1).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapters: list[Bottleneck],
        rows: list[torch.Tensor | None],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(adapters) != len(rows) or not adapters:
            raise ConfigError(f"SliceAdapter needs one row set per adapter, got {len(adapters)} and {len(rows)}")
        if any(r is None for r in rows) and len(rows) > 1:
            raise ConfigError("SliceAdapter: a whole-output group (rows=None) must be the only group")
        for ad, r in zip(adapters, rows):
            width = base_layer.out_features if r is None else len(r)
            if ad.n_in != width:
                raise ConfigError(f"SliceAdapter: an adapter of width {ad.n_in} on a slice of {width} rows")
        self.base_layer = base_layer
        self.adapters = nn.ModuleList(adapters)
        self.whole = rows[0] is None
        device = base_layer.weight.device
        for i, r in enumerate(rows):
            if r is not None:
                self.register_buffer(f"rows_{i}", torch.as_tensor(r, dtype=torch.long).to(device))  # (width_g,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # (..., out)
        d = self.dropout(h)  # elementwise: each slice sees independent dropout, as one dropout per matrix would
        if self.whole:
            return h + self.adapters[0](d)
        for i, adapter in enumerate(self.adapters):
            rows = getattr(self, f"rows_{i}")  # (width_g,)
            h = h.index_add(-1, rows, adapter(d.index_select(-1, rows)).to(h.dtype))  # (..., out)
        return h

    def extra_repr(self) -> str:
        return f"groups={len(self.adapters)}, whole={self.whole}"
