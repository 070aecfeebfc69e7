"""Layers x heads heat maps of the head-level methods: HiFi's chosen heads, Heart-LoRA's deactivated heads.

* HiFi: a score file of ``python -m peftbench.score scorer=hifi method=hifi ... out=<file>`` gives the
  information richness I_h (``<block>.attn:info``), the PageRank p*_h (``<block>.attn:pagerank``) and the chosen
  heads (``state["heads"]``); a ``method=hifi`` run dir gives the chosen heads (results.json ``selection``), and
  its ``num_heads`` / ``pagerank`` / ``info`` ({block path: per-head list}) should HiFi's describe() record them.
  Figure ``hifi_heads.png``: I_h, PageRank (chosen heads boxed) and the chosen heads.
* Heart-LoRA: a ``method=heart_lora`` run dir: its responsiveness per head and layer and the deactivated heads
  (results.json ``selection.scores`` / ``deactivated``, else ``method_state.pt``). Figure ``heart_heads.png``:
  responsiveness divided by each layer's maximum (deactivated heads boxed), the deactivated heads, and for
  ``granularity=global`` the responsiveness accumulated over layers, the quantity Heart-LoRA ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import Rectangle

from peftbench.plots.common import fail, label_of, load_run, load_score_file, out_dir, plt, save


@dataclass
class HeadMaps:
    """Per-head quantities of one selection: each map is (layers, heads), nan where a layer has fewer heads.

    ``maps``: name -> values (e.g. I_h, PageRank, responsiveness); ``marked``: the heads the method chose
    (HiFi: tuned; Heart-LoRA: deactivated), named ``mark``.
    """

    method: str
    label: str
    layers: list[str]
    marked: np.ndarray  # (L, H) bool
    mark: str
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def layer_index(path: str) -> str:
    """``blocks.3.attn.qkv`` / ``blocks.3`` -> ``3`` (``layers.1.blocks.0`` -> ``1.0``)."""
    digits = [p for p in path.split(".") if p.isdigit()]
    return ".".join(digits) or path


def grid(layers: list[str], values: dict[str, Any], heads: int) -> np.ndarray:
    """(L, heads) float array from {layer: per-head list/tensor}, nan-padded."""
    out = np.full((len(layers), heads), np.nan)
    for i, layer in enumerate(layers):
        row = np.asarray(values.get(layer, []), dtype=float).flatten()
        out[i, : row.size] = row
    return out


def chosen(layers: list[str], picked: dict[str, Any], heads: int) -> np.ndarray:
    """(L, heads) bool: True at the picked heads of each layer."""
    out = np.zeros((len(layers), heads), dtype=bool)
    for i, layer in enumerate(layers):
        for h in picked.get(layer, []) or []:
            out[i, int(h)] = True
    return out


def hifi_from_record(record: dict[str, Any], path: Path) -> HeadMaps:
    """HiFi maps of a ``scorer=hifi method=hifi`` score-file record."""
    scores, state = record["scores"], record.get("state")
    info = {k[: -len(".attn:info")]: v for k, v in scores.items() if k.endswith(".attn:info")}
    rank = {k[: -len(".attn:pagerank")]: v for k, v in scores.items() if k.endswith(".attn:pagerank")}
    if not rank:
        fail(path, "has no '<block>.attn:pagerank' scores; score with scorer=hifi method=hifi")
    layers = list(rank)
    heads = max(int(v.numel()) for v in rank.values())
    picked = (state or {}).get("heads", {}) if isinstance(state, dict) else {}
    maps = {"information richness I_h": grid(layers, info, heads), "PageRank p*_h": grid(layers, rank, heads)}
    label = label_of(record.get("overrides"), path.stem)
    return HeadMaps("hifi", label, layers, chosen(layers, picked, heads), "chosen (tuned) heads", maps)


def hifi_from_run(record: dict[str, Any], path: Path) -> HeadMaps:
    """HiFi's chosen heads of a ``method=hifi`` run (no scores are saved with a run)."""
    picked = (record.get("selection") or {}).get("heads") or {}
    if not picked:
        fail(path, "has no selection.heads; pass a method=hifi run dir or a scorer=hifi score file")
    layers = list(picked)
    heads = max(max(h, default=-1) for h in picked.values()) + 1
    selection = record.get("selection") or {}
    heads = int(selection.get("num_heads") or heads)
    maps = {  # saved only if HiFi's describe() records them ({block path: per-head list})
        title: grid(layers, selection[name], heads)
        for name, title in (("info", "information richness I_h"), ("pagerank", "PageRank p*_h"))
        if isinstance(selection.get(name), dict)
    }
    label = str(record.get("dataset") or path.name)
    return HeadMaps("hifi", label, layers, chosen(layers, picked, heads), "chosen (tuned) heads", maps)


def heart_from_run(record: dict[str, Any], state: dict[str, Any] | None, path: Path) -> HeadMaps:
    """Heart-LoRA's responsiveness and deactivated heads of a ``method=heart_lora`` run."""
    selection = record.get("selection") or {}
    scores = selection.get("scores") or (state or {}).get("scores") or {}
    deactivated = selection.get("deactivated") or (state or {}).get("deactivated") or {}
    if not scores and not deactivated:
        fail(path, "has no responsiveness scores or deactivated heads (did training pass Heart-LoRA's warm-up?)")
    layers = list(scores or deactivated)
    heads = max([len(np.asarray(v).flatten()) for v in scores.values()] or [0])
    heads = max(heads, *(max(v, default=-1) + 1 for v in deactivated.values())) if deactivated else heads
    maps = {}
    extra: dict[str, Any] = {"granularity": selection.get("granularity"), "score": selection.get("score")}
    if scores:
        raw = grid(layers, scores, heads)
        maps["responsiveness"] = raw
        extra["accumulated"] = np.nansum(raw, axis=0)  # (H,) the global ranking quantity
    label = str(record.get("dataset") or path.name)
    return HeadMaps("heart_lora", label, layers, chosen(layers, deactivated, heads), "deactivated heads", maps, extra)


def load(path: Path) -> HeadMaps:
    """:class:`HeadMaps` of a HiFi score file, a HiFi run dir or a Heart-LoRA run dir."""
    path = Path(path)
    if path.is_dir():
        record, state = load_run(path)
        method = record.get("method")
        selection = record.get("selection") or {}
        if method == "heart_lora" or "deactivated" in selection:
            return heart_from_run(record, state, path)
        if method == "hifi" or "heads" in selection:
            return hifi_from_run(record, path)
        fail(path, f"is a {method} run; pass a method=hifi or method=heart_lora run dir")
    return hifi_from_record(load_score_file(path), path)


def box(ax: Any, marked: np.ndarray, color: str = "red") -> None:
    """Outline the True cells of ``marked`` (L, H) on heat map ``ax``."""
    for i, j in zip(*np.nonzero(marked)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=color, lw=1.5))


def heat(fig: Any, ax: Any, values: np.ndarray, maps: HeadMaps, title: str, colorbar: bool = True) -> None:
    """One layers x heads heat map (with its colour bar, or a black-and-white mask when ``colorbar`` is False)."""
    cmap = "viridis" if colorbar else "Greys"
    image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(range(values.shape[1]), range(values.shape[1]), fontsize=7)
    ax.set_yticks(range(len(maps.layers)), [layer_index(x) for x in maps.layers], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    if colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)


def draw(maps: HeadMaps, out: Path) -> Path:
    """Write ``hifi_heads.png`` or ``heart_heads.png`` into ``out``."""
    panels: list[tuple[str, np.ndarray, bool]] = []
    for name, values in maps.maps.items():
        if maps.method == "heart_lora":
            peak = np.nanmax(np.abs(values), axis=1, keepdims=True)
            values = values / np.where(peak > 0, peak, 1.0)
            name = f"{name} / layer max"
        panels.append((name, values, True))
    panels.append((maps.mark, maps.marked.astype(float), False))
    accumulated = maps.extra.get("accumulated")
    show_acc = accumulated is not None and maps.extra.get("granularity") == "global"
    n = len(panels) + int(show_acc)
    width = max(3.2, 0.3 * maps.marked.shape[1] + 1.6)
    fig, axes = plt.subplots(1, n, figsize=(width * n, 0.9 + 0.32 * len(maps.layers) + 1.2), squeeze=False)
    for ax, (name, values, boxed) in zip(axes[0], panels):
        heat(fig, ax, values, maps, name, colorbar=boxed)
        if boxed:
            box(ax, maps.marked)
    if show_acc:
        ax = axes[0, -1]
        cols = np.where(maps.marked.any(0), "tab:red", "tab:blue")
        ax.bar(range(accumulated.size), accumulated, color=cols)
        ax.set_xticks(range(accumulated.size), range(accumulated.size), fontsize=7)
        ax.set_xlabel("head")
        ax.set_title("accumulated over layers (red: deactivated)", fontsize=9)
    extra = ", ".join(f"{k} {v}" for k, v in maps.extra.items() if k != "accumulated" and v is not None)
    boxed_note = f"boxed: {maps.mark}"
    fig.suptitle(f"{maps.method}: {maps.label}" + (f" ({extra})" if extra else "") + f"; {boxed_note}", fontsize=9)
    fig.tight_layout()
    name = "hifi_heads.png" if maps.method == "hifi" else "heart_heads.png"
    return save(fig, out / name)


def heads(source: Path, out: Path | None = None) -> list[Path]:
    """Write the heads figure of a HiFi score file / run dir or a Heart-LoRA run dir into ``out``."""
    return [draw(load(Path(source)), out_dir(out, Path(source)))]
