"""Child-Tuning-D (Xu et al., "Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning",
EMNLP 2021, arXiv:2109.05687): tune the child network of highest Fisher information.

Fisher information of each candidate entry = accumulated squared gradients = the sensitivity scorer's output
(``per_sample``: the paper's per-sample Fisher; ``per_batch``: squared batch gradients). One global top-p
selection over ALL candidate entries (q/k/v/proj/fc1/fc2 matrices and every scored vector: norms, biases):
exactly round(p * candidates) entries. The original applies the mask to gradients of dense weights; here the
selected entries are the only trainable parameters (W = W0 + scatter(delta)), so weight decay and optimiser
state never touch the frozen entries, which stay bit-identical (masked gradients would not stop AdamW's
decoupled weight decay from shrinking them).

Matrix entries: :class:`~peftbench.layers.sparse.SparseDeltaBiasLinear` (``SparseDeltaLinear`` plus the
selected entries of the same linear's bias). Other vector entries (norms; biases of linears with no selected
weight entry): :class:`~peftbench.layers.sparse.SparseParams`, which wraps the owning module and adds
scatter(delta) to the named parameter through ``torch.func.functional_call``. One wrapper per module (anatomy
unwraps one level only); merge/unmerge like the other tuner layers.
Paper choice kept: one global threshold (not per-layer). Paper silent on ViTs: candidates = the scorer's.
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.layers.sparse import SparseDeltaBiasLinear, SparseParams
from peftbench.methods.base import Method, State, freeze
from peftbench.scorers.base import scored_candidates, top_mask


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
