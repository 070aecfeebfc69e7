"""SPT Figure 4: where the sensitive parameters lie, per block (depth) and per matrix type, for one or more tasks.

Input: score files of ``python -m peftbench.score scorer=sensitivity method=spt_lora ... out=<file>`` (also
``spt_adapter`` / ``cdra_spt``: same selection). "Sensitive" = the method's global top-tau entries: the mask is
recomputed from the file's ``scores`` exactly as :meth:`peftbench.methods.spt_lora.SPT.select` builds it (same
candidate order, same tie rule, the state's ``tau``: the method's budget is trainable parameters, tau the number
of sensitive entries it chose for it), then checked against the saved selection (total selected;
for SPT, every unstructured matrix's entries equal the state's sparse indices) so the figure cannot silently drift
from what the method tunes.

Figures: ``sensitivity.png`` (upper: sensitive share of each block's matrix entries against depth, one line per
task; lower: share of each matrix type's entries, q k v o(=proj) fc1 fc2, grouped bars per task) and
``sensitivity_matrices.png`` (one heat map per task, blocks x types, share of each matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftbench.plots.common import (
    TYPES,
    fail,
    label_of,
    load_score_file,
    out_dir,
    override,
    parse_list,
    plt,
    save,
    split_matrix_key,
)
from peftbench.scorers.base import top_mask

_QKV = ("q", "k", "v")


@dataclass
class Sensitive:
    """Sensitive entries of one task: ``counts[b, t]`` of ``sizes[b, t]`` entries (block b, type ``TYPES[t]``).

    ``sizes`` is 0 where a block has no candidate matrix of that type.
    """

    label: str
    blocks: list[str]
    counts: np.ndarray  # (B, T) int
    sizes: np.ndarray  # (B, T) int
    selected: int  # all selected entries, vectors included (tau)

    def per_matrix(self) -> np.ndarray:
        """(B, T) share of each matrix's entries that are sensitive (nan where there is no matrix)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.sizes > 0, self.counts / np.maximum(self.sizes, 1), np.nan)

    def per_block(self) -> np.ndarray:
        """(B,) share of each block's candidate matrix entries that are sensitive."""
        return self.counts.sum(1) / np.maximum(self.sizes.sum(1), 1)

    def per_type(self) -> np.ndarray:
        """(T,) share of each matrix type's entries (over all blocks) that are sensitive."""
        return self.counts.sum(0) / np.maximum(self.sizes.sum(0), 1)

    def depth_distribution(self) -> np.ndarray:
        """(B,) each block's part of all sensitive matrix entries (sums to 1; SPT's "normalised over blocks")."""
        total = self.counts.sum()
        return self.counts.sum(1) / total if total else np.zeros(len(self.blocks))


def method_targets(overrides: list[str]) -> set[str] | None:
    """Candidate matrix types of the method from a ``method.targets=`` override (``proj`` -> ``o``), else None."""
    targets = parse_list(override(overrides, "method.targets"))
    return None if targets is None else {"o" if t == "proj" else t for t in targets}


def sensitive_masks(
    scores: dict[str, torch.Tensor], tau: int, targets: set[str] | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """SPT's global top-``tau`` mask per candidate matrix, and the number selected in all (vectors included).

    Candidates as :meth:`SPT.select`: the matrices (2-D scores of the method's ``targets``) in score order, then
    the 1-D scores (vectors) in score order; one :func:`top_mask` over their concatenation.
    """
    matrices = [
        k for k, v in scores.items() if v.ndim == 2 and (m := split_matrix_key(k)) and (not targets or m[1] in targets)
    ]
    vectors = [k for k, v in scores.items() if v.ndim == 1 and split_matrix_key(k) is None and ":" not in k]
    keys = matrices + vectors
    if not matrices:
        return {}, 0
    flat = torch.cat([scores[k].detach().float().flatten().cpu() for k in keys])  # (N,)
    mask = top_mask(flat, int(tau))
    masks, start = {}, 0
    for k in keys:
        n = scores[k].numel()
        masks[k], start = mask[start : start + n].view(scores[k].shape), start + n
    return {k: masks[k] for k in matrices}, int(mask.sum())


def selection_tau(state: dict[str, Any]) -> int:
    """The number of sensitive entries a saved SPT selection chose (``tau``; older files: their ``budget`` was tau)."""
    return int(state["tau"] if state.get("tau") is not None else state["budget"])


def sparse_indices(masks: dict[str, torch.Tensor], skip: set[str]) -> dict[str, torch.Tensor]:
    """{holding linear path: sorted flat indices} of the sensitive entries of every matrix not in ``skip``.

    q/k/v are row slices of the fused qkv (C rows each, in q, k, v order), as :meth:`BlockView.rows` says.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    for key, mask in masks.items():
        if key in skip or not mask.any():
            continue
        name, _, part = key.partition(":")
        path = name[: -len(".weight")]
        rows, cols = mask.nonzero(as_tuple=True)
        if part in _QKV:
            rows = rows + _QKV.index(part) * mask.shape[0]
        parts.setdefault(path, []).append(rows * mask.shape[1] + cols)
    return {path: torch.cat(p).sort().values for path, p in parts.items()}


def check_selection(path: Path, masks: dict[str, torch.Tensor], selected: int, state: dict[str, Any]) -> None:
    """Fail when the recomputed mask disagrees with the saved selection ``state``."""
    summary = state.get("summary") or {}
    if "selected" in summary and int(summary["selected"]) != selected:
        fail(path, f"recomputed {selected} sensitive entries but its selection has {summary['selected']}")
    if "structured" in state and state.get("sparse"):  # SPT: every unstructured matrix's entries are saved
        expected = sparse_indices(masks, set(state["structured"]))
        saved = {p: torch.as_tensor(i).flatten().sort().values for p, i in state["sparse"].items()}
        if set(expected) != set(saved) or any(not torch.equal(expected[p], saved[p]) for p in saved):
            fail(path, "the sensitive entries recomputed from its scores differ from its selection's sparse entries")


def sensitive_from_record(record: dict[str, Any], path: Path, check: bool = True) -> Sensitive:
    """Per block and type sensitive counts of one score-file record (see the module docstring)."""
    state = record.get("state")
    if not isinstance(state, dict) or "budget" not in state:
        fail(path, "has no SPT selection (state); score with scorer=sensitivity method=spt_lora (or cdra_spt)")
    overrides = list(record.get("overrides") or [])
    masks, selected = sensitive_masks(record["scores"], selection_tau(state), method_targets(overrides))
    if not masks:
        fail(path, "has no matrix sensitivity scores; score with scorer=sensitivity")
    if check:
        check_selection(path, masks, selected, state)
    blocks: list[str] = []
    for key in masks:
        block = split_matrix_key(key)[0]
        if block not in blocks:
            blocks.append(block)
    counts = np.zeros((len(blocks), len(TYPES)), dtype=np.int64)
    sizes = np.zeros_like(counts)
    for key, mask in masks.items():
        block, kind = split_matrix_key(key)
        b, t = blocks.index(block), TYPES.index(kind)
        counts[b, t] += int(mask.sum())
        sizes[b, t] += mask.numel()
    return Sensitive(label_of(overrides, Path(path).stem), blocks, counts, sizes, selected)


def load(path: Path) -> Sensitive:
    """:class:`Sensitive` of a score file."""
    return sensitive_from_record(load_score_file(path), Path(path))


def draw(tasks: list[Sensitive], out: Path) -> list[Path]:
    """Write ``sensitivity.png`` and ``sensitivity_matrices.png`` into ``out``."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5))
    for task in tasks:
        top.plot(range(len(task.blocks)), 100 * task.per_block(), "o-", label=task.label)
    depth = max(len(t.blocks) for t in tasks)
    top.set_xticks(range(depth))
    top.set_xlabel("block (depth)")
    top.set_ylabel("sensitive share of the block (%)")
    top.set_title(f"sensitive parameters (top-tau, tau = {tasks[0].selected:,}) per block", fontsize=9)
    top.legend(fontsize=8)
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        top_x = np.arange(len(TYPES)) + (i - (len(tasks) - 1) / 2) * width
        bottom.bar(top_x, 100 * task.per_type(), width=width, label=task.label)
    bottom.set_xticks(range(len(TYPES)), [f"W_{t}" for t in TYPES])
    bottom.set_xlabel("weight matrix type (o = attention output projection)")
    bottom.set_ylabel("sensitive share of the type (%)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    paths = [save(fig, out / "sensitivity.png")]

    fig, axes = plt.subplots(
        1, len(tasks), figsize=(1.6 + 2.4 * len(tasks), 1.2 + 0.35 * depth), squeeze=False, layout="constrained"
    )
    vmax = max(float(np.nanmax(t.per_matrix())) for t in tasks) * 100 or 1.0
    for ax, task in zip(axes[0], tasks):
        image = ax.imshow(100 * task.per_matrix(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(TYPES)), TYPES, fontsize=8)
        ax.set_yticks(range(len(task.blocks)), range(len(task.blocks)), fontsize=8)
        ax.set_title(task.label, fontsize=9)
    axes[0, 0].set_ylabel("block")
    fig.colorbar(image, ax=axes[0].tolist(), label="sensitive share of the matrix (%)")
    paths.append(save(fig, out / "sensitivity_matrices.png"))
    return paths


def sensitivity(files: list[Path], out: Path | None = None) -> list[Path]:
    """Write SPT Fig. 4 for the score ``files`` (one task each) into ``out`` (default: beside the first file)."""
    tasks = [load(Path(f)) for f in files]
    return draw(tasks, out_dir(out, Path(files[0])))
