"""Unstructured (sparse) deltas on a frozen nn.Linear: W = W0 + scatter(delta), SPT's unstructured tuning.

    W = W0 + scatter(delta);  y = x @ W^T + b        delta: (nnz,) trainable, at flat indices ``sparse_indices``

Only the selected entries exist as trainable parameters, so no gradient masking is involved and optimizer
state and weight decay touch nothing else: every unselected entry of W stays bit-identical to W0. The forward
forms W out of place (``index_add`` on the flattened weight) and calls F.linear: exact, one extra (out, in)
temporary, and the backward's cost is a dense weight gradient gathered at the nnz indices (memory O(out*in +
nnz), never O(nnz^2) as a dense-mask formulation of the authors' code). ``delta`` is zero-initialised, so step
0 equals the base layer. :class:`SparseLoRALinear` adds the same sparse delta to a :class:`LoRALinear` (SPT-LoRA
may put LoRA on q and sparse entries on k of one fused qkv). :class:`SparseDeltaConv2d` does the same for a
convolution (GPS tunes entries of the patch embedding, a Conv2d seen as a (C_out, C_in*kh*kw) matrix per patch).
Whole vectors (biases, norms) are tuned by simply unfreezing them; no wrapper is needed for those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from peftbench.errors import ConfigError
from peftbench.layers.base import MATRIX, VECTOR, BaseLayerWrapper
from peftbench.layers.lora import LoRALinear


def _check_indices(indices: torch.Tensor, numel: int) -> torch.Tensor:
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ConfigError(f"sparse indices must lie in [0, {numel}), got [{int(indices.min())}, {int(indices.max())}]")
    if indices.unique().numel() != indices.numel():
        raise ConfigError("sparse indices must be unique")
    return indices.sort().values


class _SparseLinear(torch.autograd.Function):
    """y = F.linear(x, W0 + scatter(delta), b) that keeps no dense (out, in) weight alive for the backward.

    Autograd through ``index_add`` + ``F.linear`` saves the formed weight W of every sparse layer until its
    backward (one weight-sized tensor per layer: +340 MB on ViT-B/16 with every matrix sparse). Here only x is
    saved (needed for the delta's gradient, as LoRA saves its input); W is formed again in the backward, used
    and freed. Same arithmetic as autograd's: dx = g @ W, dW = g^T x gathered at the indices, db = sum of g.
    W0 must be frozen (its gradient is not computed).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, indices, delta):  # x (..., in), weight (out, in), delta (nnz,)
        w = weight.flatten().index_add(0, indices, delta.to(weight.dtype)).view_as(weight)  # (out, in)
        ctx.save_for_backward(x, weight, indices, delta)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x, w, bias)  # (..., out); under autocast in its dtype, as F.linear alone

    @staticmethod
    def backward(ctx, g):  # g (..., out)
        x, weight, indices, delta = ctx.saved_tensors
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            w = weight.flatten().index_add(0, indices, delta.to(weight.dtype)).view_as(weight)  # (out, in)
            grad_x = g.matmul(w.to(g.dtype)).to(x.dtype)  # (..., in)
        if ctx.needs_input_grad[4]:
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]).to(g.dtype)  # (T, out), (T, in)
            grad_delta = g2.t().mm(x2).flatten().index_select(0, indices).to(delta.dtype)  # (nnz,)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)  # (out,)
        return grad_x, None, grad_bias, None, grad_delta


class _SparseDelta:
    """Mixin: the ``sparse_delta`` (nnz,) parameter at flat ``sparse_indices`` (nnz,) of ``base_layer.weight``."""

    base_layer: nn.Linear
    sparse_delta: nn.Parameter
    sparse_indices: torch.Tensor

    def _init_sparse(self, indices: torch.Tensor) -> None:
        w = self.base_layer.weight  # (out, in)
        idx = _check_indices(indices, w.numel()).to(w.device)
        self.register_buffer("sparse_indices", idx)  # (nnz,) int64 flat indices into W, sorted
        self.sparse_delta = nn.Parameter(torch.zeros(idx.numel(), device=w.device, dtype=w.dtype))  # (nnz,)

    @property
    def nnz(self) -> int:
        return self.sparse_indices.numel()

    def sparse_weight(self) -> torch.Tensor:
        """W0 + scatter(delta), (out, in), out of place (differentiable w.r.t. delta only)."""
        w = self.base_layer.weight
        return w.flatten().index_add(0, self.sparse_indices, self.sparse_delta.to(w.dtype)).view_as(w)

    def sparse_linear(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear(x, W0 + scatter(delta), b): (..., in) -> (..., out), without saving W for the backward."""
        base = self.base_layer
        if base.weight.requires_grad:  # W0 trained as well (not a PEFT setting): plain autograd
            return F.linear(x, self.sparse_weight(), base.bias)
        return _SparseLinear.apply(x, base.weight, base.bias, self.sparse_indices, self.sparse_delta)

    def sparse_dense_delta(self) -> torch.Tensor:
        """scatter(delta) as a dense (out, in) tensor (merge/unmerge and tests)."""
        w = self.base_layer.weight
        return torch.zeros_like(w).flatten().index_add(0, self.sparse_indices, self.sparse_delta.to(w.dtype)).view_as(w)

    @torch.no_grad()
    def fold_sparse(self, sign: float) -> None:
        """Add ``sign`` * scatter(delta) to ``base_layer.weight`` in place (merge: +1, unmerge: -1)."""
        w = self.base_layer.weight
        w.view(-1).index_add_(0, self.sparse_indices, sign * self.sparse_delta.to(w.dtype))


class _SparseDeltaWrapper(_SparseDelta, BaseLayerWrapper):
    """A frozen layer plus ``sparse_delta`` on some entries of its weight; merge folds the delta in place."""

    param_roles = {"sparse_delta": MATRIX}

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, indices: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._init_sparse(indices)
        self.merged = False

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into ``base_layer.weight``."""
        if not self.merged:
            self.fold_sparse(1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the delta out of ``base_layer.weight`` again."""
        if self.merged:
            self.fold_sparse(-1.0)
            self.merged = False


class SparseDeltaLinear(_SparseDeltaWrapper):
    """A frozen nn.Linear plus a trainable delta on ``indices`` (flat indices into its (out, in) weight).

    Args:
        base_layer: the frozen nn.Linear(in, out).
        indices: (nnz,) unique flat indices ``row * in + col`` of the tuned entries.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.sparse_linear(x)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        return f"nnz={self.nnz}, in={self.in_features}, out={self.out_features}"


class SparseDeltaConv2d(_SparseDeltaWrapper):
    """A frozen nn.Conv2d plus a trainable delta on ``indices`` (flat indices into its (out, in, kh, kw) weight).

    W = W0 + scatter(delta), then the base conv's own stride / padding / groups. Flat index ``c * in*kh*kw + j`` is
    entry (c, j) of the (out, in*kh*kw) matrix the conv applies to each flattened patch
    (:func:`peftbench.backbones.anatomy.patch_embedding_matrix`), so "row" means output channel.

    Args:
        base_layer: the frozen nn.Conv2d.
        indices: (nnz,) unique flat indices of the tuned entries.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        # (B, in, H, W) -> (B, out, h, w) with the base conv's stride / padding
        return self.base_layer._conv_forward(x, self.sparse_weight(), self.base_layer.bias)

    def extra_repr(self) -> str:
        w = self.base_layer.weight
        return f"nnz={self.nnz}, matrix=({w.shape[0]}, {w[0].numel()})"


class SparseLoRALinear(_SparseDelta, LoRALinear):
    """LoRA on some row groups of a frozen nn.Linear plus a sparse delta on other entries of the same weight.

    y = x @ (W0 + scatter(delta))^T + b, then the LoRA rows added as in :class:`LoRALinear`.

    Args:
        base_layer, rank, row_groups, scale, dropout: as :class:`LoRALinear`.
        indices: (nnz,) unique flat indices of the sparse entries.
    """

    param_roles = {**LoRALinear.param_roles, "sparse_delta": MATRIX}

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        indices: torch.Tensor,
        row_groups: list[torch.Tensor] | None = None,
        scale: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer, rank, row_groups, scale=scale, dropout=dropout)
        self._init_sparse(indices)

    def delta_weight(self) -> torch.Tensor:
        """The dense weight delta (out, in): LoRA's plus the scattered sparse entries."""
        return super().delta_weight() + self.sparse_dense_delta()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        out = self.sparse_linear(x)  # (..., out)
        return self.add_delta(x, out)  # LoRA's part on top of W0 + scatter(delta)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz}"


class SparseParams(BaseLayerWrapper):
    """A frozen module plus trainable deltas on some entries of some of its parameters (vectors here).

    Args:
        base_layer: the wrapped module (e.g. a LayerNorm, or a linear for its bias).
        indices: {parameter name in ``base_layer`` (may be dotted): (nnz,) unique flat indices}.
    """

    def __init__(self, base_layer: nn.Module, indices: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.names = sorted(indices)
        params = dict(base_layer.named_parameters())
        self.deltas = nn.ParameterList()  # [(nnz_i,)] in self.names order
        for i, name in enumerate(self.names):
            p = params[name]
            idx = torch.as_tensor(indices[name], dtype=torch.long).flatten().unique().to(p.device)  # sorted
            if idx.numel() and int(idx.max()) >= p.numel():
                raise ConfigError(f"indices of {name!r} exceed its {p.numel()} entries")
            self.register_buffer(f"indices_{i}", idx)  # (nnz_i,)
            self.deltas.append(nn.Parameter(torch.zeros(idx.numel(), device=p.device, dtype=p.dtype)))
        # entries of a weight matrix decay like it; entries of a vector (norm, bias) do not
        self.param_roles = {f"deltas.{i}": MATRIX if params[n].ndim >= 2 else VECTOR for i, n in enumerate(self.names)}
        self.merged = False

    def _targets(self) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        params = dict(self.base_layer.named_parameters())
        pairs = enumerate(zip(self.names, self.deltas))
        return [(n, params[n], getattr(self, f"indices_{i}"), d) for i, (n, d) in pairs]

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        new = {n: p.flatten().index_add(0, idx, d.to(p.dtype)).view_as(p) for n, p, idx, d in self._targets()}
        return functional_call(self.base_layer, new, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for _, p, idx, d in self._targets():
                p.view(-1).index_add_(0, idx, d.to(p.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for _, p, idx, d in self._targets():
                p.view(-1).index_add_(0, idx, -d.to(p.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: nnz={d.numel()}" for n, d in zip(self.names, self.deltas))


class SparseDeltaBiasLinear(SparseDeltaLinear):
    """:class:`SparseDeltaLinear` plus sparse entries of its bias: b = b0 + scatter(bias_delta).

    Args:
        base_layer, indices: as :class:`SparseDeltaLinear` (weight entries).
        bias_indices: (nnz_b,) unique indices into the bias (None = the bias stays frozen).
    """

    param_roles = {**SparseDeltaLinear.param_roles, "bias_delta": VECTOR}

    def __init__(self, base_layer: nn.Linear, indices: torch.Tensor, bias_indices: torch.Tensor | None = None) -> None:
        super().__init__(base_layer, indices)
        b = base_layer.bias  # (out,) or None
        idx = torch.zeros(0, dtype=torch.long) if bias_indices is None or b is None else bias_indices
        idx = torch.as_tensor(idx, dtype=torch.long).flatten().unique()  # sorted
        self.register_buffer("bias_indices", idx.to(base_layer.weight.device))  # (nnz_b,)
        w = base_layer.weight
        self.bias_delta = nn.Parameter(torch.zeros(idx.numel(), device=w.device, dtype=w.dtype))  # (nnz_b,)
        self.bias_delta.requires_grad_(idx.numel() > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.bias_indices.numel():
            return super().forward(x)
        b = self.base_layer.bias.index_add(0, self.bias_indices, self.bias_delta.to(self.weight.dtype))  # (out,)
        return F.linear(x, self.sparse_weight(), b)  # (..., in) -> (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged and self.bias_indices.numel():
            self.base_layer.bias.index_add_(0, self.bias_indices, self.bias_delta.to(self.base_layer.bias.dtype))
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and self.bias_indices.numel():
            self.base_layer.bias.index_add_(0, self.bias_indices, -self.bias_delta.to(self.base_layer.bias.dtype))
        super().unmerge()
