"""CDRA-SPT Figure 5: rows and columns of every compact sub-matrix, per weight matrix across the layers.

Input: a ``method=cdra_spt`` score file (``python -m peftbench.score scorer=sensitivity method=cdra_spt ...``) or a
``method=cdra_spt`` run dir (its ``method_state.pt``). The selection's ``blocks`` give, per matrix that got a
compact LoRA, the rows R and columns K it adapts and Eq. 7's rank. A score file also has the scores, so the
matrices whose rank came out 0 (tuned sparse, ``rank_fallback=sparse``) are shown too, with the R x K that holds
their sensitive entries (recomputed with :func:`peftbench.methods.cdra_spt.compact_index`), as hollow markers.

Figure: ``cdra_compact.png``, one panel per input: |R| (red) and |K| (blue) per matrix in model order (block,
then q k v o fc1 fc2), dashed lines at their means; below, the rank of each compact LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftbench.methods.cdra_spt import compact_index
from peftbench.plots.common import (
    TYPES,
    fail,
    label_of,
    load_run,
    load_score_file,
    out_dir,
    plt,
    save,
    split_matrix_key,
)
from peftbench.plots.sensitivity import method_targets, selection_tau, sensitive_masks


@dataclass
class Compact:
    """One matrix's compact sub-matrix: |R| rows x |K| columns of its (d, k) weight; rank 0 = no compact LoRA."""

    key: str
    rows: int
    cols: int
    rank: int
    shape: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """``3.q``-style short name (block index, matrix type)."""
        block, kind = split_matrix_key(self.key) or (self.key, "?")
        return f"{block.rsplit('.', 1)[-1]}.{kind}"


def compact_from_state(state: dict[str, Any]) -> list[Compact]:
    """The compact blocks of a CDRA-SPT selection ``state`` (its ``blocks``), in the state's (model) order."""
    found = []
    for specs in state["blocks"].values():
        for spec in specs:
            rows, cols = np.asarray(spec["rows"]).size, np.asarray(spec["cols"]).size
            found.append(Compact(str(spec["key"]), int(rows), int(cols), int(spec["rank"])))
    return found


def compact_from_scores(record: dict[str, Any]) -> list[Compact]:
    """Every matrix with sensitive entries: the state's compact blocks, plus R x K of those left without one."""
    state = record["state"]
    saved = {c.key: c for c in compact_from_state(state)}
    masks, _ = sensitive_masks(record["scores"], selection_tau(state), method_targets(record.get("overrides")))
    found = []
    for key, mask in masks.items():
        shape = (int(mask.shape[0]), int(mask.shape[1]))
        if key in saved:
            saved[key].shape = shape
            found.append(saved.pop(key))
        elif mask.any():
            rows, cols = compact_index(mask)
            found.append(Compact(key, int(rows.numel()), int(cols.numel()), 0, shape))
    return found + list(saved.values())


def order(found: list[Compact]) -> list[Compact]:
    """Sort by block (order of first appearance) then matrix type."""
    blocks: list[str] = []
    for c in found:
        block = (split_matrix_key(c.key) or (c.key, ""))[0]
        if block not in blocks:
            blocks.append(block)

    def rank(c: Compact) -> tuple[int, int]:
        block, kind = split_matrix_key(c.key) or (c.key, "")
        return blocks.index(block), TYPES.index(kind) if kind in TYPES else len(TYPES)

    return sorted(found, key=rank)


def load(path: Path) -> tuple[str, list[Compact]]:
    """(task label, compact sub-matrices) of a CDRA-SPT score file or run dir."""
    path = Path(path)
    if path.is_dir():
        record, state = load_run(path)
        if record.get("method") not in (None, "cdra_spt") or not isinstance(state, dict) or "blocks" not in state:
            fail(path, "is not a method=cdra_spt run with a method_state.pt; pass a cdra_spt run dir or score file")
        label = str(record.get("dataset") or path.name)
        return label, order(compact_from_state(state))
    record = load_score_file(path)
    state = record.get("state")
    if not isinstance(state, dict) or "blocks" not in state:
        fail(path, "has no CDRA-SPT selection; score with scorer=sensitivity method=cdra_spt")
    return label_of(record.get("overrides"), path.stem), order(compact_from_scores(record))


def draw(tasks: list[tuple[str, list[Compact]]], out: Path) -> Path:
    """Write ``cdra_compact.png`` (one column of panels per task) into ``out``."""
    n = max(len(found) for _, found in tasks)
    fig, axes = plt.subplots(
        2,
        len(tasks),
        figsize=(1.5 + max(4.0, 0.22 * n) * len(tasks), 5.2),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        sharex="col",
    )
    for (label, found), top, bottom in zip(tasks, axes[0], axes[1]):
        x = np.arange(len(found))
        rows = np.array([c.rows for c in found])
        cols = np.array([c.cols for c in found])
        lora = np.array([c.rank > 0 for c in found], dtype=bool)
        for values, color, name in ((rows, "tab:red", "rows |R|"), (cols, "tab:blue", "columns |K|")):
            top.plot(x, values, "-", color=color, lw=1)
            top.plot(x[lora], values[lora], "o", color=color, ms=4, label=f"{name}, mean {values.mean():.0f}")
            if (~lora).any():
                top.plot(x[~lora], values[~lora], "o", mfc="none", color=color, ms=4)
            top.axhline(values.mean(), color=color, ls="--", lw=0.8)
        top.set_ylabel("rows / columns")
        top.set_title(
            f"{label}: {int(lora.sum())} compact LoRA"
            + (f", {int((~lora).sum())} rank 0 (sparse, hollow)" if (~lora).any() else ""),
            fontsize=9,
        )
        top.legend(fontsize=7)
        bottom.bar(x, [c.rank for c in found], color="tab:gray")
        bottom.set_ylabel("rank r")
        bottom.set_xticks(x, [c.name for c in found], rotation=90, fontsize=6)
        bottom.set_xlabel("weight matrix (block.type)")
    fig.tight_layout()
    return save(fig, out / "cdra_compact.png")


def cdra(inputs: list[Path], out: Path | None = None) -> list[Path]:
    """Write CDRA-SPT Fig. 5 for score files / run dirs ``inputs`` into ``out`` (default: beside the first)."""
    tasks = [load(Path(p)) for p in inputs]
    for (label, found), path in zip(tasks, inputs):
        if not found:
            fail(path, f"its selection ({label}) has no compact sub-matrix and no sensitive matrix to show")
    return [draw(tasks, out_dir(out, Path(inputs[0])))]
