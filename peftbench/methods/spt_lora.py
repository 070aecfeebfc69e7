"""SPT-LoRA (He et al., ICCV 2023): sensitivity-aware allocation of LoRA and unstructured sparse deltas.

Allocation (paper Sec. 3.2, Eq. 4-5, with the authors' code's threshold, /work/shared/REFERENCE.md):

1. One global top-tau over all candidate entries' sensitivity scores (``budget`` tau, in parameters).
2. A matrix (q, k, v as row slices of the fused qkv; proj, fc1, fc2) whose count of sensitive entries is
   >= (parameters of its structured module) / ``alpha`` gets structured tuning: LoRA of rank r on that matrix
   (r * (d_in + d_out) parameters). The paper's sigma_LoRA = 2 * d_in * d_out * r is a typo; we follow the
   authors' code: params / alpha with alpha = 10.
3. Otherwise its sensitive entries are tuned alone: W = W0 + scatter(delta) (:class:`SparseDeltaLinear`).
4. A vector (norm weight/bias, linear bias) is tuned whole when >= 1/beta of its entries are sensitive
   (beta = 5); a vector below that threshold is not tuned (the paper is silent; we do not tune single entries
   of vectors).

``structured=False`` tunes every sensitive matrix entry unstructured ("w/o structured", SPT Table 6);
``unstructured=False`` keeps only the structured modules and tunes no sparse entries and no vectors
("w/o unstructured"). Trainable backbone parameters = unstructured entries + the structured modules'
parameters + the tuned vectors' lengths; only the unstructured entries are guaranteed <= tau (a structured
module may hold up to alpha x the sensitive entries it replaces and a whole vector up to beta x), as in SPT.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.layers.lora import LoRALinear
from peftbench.layers.sparse import SparseDeltaLinear, SparseLoRALinear
from peftbench.methods.base import Method, State, freeze
from peftbench.scorers.base import matrix_key, scored_candidates

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}


def parse_budget(budget: int | float | str) -> int:
    """Parameters in a budget given as a number or a string like ``0.4M``, ``400K``, ``4e5``."""
    if isinstance(budget, (int, float)):
        value = float(budget)
    else:
        m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMgGbB]?)\s*", str(budget))
        if not m:
            raise ValueError(f"cannot parse budget {budget!r}; use a number or e.g. 0.4M / 400K")
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value < 0:
        raise ValueError(f"budget must be >= 0, got {budget!r}")
    return int(round(value))


def top_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries of ``flat`` (N,); ties broken by position (deterministic)."""
    k = min(k, flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k == 0:
        return mask
    threshold = torch.topk(flat, k, sorted=False).values.min()
    mask = flat > threshold
    ties = (flat == threshold).nonzero().flatten()[: k - int(mask.sum())]  # first ties in flat order
    mask[ties] = True
    return mask


class SPT(Method):
    """The shared SPT allocation; subclasses say what a structured module is and how to build it.

    Args:
        budget: tau, sensitive entries selected (a number, or a string like ``0.4M``).
        alpha: a matrix is structured when its sensitive count >= structured-module parameters / alpha.
        beta: a vector is tuned whole when its sensitive count >= its length / beta.
        targets: candidate matrices (must be among the scorer's).
        structured, unstructured: the SPT Table 6 ablation switches.
    """

    needs_scores = True

    def __init__(
        self,
        budget: int | float | str = "0.4M",
        alpha: float = 10.0,
        beta: float = 5.0,
        targets: Sequence[str] = anatomy.TARGETS,
        structured: bool = True,
        unstructured: bool = True,
    ) -> None:
        self.budget, self.alpha, self.beta = parse_budget(budget), float(alpha), float(beta)
        self.targets, self.structured, self.unstructured = tuple(targets), bool(structured), bool(unstructured)

    # --- what subclasses define --------------------------------------------------------------------
    def structured_params(self, block: anatomy.BlockView, target: str) -> int:
        """Parameters of the structured module that would replace ``target``'s sensitive entries."""
        raise NotImplementedError

    def structured_unit(self, block: anatomy.BlockView, target: str) -> str:
        """Name of the structured module ``target`` would get (several targets may share one, SPT-Adapter)."""
        return matrix_key(block, target)

    # --- selection ---------------------------------------------------------------------------------
    def sensitive_masks(self, model: nn.Module, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{candidate key: boolean mask shaped like its score} of the global top-``budget`` over every candidate
        matrix (``targets``, in block order) and 1-D vector the scorer returned."""
        matrices, vectors = scored_candidates(model, scores, self.targets)
        keys = list(matrices) + vectors
        flat = torch.cat([scores[k].detach().float().flatten().cpu() for k in keys])  # (N,) all candidate entries
        mask, masks, start = top_mask(flat, self.budget), {}, 0
        for k in keys:
            n = scores[k].numel()
            masks[k], start = mask[start : start + n].view(scores[k].shape), start + n
        return masks

    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None) -> State:
        if not scores:
            raise ValueError(f"{self.name} needs sensitivity scores: set scorer=sensitivity")
        matrices, vectors = scored_candidates(model, scores, self.targets)
        params = dict(model.named_parameters())
        masks = self.sensitive_masks(model, scores)

        structured: list[str] = []
        units: dict[str, int] = {}
        sparse: dict[str, list[torch.Tensor]] = {}
        counts = {k: int(m.sum()) for k, m in masks.items()}
        for key, (block, target) in matrices.items():
            count = counts[key]
            size = self.structured_params(block, target)
            # authors' code: params / alpha (alpha=10); the paper's sigma_LoRA = 2*d_in*d_out*r is a typo
            if self.structured and count > 0 and count >= size / self.alpha:
                structured.append(key)
                units[self.structured_unit(block, target)] = size
            elif self.unstructured and count > 0:
                rows = block.rows(target)  # slice rows of the holding weight (None = all)
                r, c = masks[key].nonzero(as_tuple=True)  # (count,) each, in the slice
                holding_rows = r if rows is None else rows[r]
                n_in = masks[key].shape[1]
                sparse.setdefault(block.linear_path(target), []).append(holding_rows * n_in + c)
        tuned_vectors = [
            v for v in vectors if self.unstructured and counts[v] > 0 and counts[v] >= params[v].numel() / self.beta
        ]
        sparse_idx = {path: torch.cat(parts).sort().values for path, parts in sparse.items()}
        n_sparse = sum(int(i.numel()) for i in sparse_idx.values())
        n_struct = sum(units.values())
        n_vec = sum(params[v].numel() for v in tuned_vectors)
        return {
            "budget": self.budget,
            "structured": structured,
            "units": sorted(units),
            "sparse": sparse_idx,
            "vectors": tuned_vectors,
            "summary": {
                "budget": self.budget,
                "selected": sum(counts.values()),
                "structured_matrices": len(structured),
                "structured_modules": len(units),
                "structured_params": n_struct,
                "sensitive_in_structured": sum(counts[k] for k in structured),
                "unstructured_entries": n_sparse,
                "vectors_tuned": len(tuned_vectors),
                "vector_params": n_vec,
                "trainable_backbone": n_sparse + n_struct + n_vec,
            },
        }

    def describe(self, state: State) -> dict:
        return dict(state.get("summary", {}))

    # --- application -------------------------------------------------------------------------------
    def apply(self, model: nn.Module, state: State) -> None:
        params = dict(model.named_parameters())
        vectors = [params[n] for n in state["vectors"]]  # resolved before wrapping renames them
        freeze(model)
        self.apply_linears(model, state)
        for p in vectors:
            p.requires_grad_(True)

    def apply_linears(self, model: nn.Module, state: State) -> None:
        """Wrap every holding linear with its LoRA row groups and/or sparse delta."""
        structured = set(state["structured"])
        layers: dict[str, tuple[anatomy.BlockView, list[str]]] = {}
        for block, target in anatomy.iter_linear_targets(model, self.targets):
            layers.setdefault(block.linear_path(target), (block, []))[1].append(target)
        for path, (block, targets) in layers.items():
            lora = [t for t in targets if matrix_key(block, t) in structured]
            indices = state["sparse"].get(path)
            new = self.make_layer(block, block.linear(targets[0]), lora, indices)
            if new is not None:
                block.set_linear(targets[0], new)

    def make_layer(
        self, block: anatomy.BlockView, layer: nn.Module, lora: list[str], indices: torch.Tensor | None
    ) -> nn.Module | None:
        """The wrapper for one holding linear (None = leave it as is). SPT-LoRA overrides; default: sparse only."""
        return SparseDeltaLinear(layer, indices) if indices is not None and indices.numel() else None


class SPTLoRA(SPT):
    """SPT with LoRA as the structured module (reparameterisable: merges into the backbone).

    Args:
        rank: r of every structured LoRA (8 in the paper).
        scale: LoRA delta multiplier s.
        (others: :class:`SPT`.)
    """

    reparameterisable = True

    def __init__(self, rank: int = 8, scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rank, self.scale = int(rank), float(scale)

    @property
    def name(self) -> str:
        return "spt_lora"

    def structured_params(self, block: anatomy.BlockView, target: str) -> int:
        layer = block.linear(target)
        rows = block.rows(target)
        n_out = layer.weight.shape[0] if rows is None else len(rows)
        return self.rank * (layer.weight.shape[1] + n_out)  # A (r, in) + B (out, r)

    def make_layer(
        self, block: anatomy.BlockView, layer: nn.Module, lora: list[str], indices: torch.Tensor | None
    ) -> nn.Module | None:
        has_sparse = indices is not None and indices.numel() > 0
        if not lora:
            return SparseDeltaLinear(layer, indices) if has_sparse else None
        rows = [block.rows(t) for t in lora]
        rows = None if rows == [None] else rows
        if has_sparse:
            return SparseLoRALinear(layer, self.rank, indices, rows, scale=self.scale)
        return LoRALinear(layer, self.rank, rows, scale=self.scale)
