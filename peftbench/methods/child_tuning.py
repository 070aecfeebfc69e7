"""Child-Tuning-D (Xu et al., EMNLP 2021): tune the child network of highest Fisher information.

Fisher information of each candidate entry = accumulated squared gradients = the sensitivity scorer's output
(``per_sample``: the paper's per-sample Fisher; ``per_batch``: squared batch gradients). One global top-p
selection over ALL candidate entries (q/k/v/proj/fc1/fc2 matrices and every scored vector: norms, biases):
exactly round(p * candidates) entries. The original applies the mask to gradients of dense weights; here the
selected entries are the only trainable parameters (W = W0 + scatter(delta)), so weight decay and optimiser
state never touch the frozen entries, which stay bit-identical (REFERENCE: the gradient-masking trap).

Matrix entries: :class:`SparseDeltaBiasLinear` (:class:`~peftbench.layers.sparse.SparseDeltaLinear` plus the
selected entries of the same linear's bias). Other vector entries (norms; biases of linears with no selected
weight entry): :class:`SparseParams`, which wraps the owning module and adds scatter(delta) to the named
parameter through ``torch.func.functional_call``. One wrapper per module (anatomy unwraps one level only);
merge/unmerge like the other tuner layers.
Paper choice kept: one global threshold (not per-layer). Paper silent on ViTs: candidates = the scorer's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.layers.base import MATRIX, VECTOR, BaseLayerWrapper
from peftbench.layers.sparse import SparseDeltaLinear
from peftbench.methods.base import Method, State, freeze
from peftbench.methods.spt_lora import top_mask
from peftbench.scorers.base import scored_candidates


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


class ChildTuningD(Method):
    """Global top-``p`` Fisher entries over all candidates, tuned as sparse deltas.

    Args:
        p: density of the child network (fraction of candidate entries tuned; the paper sweeps 0.1-0.3).
        targets: candidate matrices (must be among the scorer's).
        vectors: include the scored 1-D parameters (norms, biases) as candidates.
    """

    needs_scores = True
    reparameterisable = True

    def __init__(self, p: float = 0.3, targets=anatomy.TARGETS, vectors: bool = True) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"child-tuning density p must be in [0, 1], got {p}")
        self.p, self.targets, self.vectors = float(p), tuple(targets), bool(vectors)

    @property
    def name(self) -> str:
        return "child_tuning"

    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None) -> State:
        if not scores:
            raise ConfigError("child_tuning needs Fisher scores: set scorer=sensitivity")
        matrices, vectors = scored_candidates(model, scores, self.targets)
        vectors = vectors if self.vectors else []
        keys = list(matrices) + vectors
        flat = torch.cat([scores[k].detach().float().flatten().cpu() for k in keys])  # (N,) all candidates
        n_select = int(round(self.p * flat.numel()))
        mask = top_mask(flat, n_select)  # exactly n_select entries, ties by position
        sparse: dict[str, list[torch.Tensor]] = {}
        vec: dict[str, torch.Tensor] = {}
        start = 0
        for key in keys:
            m = mask[start : start + scores[key].numel()].view(scores[key].shape)
            start += scores[key].numel()
            if not m.any():
                continue
            if key in matrices:
                block, target = matrices[key]
                r, c = m.nonzero(as_tuple=True)  # (nnz,) each, in the slice
                rows = block.rows(target)
                holding = r if rows is None else rows.cpu()[r]
                sparse.setdefault(block.linear_path(target), []).append(holding * m.shape[1] + c)
            else:
                vec[key] = m.nonzero().flatten()  # (nnz,) flat indices into the vector
        indices = {path: torch.cat(parts).sort().values for path, parts in sparse.items()}
        return {
            "p": self.p,
            "sparse": indices,
            "vectors": vec,
            "summary": {
                "p": self.p,
                "candidates": int(flat.numel()),
                "selected": int(mask.sum()),
                "matrix_entries": sum(int(i.numel()) for i in indices.values()),
                "vector_entries": sum(int(i.numel()) for i in vec.values()),
                "trainable_backbone": int(mask.sum()),
            },
        }

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        modules = dict(model.named_modules())
        by_module: dict[str, dict[str, torch.Tensor]] = {}  # vector owner path -> {param name: (nnz,) indices}
        for name, idx in state["vectors"].items():
            mpath, _, pname = name.rpartition(".")
            by_module.setdefault(mpath, {})[pname] = idx
        owners = {mpath: modules[mpath] for mpath in by_module}  # resolved before any wrapping
        done: set[str] = set()
        for block, target in anatomy.iter_linear_targets(model, self.targets):
            path = block.linear_path(target)
            indices = state["sparse"].get(path)
            if path in done or indices is None or not indices.numel():
                continue
            done.add(path)
            bias = by_module.pop(path, {}).get("bias")  # the linear's own bias entries: one wrapper, no nesting
            block.set_linear(target, SparseDeltaBiasLinear(block.linear(target), indices, bias))
        for mpath, idx in by_module.items():  # norms, and linears with selected bias entries only
            parent_path, _, child = mpath.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, SparseParams(owners[mpath], idx))

    def describe(self, state: State) -> dict:
        return dict(state.get("summary", {}))
