"""SPT-LoRA (He et al., "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", ICCV 2023, arXiv:2303.08566).

Allocation (paper Sec. 3.2, Eq. 4-5, with the authors' code where it is more precise):

1. Rank every candidate entry by sensitivity (q, k, v as row slices of the fused qkv, proj, fc1, fc2, and every
   scored vector: norms, biases) and take the top tau (one global threshold, Eq. 4).
2. A matrix whose count of sensitive entries is >= (parameters of its structured module) / ``alpha`` gets the
   structured module: LoRA of rank r on that matrix, r * (d_in + d_out) parameters. The paper's
   sigma_LoRA = 2 * d_in * d_out * r is a typo; the authors' code uses params / alpha with alpha = 10.
3. Otherwise its sensitive entries are tuned alone: W = W0 + scatter(delta) (:class:`SparseDeltaLinear`).
4. A vector is tuned whole when >= 1/``beta`` of its entries are sensitive (beta = 5); below that its sensitive
   entries are tuned alone (authors' code). The fused qkv bias is judged as three vectors q, k, v (the authors'
   ViT has separate q, k, v linears). Vector entries are deltas on the owning module's parameter
   (:class:`~peftbench.layers.sparse.SparseParams`).
5. The class token is tuned whole and counted (authors' code: ``cls_token`` is trainable and its 768 parameters
   are in their count); ``cls_token=False`` leaves it frozen.

The budget is TRAINABLE parameters (authors' code: they sweep tau and keep the selection whose trainable count
is closest to the target, "param_req_0.4" = 0.38-0.43M; the head is not counted). Trainable(tau) = sparse
matrix entries + structured modules + whole vectors + sparse vector entries + the class token.
:meth:`SPT.search_tau` finds the tau whose trainable count is nearest the budget; ``tau`` set in the config is
used as is (the budget is then ignored). ``budget`` may be a fraction of the backbone, ``0.26%``.

Ablations (SPT Table 6): ``structured=False`` ("w/o structured") tunes every sensitive matrix entry alone;
``unstructured=False`` ("w/o unstructured") is the authors' structured-only mode: structured matrices and
whole vectors, no sparse entries. Whole-vector tuning stays in both (the authors' ``structured_vector`` trick
is separate from the matrices' structured tuning).

Structured branches: dropout ``dropout`` (0.1) on their input, as the authors' code, which applies it to every
branch but proj's (their proj branch reads the attention output undropped); we do the same.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from peftbench.accounting import backbone_size
from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.layers.lora import LoRALinear
from peftbench.layers.sparse import SparseDeltaLinear, SparseLoRALinear, SparseParams
from peftbench.methods.base import Method, State, freeze
from peftbench.scorers.base import matrix_key, scored_candidates, top_mask

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
#: a searched selection "meets" its budget when its trainable count is within this fraction of it
BUDGET_TOLERANCE = 0.02


_BUDGET = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGbB%]?)\s*")


def split_budget(budget: int | float | str) -> tuple[float, bool]:
    """(value, is a percentage) of a budget: a number, ``0.4M`` / ``400K`` / ``4e5``, or ``0.26%`` of the backbone."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value, unit = float(budget), ""
    else:
        m = _BUDGET.fullmatch(str(budget))
        if not m:
            raise ConfigError(f"cannot parse budget {budget!r}; use a number, e.g. 0.4M / 400K, or a share 0.26%")
        value, unit = float(m.group(1)), m.group(2).upper()
    if not value >= 0:  # also NaN
        raise ConfigError(f"budget must be >= 0, got {budget!r}")
    return (value, True) if unit == "%" else (value * _SUFFIX[unit], False)


def parse_budget(budget: int | float | str, backbone: int | None = None) -> int:
    """Parameters in a budget (see :func:`split_budget`); a percentage is of ``backbone`` (its parameters, no head)."""
    value, share = split_budget(budget)
    if share:
        if backbone is None:
            raise ConfigError(f"budget {budget!r} is a share of the backbone: give the backbone's parameter count")
        value = value / 100.0 * backbone
    return int(round(value))


def ranked_top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (k,) of the ``k`` largest entries of ``flat`` (N,), best first, ties by position.

    The first k of a stable descending sort, without sorting all N: the set is :func:`top_mask`'s, so the first
    t positions of ``ranked_top(flat, k)`` are ``top_mask(flat, t)`` for every t <= k.
    """
    k = min(k, flat.numel())
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    pos = top_mask(flat, k).nonzero().flatten()  # (k,) ascending positions
    order = torch.sort(flat[pos], descending=True, stable=True).indices  # equal scores keep position order
    return pos[order]


@dataclass
class Unit:
    """One candidate of SPT's allocation: a matrix (structured or sparse) or a vector (whole or sparse).

    Its entries are ``flat[start:stop]`` of :class:`Candidates`' order. ``whole`` is what tuning it whole costs
    (its structured module, or the vector's length); it is tuned whole when its sensitive count is > 0 and >=
    ``threshold``.
    """

    key: str  # scored matrix key, or vector parameter name (``<qkv bias>:q`` for a part of the fused qkv bias)
    start: int
    stop: int
    whole: int
    threshold: float
    matrix: bool
    param: str  # the parameter holding the entries
    offset: int = 0  # vectors: index of the unit's first entry in ``param``
    block: anatomy.BlockView | None = None  # matrices: their block and target
    target: str = ""

    @property
    def size(self) -> int:
        return self.stop - self.start


class Candidates:
    """SPT's candidate entries in one flat order (matrices in block order, then vectors), ranked lazily.

    The order is :func:`~peftbench.scorers.base.scored_candidates`' (the same as :func:`top_mask` over the
    concatenated scores has always used), so a fused qkv bias split into q, k, v keeps its positions.
    """

    def __init__(self, units: list[Unit], flat: torch.Tensor, keys: dict[str, tuple[int, tuple[int, ...]]]) -> None:
        self.units, self.flat, self.keys = units, flat, keys  # keys: {scored key: (start, shape)}
        self.stops = torch.tensor([u.stop for u in units], dtype=torch.long)  # (U,)
        self._order = torch.zeros(0, dtype=torch.long)  # ranked positions computed so far
        self._owner = torch.zeros(0, dtype=torch.long)  # unit of each ranked position

    @property
    def n(self) -> int:
        return int(self.flat.numel())

    def top(self, tau: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (tau,), their unit indices (tau,)) of the top-``tau`` entries, best first."""
        tau = min(max(int(tau), 0), self.n)
        if tau > self._order.numel():  # extend geometrically: a search asks for nearby tau many times
            self._order = ranked_top(self.flat, min(self.n, max(tau, 2 * self._order.numel())))
            self._owner = torch.searchsorted(self.stops, self._order, right=True)
        return self._order[:tau], self._owner[:tau]

    def counts(self, tau: int) -> torch.Tensor:
        """(U,) sensitive entries of each unit among the top ``tau``."""
        return torch.bincount(self.top(tau)[1], minlength=len(self.units))

    def mask(self, tau: int) -> torch.Tensor:
        """(N,) boolean: the top ``tau`` entries (exactly :func:`top_mask` of the flat scores)."""
        mask = torch.zeros(self.n, dtype=torch.bool)
        mask[self.top(tau)[0]] = True
        return mask

    def masks(self, tau: int) -> dict[str, torch.Tensor]:
        """{scored key: boolean mask shaped like its score} of the top ``tau`` entries."""
        mask = self.mask(tau)
        return {k: mask[s : s + math.prod(shape)].view(shape) for k, (s, shape) in self.keys.items()}


def search_tau(trainable: Callable[[int], int], n: int, budget: int) -> tuple[int, dict[int, int]]:
    """The tau in [0, n] whose ``trainable(tau)`` is nearest ``budget``; also every (tau: count) evaluated.

    1. Bracket: double tau from ``budget`` until trainable(hi) >= budget (or hi = n); lo = the last below.
    2. Bisect (lo, hi) keeping trainable(lo) < budget <= trainable(hi), until hi = lo + 1.
    3. Compare lo, hi, their neighbours and every tau evaluated on the way; nearest count wins (ties: smaller tau).

    SPT's count is non-decreasing in tau when alpha, beta >= 1 (a unit costs +1 per sparse entry, then jumps to
    its whole size, which is larger than the entries it replaces, when it crosses its threshold), so lo and hi
    hold the nearest achievable counts below and above the budget: step 3 only confirms them. For a count that
    is not monotone (CDRA's own count) the answer is the best of the evaluated taus, a heuristic.
    About 2 log2(tau) evaluations, each a bincount over tau ranked entries.
    """
    seen: dict[int, int] = {}

    def f(t: int) -> int:
        if t not in seen:
            seen[t] = int(trainable(t))
        return seen[t]

    lo, hi = 0, min(n, max(1, budget))
    if f(0) < budget:
        while f(hi) < budget and hi < n:
            lo, hi = hi, min(n, 2 * hi)
        while hi - lo > 1 and f(hi) >= budget:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if f(mid) < budget else (lo, mid)
        for t in (lo - 1, lo, hi, hi + 1):
            if 0 <= t <= n:
                f(t)
    best = min(seen, key=lambda t: (abs(seen[t] - budget), t))
    return best, seen


class SPT(Method):
    """The shared SPT allocation; subclasses say what a structured module is and how to build it.

    Args:
        budget: target of TRAINABLE backbone parameters (head not counted): a number, ``0.4M``, or ``0.26%`` of
            the backbone. tau is searched so the trainable count lands nearest it.
        tau: sensitive entries selected, used as is when set (the budget is then ignored).
        alpha: a matrix is structured when its sensitive count >= structured-module parameters / alpha.
        beta: a vector is tuned whole when its sensitive count >= its length / beta.
        targets: candidate matrices (must be among the scorer's).
        structured, unstructured: the SPT Table 6 ablation switches.
        dropout: dropout on the input of each structured branch (authors' code: 0.1; none on proj's).
        cls_token: tune the class token (counted in the budget), as the authors' code.
    """

    needs_scores = True

    def __init__(
        self,
        budget: int | float | str | None = "0.47%",
        tau: int | float | str | None = None,
        alpha: float = 10.0,
        beta: float = 5.0,
        targets: Sequence[str] = anatomy.TARGETS,
        structured: bool = True,
        unstructured: bool = True,
        dropout: float = 0.1,
        cls_token: bool = True,
    ) -> None:
        if budget is None and tau is None:
            raise ConfigError("SPT needs method.budget (trainable parameters, e.g. 0.4M or 0.26%) or method.tau")
        share = budget is not None and split_budget(budget)[1]  # fails early on a malformed budget
        self.budget_spec = None if budget is None else str(budget).strip()
        self.budget = None if budget is None or share else parse_budget(budget)  # None: a share, resolved in select
        if tau is not None and split_budget(tau)[1]:
            raise ConfigError(f"tau is a number of sensitive entries, not a share: got {tau!r}")
        self.tau = None if tau is None else parse_budget(tau)
        if float(alpha) <= 0 or float(beta) <= 0:
            raise ConfigError(f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.targets, self.structured, self.unstructured = tuple(targets), bool(structured), bool(unstructured)
        self.dropout, self.cls_token = float(dropout), bool(cls_token)

    # --- what subclasses define --------------------------------------------------------------------
    def structured_params(self, block: anatomy.BlockView, target: str) -> int:
        """Parameters of the structured module that would replace ``target``'s sensitive entries."""
        raise NotImplementedError

    def branch_dropout(self, target: str) -> float:
        """Dropout on the input of ``target``'s structured branch: none on proj's, as the authors' code."""
        return 0.0 if target == "proj" else self.dropout

    # --- candidates and the budget -----------------------------------------------------------------
    def candidates(self, model: nn.Module, scores: dict[str, torch.Tensor]) -> Candidates:
        """Every candidate of the allocation (see the module docstring) in the flat order, with its costs."""
        matrices, vectors = scored_candidates(model, scores, self.targets)
        params = dict(model.named_parameters())
        fused = {}  # fused qkv bias name -> its block
        for block in anatomy.blocks(model):
            name = anatomy.qkv_bias_name(block)
            if name is not None:
                fused[name] = block
        units: list[Unit] = []
        keys: dict[str, tuple[int, tuple[int, ...]]] = {}
        start = 0
        for key, (block, target) in matrices.items():
            n, whole = scores[key].numel(), self.structured_params(block, target)
            name = f"{block.linear_path(target)}.weight"
            units.append(Unit(key, start, start + n, whole, whole / self.alpha, True, name, 0, block, target))
            keys[key], start = (start, tuple(scores[key].shape)), start + n
        for key in vectors:
            n = scores[key].numel()
            keys[key] = (start, tuple(scores[key].shape))
            if key in fused:  # q, k, v parts of the fused bias, each judged as a vector of its own
                block = fused[key]
                for part in ("q", "k", "v"):
                    rows = block.rows(part)  # (C,) contiguous rows of the fused bias
                    lo, size = int(rows[0]), len(rows)
                    if int(rows[-1]) - lo + 1 != size:
                        raise ConfigError(f"{key}: the {part} rows of a fused qkv are not contiguous")
                    units.append(
                        Unit(f"{key}:{part}", start + lo, start + lo + size, size, size / self.beta, False, key, lo)
                    )
            else:
                units.append(Unit(key, start, start + n, params[key].numel(), n / self.beta, False, key))
            start += n
        flat = torch.cat([scores[k].detach().float().flatten().cpu() for k in keys]) if keys else torch.zeros(0)
        return Candidates(units, flat, keys)

    def fixed_params(self, model: nn.Module) -> int:
        """Trainable parameters that do not depend on tau: the class token when tuned."""
        token = anatomy.class_token(model)
        return token.numel() if self.cls_token and token is not None else 0

    def unit_costs(self, cands: Candidates, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tuned whole (U,) bool, trainable parameters of each unit (U,)) for sensitive ``counts`` (U,)."""
        whole_size = torch.tensor([u.whole for u in cands.units], dtype=torch.long)
        threshold = torch.tensor([u.threshold for u in cands.units], dtype=torch.float64)
        may_whole = torch.tensor([self.structured or not u.matrix for u in cands.units], dtype=torch.bool)
        whole = may_whole & (counts > 0) & (counts.double() >= threshold)
        sparse = counts if self.unstructured else torch.zeros_like(counts)
        return whole, torch.where(whole, whole_size, sparse)

    def trainable_at(self, model: nn.Module, cands: Candidates, tau: int) -> int:
        """Trainable backbone parameters of the selection at ``tau`` (what :meth:`search_tau` aims at the budget)."""
        return int(self.unit_costs(cands, cands.counts(tau))[1].sum()) + self.fixed_params(model)

    def resolve_budget(self, model: nn.Module) -> int | None:
        """The budget in parameters (a percentage resolved against ``model``'s backbone); None when tau is set."""
        if self.tau is not None or self.budget_spec is None:
            return None
        return parse_budget(self.budget_spec, backbone_size(model))

    def resolve_tau(self, model: nn.Module, cands: Candidates) -> tuple[int, dict]:
        """(tau, the search's record for the summary): the configured tau, or the budget's nearest selection."""
        budget = self.resolve_budget(model)
        if budget is None:
            return min(self.tau, cands.n), {"budget": None, "tau_source": "given"}
        tau, seen = search_tau(lambda t: self.trainable_at(model, cands, t), cands.n, budget)
        count = seen[tau]
        info = {
            "budget": budget,
            "tau_source": "search",
            "searched_trainable": count,
            "budget_met": abs(count - budget) <= BUDGET_TOLERANCE * budget,
            "budget_note": None,
        }
        value, share = split_budget(self.budget_spec)
        if share:
            info["budget_percent"] = value
        if seen.get(cands.n, -1) < budget and tau == cands.n:
            info["budget_note"] = (
                f"budget {budget:,} exceeds what {self.name} can train here: every candidate selected gives {count:,}"
            )
            warnings.warn(f"{self.name}: {info['budget_note']}", stacklevel=2)
        elif not info["budget_met"]:
            below = max((c for c in seen.values() if c < budget), default=None)
            above = min((c for c in seen.values() if c >= budget), default=None)
            info["budget_note"] = (
                f"no tau lands within {BUDGET_TOLERANCE:.0%} of {budget:,}: nearest achievable counts are"
                f" {below:,} and {above:,} (a structured module or whole vector enters between them)"
                if below is not None and above is not None
                else f"nearest achievable count is {count:,}"
            )
        return tau, info

    def sensitive_masks(
        self, model: nn.Module, scores: dict[str, torch.Tensor], tau: int | None = None
    ) -> dict[str, torch.Tensor]:
        """{scored key: boolean mask shaped like its score} of the global top-``tau`` over every candidate matrix
        (``targets``, in block order) and 1-D vector the scorer returned (tau None: configured or searched)."""
        cands = self.candidates(model, scores)
        if tau is None:
            tau = self.resolve_tau(model, cands)[0]
        return cands.masks(tau)

    # --- selection ---------------------------------------------------------------------------------
    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None) -> State:
        if not scores:
            raise ConfigError(f"{self.name} needs sensitivity scores: set scorer=sensitivity")
        cands = self.candidates(model, scores)
        tau, info = self.resolve_tau(model, cands)
        return self.allocate(model, cands, tau, info)

    def allocate(self, model: nn.Module, cands: Candidates, tau: int, info: dict) -> State:
        """SPT's state at ``tau``: structured matrices, sparse matrix entries, whole and sparse vectors."""
        positions, owner = cands.top(tau)
        counts = torch.bincount(owner, minlength=len(cands.units))  # (U,)
        whole, _ = self.unit_costs(cands, counts)
        structured: list[str] = []
        sparse: dict[str, list[torch.Tensor]] = {}
        vectors: list[str] = []
        vector_entries: dict[str, list[torch.Tensor]] = {}
        for i, unit in enumerate(cands.units):
            count = int(counts[i])
            if count == 0:
                continue
            if whole[i] and unit.matrix:
                structured.append(unit.key)
            elif whole[i] and ":" not in unit.key:
                vectors.append(unit.key)  # a whole parameter: unfrozen as is
            elif whole[i]:  # a whole part of the fused qkv bias: all of its entries as deltas
                vector_entries.setdefault(unit.param, []).append(unit.offset + torch.arange(unit.size))
            elif self.unstructured:
                local = positions[owner == i] - unit.start  # (count,) flat positions inside the unit
                if unit.matrix:
                    n_in = cands.keys[unit.key][1][1]
                    rows = unit.block.rows(unit.target)  # slice rows of the holding weight (None = all)
                    r, c = local // n_in, local % n_in
                    holding = r if rows is None else rows.cpu()[r]
                    sparse.setdefault(unit.block.linear_path(unit.target), []).append(holding * n_in + c)
                else:
                    vector_entries.setdefault(unit.param, []).append(unit.offset + local)
        sparse_idx = {path: torch.cat(parts).sort().values for path, parts in sparse.items()}
        vector_idx = {name: torch.cat(parts).sort().values for name, parts in vector_entries.items()}
        params = dict(model.named_parameters())
        n_sparse = sum(int(i.numel()) for i in sparse_idx.values())
        n_struct = sum(u.whole for u in cands.units if u.key in set(structured))
        n_vec = sum(params[v].numel() for v in vectors)
        whole_parts = [u for i, u in enumerate(cands.units) if whole[i] and not u.matrix and ":" in u.key]  # qkv bias
        n_vec += sum(u.size for u in whole_parts)  # whole vectors and whole parts of fused qkv biases
        n_vec_entries = sum(int(i.numel()) for i in vector_idx.values()) - sum(u.size for u in whole_parts)
        n_fixed = self.fixed_params(model)
        summary = {
            "budget": info.get("budget"),
            "tau": int(tau),
            "tau_source": info["tau_source"],
            "trainable_backbone": n_sparse + n_struct + n_vec + n_vec_entries + n_fixed,
            **{k: v for k, v in info.items() if k not in ("budget", "tau_source")},
            "selected": int(tau),
            "structured_matrices": len(structured),
            "structured_params": n_struct,
            "sensitive_in_structured": int(sum(counts[i] for i, u in enumerate(cands.units) if u.key in structured)),
            "unstructured_entries": n_sparse,
            "vectors_tuned": len(vectors) + len(whole_parts),
            "vector_params": n_vec,
            "vector_entries": n_vec_entries,
            "cls_token": n_fixed,
        }
        return {
            "budget": info.get("budget"),
            "tau": int(tau),
            "structured": structured,
            "sparse": sparse_idx,
            "vectors": vectors,
            "vector_entries": vector_idx,
            "cls_token": n_fixed > 0,
            "summary": summary,
        }

    def describe(self, state: State) -> dict:
        return dict(state.get("summary", {}))

    # --- application -------------------------------------------------------------------------------
    def apply(self, model: nn.Module, state: State) -> None:
        params = dict(model.named_parameters())
        vectors = [params[n] for n in state["vectors"]]  # resolved before wrapping renames them
        entries = {params[n]: idx for n, idx in state.get("vector_entries", {}).items()}
        token = anatomy.class_token(model) if state.get("cls_token") else None
        freeze(model)
        self.apply_linears(model, state)
        apply_vector_entries(model, entries)
        for p in vectors + ([token] if token is not None else []):
            p.requires_grad_(True)

    def apply_linears(self, model: nn.Module, state: State) -> None:
        """Wrap every holding linear with its structured row groups and/or sparse delta."""
        structured = set(state["structured"])
        layers: dict[str, tuple[anatomy.BlockView, list[str]]] = {}
        for block, target in anatomy.iter_linear_targets(model, self.targets):
            layers.setdefault(block.linear_path(target), (block, []))[1].append(target)
        for path, (block, targets) in layers.items():
            chosen = [t for t in targets if matrix_key(block, t) in structured]
            indices = state["sparse"].get(path)
            new = self.make_layer(block, block.linear(targets[0]), chosen, indices)
            if new is not None:
                block.set_linear(targets[0], new)

    def make_layer(
        self, block: anatomy.BlockView, layer: nn.Module, chosen: list[str], indices: torch.Tensor | None
    ) -> nn.Module | None:
        """The wrapper for one holding linear (None = leave it as is). SPT-LoRA overrides; default: sparse only."""
        return SparseDeltaLinear(layer, indices) if indices is not None and indices.numel() else None


def apply_vector_entries(model: nn.Module, entries: dict[nn.Parameter, torch.Tensor]) -> None:
    """Tune the given entries of 1-D parameters as deltas: wrap each owning module (found by the parameter's
    identity, so after the linears are wrapped) with :class:`~peftbench.layers.sparse.SparseParams`."""

    entries = {p: idx for p, idx in entries.items() if idx.numel()}
    if not entries:
        return
    owners: dict[str, dict[str, torch.Tensor]] = {}  # module path -> {param name inside it: indices}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p in entries:
            path, _, local = name.rpartition(".")
            owners.setdefault(path, {})[local] = entries.pop(p)
    for path, indices in owners.items():
        # the owner of a linear's bias is the innermost module; wrap the outermost wrapper at the owner's place
        outer = path
        while outer.rsplit(".", 1)[-1] == "base_layer":
            outer = outer.rsplit(".", 1)[0]
        module = model.get_submodule(outer)
        prefix = path[len(outer) + 1 :] if path != outer else ""
        named = {(f"{prefix}.{k}" if prefix else k): v for k, v in indices.items()}
        parent_path, _, child = outer.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, SparseParams(module, named))


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
        self, block: anatomy.BlockView, layer: nn.Module, chosen: list[str], indices: torch.Tensor | None
    ) -> nn.Module | None:
        has_sparse = indices is not None and indices.numel() > 0
        if not chosen:
            return SparseDeltaLinear(layer, indices) if has_sparse else None
        rows = [block.rows(t) for t in chosen]
        rows = None if rows == [None] else rows
        dropout = self.branch_dropout(chosen[0])  # q, k, v share one input (and one dropout, as the authors')
        if has_sparse:
            return SparseLoRALinear(layer, self.rank, indices, rows, scale=self.scale, dropout=dropout)
        return LoRALinear(layer, self.rank, rows, scale=self.scale, dropout=dropout)
