"""CDRA-SPT (Chen et al., CVPR 2025): compact dynamic-rank adaptation of SPT's sensitive sub-matrices.

1. SPT's selection, reused as is (:class:`~peftbench.methods.spt_lora.SPTLoRA`): one global top-tau over all
   candidate entries; a matrix is Case 2 of Eq. 1 (SPT would give it LoRA of rank ``spt_rank``) when its
   sensitive count >= LoRA params / alpha, else Case 1 (SPT would tune its sensitive entries alone).
2. Reorganize (Eq. 4, Alg. 1): count sensitive entries per row and per column, sort rows and columns by count
   (descending, ties by index); R = rows with >= 1 sensitive entry, K = columns with >= 1 (Alg. 1's row_dim /
   col_dim), so W[R][:, K] holds every sensitive entry (block "10" of Eq. 4).
3. Dynamic rank (Eq. 7): r = max r with  count >= r (|R| + |K|) * (d k) / (|R| |K|)  (d x k the matrix, q/k/v
   slice 768 x 768), hence trainable r (|R| + |K|) <= count. Delta B A (|R| x |K|) is added at rows R x cols K
   (:class:`~peftbench.layers.compact_lora.CompactLoRALinear`), merges into W like LoRA.

Rows/cols are the torch (out, in) weight's; Alg. 1 writes w as (in, out), so its "rows" are our columns. Since
R and K are both defined by "has a sensitive entry", the transposition changes nothing for block 10.

Choices where the paper is silent (all in config):
* ``rank_fallback``: Eq. 7 can give r = 0 (too few sensitive entries for even rank 1): ``sparse`` (default) tunes
  that matrix's sensitive entries alone (<= count parameters, Eq. 7's goal kept), ``none`` leaves it frozen.
* ``size_factor`` (Table 6, x0.5 / x1.5): scales |R| and |K| each (clamped to [1, full]), taking rows/cols in
  the sorted order; Eq. 7 keeps the whole matrix's sensitive count.
* ``block`` (Table 7): first digit = row set (1: the top |R| rows, 0: the others), second = column set
  (0: the top |K| columns, 1: the others), so "10" = sensitive rows x sensitive columns as in the paper's Fig. 3.
  Eq. 7 uses the chosen block's dimensions; an empty block (all rows sensitive, say) falls back as r = 0.
* ``cases`` (Table 5): which of SPT's cases get CDRA; a case left out keeps SPT's treatment (Case 1: sparse
  entries; Case 2: LoRA rank ``spt_rank`` on the whole matrix, built as one full-size block).
* Vectors (norms, biases), the fused qkv bias's q/k/v parts and the class token follow SPT (paper silent): whole
  when >= 1/beta sensitive, else their sensitive entries; the class token tuned and counted.
* ``budget`` (the paper's top-gamma is not printed): ``budget_of: spt`` (default) takes tau from SPT-LoRA of rank
  ``spt_rank``: the tau whose SPT-LoRA trainable count is nearest the budget, SPT's selection reused as is, so
  CDRA trains fewer parameters than SPT-LoRA at the same selection, as every ablation of the paper shows (one
  selection, Params (%) from 0.29 to 1.45 in Tables 4-7). ``budget_of: cdra`` searches tau for CDRA's own count
  (not monotone in tau: bisection plus neighbours, a heuristic). ``tau`` set: used as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.layers.compact_lora import CompactLoRALinear
from peftbench.layers.sparse import SparseDeltaLinear
from peftbench.methods.base import State, freeze
from peftbench.methods.spt_lora import Candidates, SPTLoRA, apply_vector_entries

BLOCKS = ("00", "01", "10", "11")


def dynamic_rank(count: int, d_bar: int, k_bar: int, d: int, k: int) -> int:
    """Eq. 7: the largest r with count >= r (d_bar + k_bar) d k / (d_bar k_bar); 0 when none (or empty block)."""
    if d_bar <= 0 or k_bar <= 0:
        return 0
    return int((count * d_bar * k_bar) // ((d_bar + k_bar) * d * k))  # exact integer floor


def compact_index(mask: torch.Tensor, size_factor: float = 1.0, block: str = "10") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the compact sub-matrix of a boolean sensitivity ``mask`` (d, k) (Alg. 1 reorganize).

    Returns (rows (|R|,), cols (|K|,)), each sorted ascending (the order of rows/cols inside the block does not
    matter for the delta, which is learnt). See the module docstring for ``size_factor`` and ``block``.
    """
    if block not in BLOCKS:
        raise ConfigError(f"block must be one of {BLOCKS}, got {block!r}")
    d, k = mask.shape
    row_count = mask.sum(1)  # (d,) sensitive entries per row
    r_map = torch.sort(row_count, descending=True, stable=True).indices  # (d,)
    col_count = mask.sum(0)  # (k,) per column
    c_map = torch.sort(col_count, descending=True, stable=True).indices  # (k,)
    n_rows, n_cols = int((row_count > 0).sum()), int((col_count > 0).sum())
    if size_factor != 1.0 and n_rows and n_cols:
        n_rows = min(d, max(1, round(n_rows * size_factor)))
        n_cols = min(k, max(1, round(n_cols * size_factor)))
    rows = r_map[:n_rows] if block[0] == "1" else r_map[n_rows:]
    cols = c_map[:n_cols] if block[1] == "0" else c_map[n_cols:]
    return rows.sort().values, cols.sort().values


def _to_holding(slice_rows: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a q/k/v slice (|R|,) as rows of the fused holding weight (identity for a whole matrix)."""
    return rows if slice_rows is None else slice_rows.cpu()[rows]


class CDRASPT(SPTLoRA):
    """CDRA-SPT: SPT's selection, then LoRA of dynamic rank on each matrix's compact sensitive sub-matrix.

    Args:
        budget, tau, alpha, beta, targets, cls_token: as SPT (trainable target, or tau itself; Case 1/2
            threshold; vector threshold; candidate matrices; class token).
        budget_of: whose trainable count the budget targets: ``spt`` (SPT-LoRA of rank ``spt_rank``, default) or
            ``cdra`` (this method's own).
        rank: None = Eq. 7's dynamic rank; an int = fixed rank for every compact block (Table 4 ablation).
        spt_rank: SPT's LoRA rank r that defines Case 1 / Case 2 (and the LoRA of a Case 2 left to SPT).
        size_factor: scales the compact sub-matrix's rows and columns (Table 6: 0.5, 1.0, 1.5).
        block: which reorganized block is adapted (Table 7: "00", "01", "10" (the method), "11").
        cases: SPT cases handled by CDRA (Table 5): [1, 2] (the method), [1], [2], [] (= SPT-LoRA).
        rank_fallback: what an r = 0 matrix gets: "sparse" (its sensitive entries) or "none".
        scale: multiplier of every delta.
    """

    def __init__(
        self,
        budget: int | float | str | None = "0.47%",
        tau: int | float | str | None = None,
        budget_of: str = "spt",
        rank: int | None = None,
        spt_rank: int = 8,
        size_factor: float = 1.0,
        block: str = "10",
        cases: Sequence[int] = (1, 2),
        rank_fallback: str = "sparse",
        scale: float = 1.0,
        alpha: float = 10.0,
        beta: float = 5.0,
        targets: Sequence[str] = anatomy.TARGETS,
        cls_token: bool = True,
    ) -> None:
        super().__init__(
            rank=spt_rank,
            scale=scale,
            budget=budget,
            tau=tau,
            alpha=alpha,
            beta=beta,
            targets=targets,
            dropout=0.0,
            cls_token=cls_token,
        )
        block = str(block).zfill(2)  # a CLI override block=01 arrives as the int 1
        if block not in BLOCKS:
            raise ConfigError(f"block must be one of {BLOCKS}, got {block!r}")
        if rank_fallback not in ("sparse", "none"):
            raise ConfigError(f"rank_fallback must be 'sparse' or 'none', got {rank_fallback!r}")
        if not set(cases) <= {1, 2}:
            raise ConfigError(f"cases must be a subset of [1, 2], got {list(cases)}")
        if budget_of not in ("spt", "cdra"):
            raise ConfigError(f"budget_of must be 'spt' or 'cdra', got {budget_of!r}")
        self.fixed_rank = None if rank is None else int(rank)
        self.size_factor, self.block = float(size_factor), block
        self.cases, self.rank_fallback = tuple(sorted({int(c) for c in cases})), rank_fallback
        self.budget_of = budget_of

    @property
    def name(self) -> str:
        return "cdra_spt"

    def trainable_at(self, model: nn.Module, cands: Candidates, tau: int) -> int:
        if self.budget_of == "spt":
            return super().trainable_at(model, cands, tau)  # SPT-LoRA's count (rank spt_rank) at this tau
        return self.compact(model, cands, tau)[3]["trainable_backbone"]

    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None) -> State:
        if not scores:
            raise ConfigError(f"{self.name} needs sensitivity scores: set scorer=sensitivity")
        cands = self.candidates(model, scores)
        tau, info = self.resolve_tau(model, cands)
        blocks, sparse, spt, summary = self.compact(model, cands, tau)
        summary = {
            "budget": info.get("budget"),
            "budget_of": self.budget_of,
            "tau": int(tau),
            "tau_source": info["tau_source"],
            "trainable_backbone": summary.pop("trainable_backbone"),
            **{k: v for k, v in info.items() if k not in ("budget", "tau_source")},
            "spt_trainable": spt["summary"]["trainable_backbone"],
            **summary,
        }
        return {
            "budget": info.get("budget"),
            "tau": int(tau),
            "blocks": blocks,
            "sparse": sparse,
            "vectors": spt["vectors"],
            "vector_entries": spt["vector_entries"],
            "cls_token": spt["cls_token"],
            "summary": summary,
        }

    def compact(self, model: nn.Module, cands: Candidates, tau: int) -> tuple[dict, dict, State, dict]:
        """(compact blocks per holding linear, sparse entries per holding linear, SPT's state, summary) at tau."""
        spt = self.allocate(model, cands, tau, {"tau_source": "given"})  # SPT's allocation: Case 2, vectors
        masks = cands.masks(tau)  # SPT's (matrices and vectors; only matrices used here)
        case2 = set(spt["structured"])
        blocks: dict[str, list[dict]] = {}
        sparse: dict[str, list[torch.Tensor]] = {}
        stats = {
            "compact_matrices": 0,
            "compact_params": 0,
            "spt_lora_matrices": 0,
            "spt_lora_params": 0,
            "fallback_matrices": 0,
            "sparse_entries": 0,
            "frozen_sensitive": 0,
        }
        ranks: list[int] = []
        for unit in cands.units:
            if not unit.matrix:
                continue
            key, block, target = unit.key, unit.block, unit.target
            mask = masks[key]  # (d, k) in the slice
            count = int(mask.sum())
            if count == 0:
                continue
            case = 2 if key in case2 else 1
            slice_rows = block.rows(target)  # (d,) rows of the holding weight, None = all
            path = block.linear_path(target)
            d, k = mask.shape

            if case not in self.cases:  # SPT's own treatment of this case (Table 5 ablations)
                if case == 2:
                    blocks.setdefault(path, []).append(
                        {
                            "key": key,
                            "rows": _to_holding(slice_rows, torch.arange(d)),
                            "cols": torch.arange(k),
                            "rank": self.rank,
                        }
                    )
                    stats["spt_lora_matrices"] += 1
                    stats["spt_lora_params"] += self.rank * (d + k)
                else:
                    r, c = mask.nonzero(as_tuple=True)
                    sparse.setdefault(path, []).append(_to_holding(slice_rows, r) * k + c)
                    stats["sparse_entries"] += count
                continue
            rows, cols = compact_index(mask, self.size_factor, self.block)  # (|R|,), (|K|,)
            if self.fixed_rank is not None and rows.numel() and cols.numel():
                rank = self.fixed_rank
            else:
                rank = dynamic_rank(count, rows.numel(), cols.numel(), d, k)
            if rank >= 1:
                blocks.setdefault(path, []).append(
                    {"key": key, "rows": _to_holding(slice_rows, rows), "cols": cols, "rank": rank}
                )
                ranks.append(rank)
                stats["compact_matrices"] += 1
                stats["compact_params"] += rank * (rows.numel() + cols.numel())
            elif self.rank_fallback == "sparse":  # Eq. 7 gives r = 0; the paper is silent: tune the entries
                r, c = mask.nonzero(as_tuple=True)
                sparse.setdefault(path, []).append(_to_holding(slice_rows, r) * k + c)
                stats["fallback_matrices"] += 1
                stats["sparse_entries"] += count
            else:
                stats["frozen_sensitive"] += count
        sparse_idx = {path: torch.cat(parts).sort().values for path, parts in sparse.items()}
        s = spt["summary"]
        n_vec = s["vector_params"] + s["vector_entries"] + s["cls_token"]
        summary = {
            "trainable_backbone": stats["compact_params"] + stats["spt_lora_params"] + stats["sparse_entries"] + n_vec,
            "selected": int(tau),
            "case1_matrices": sum(1 for key, m in masks.items() if m.ndim == 2 and key not in case2 and bool(m.any())),
            "case2_matrices": len(case2),
            **stats,
            "rank_mean": float(sum(ranks) / len(ranks)) if ranks else 0.0,
            "rank_max": max(ranks, default=0),
            "vectors_tuned": s["vectors_tuned"],
            "vector_params": s["vector_params"],
            "vector_entries": s["vector_entries"],
            "cls_token": s["cls_token"],
        }
        return blocks, sparse_idx, spt, summary

    def apply(self, model: nn.Module, state: State) -> None:
        params = dict(model.named_parameters())
        vectors = [params[n] for n in state["vectors"]]  # resolved before wrapping renames them
        entries = {params[n]: idx for n, idx in state.get("vector_entries", {}).items()}
        token = anatomy.class_token(model) if state.get("cls_token") else None
        freeze(model)
        seen: set[str] = set()
        for block, target in anatomy.iter_linear_targets(model, self.targets):
            path = block.linear_path(target)
            if path in seen:
                continue
            seen.add(path)
            specs = state["blocks"].get(path, [])
            indices = state["sparse"].get(path)
            layer = block.linear(target)
            if specs:
                new = CompactLoRALinear(
                    layer, [(s["rows"], s["cols"], int(s["rank"])) for s in specs], indices, scale=self.scale
                )
            elif indices is not None and indices.numel():
                new = SparseDeltaLinear(layer, indices)
            else:
                continue
            block.set_linear(target, new)
        apply_vector_entries(model, entries)
        for p in vectors + ([token] if token is not None else []):
            p.requires_grad_(True)
