"""TINA's adapter figures from one run dir: neurons per adapter per cycle (Fig. 4), accuracy vs parameters (Fig. 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftbench.plots.common import fail, load_run, plt, save


def load_cycles(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The results record of ``run_dir`` and its TINA cycles; a clear error when the run has none."""
    record, _ = load_run(run_dir)
    cycles = (record.get("selection") or {}).get("cycles")
    if not cycles:
        fail(Path(run_dir) / "results.json", "has no selection.cycles (not a TINA run? pass a method=tina run dir)")
    return record, cycles


def short(slot: str) -> str:
    """``blocks.3.attn.proj`` -> ``3.msa``; ``blocks.3.mlp.fc2`` -> ``3.mlp``."""
    parts = slot.split(".")
    kind = "msa" if "attn" in parts else "mlp"
    index = next((p for p in reversed(parts) if p.isdigit()), "?")
    return f"{index}.{kind}"


def plot_neurons(cycles: list[dict[str, Any]], out: Path) -> Path:
    """One bar panel per cycle: hidden neurons n_i of every adapter slot (0 = adapter removed)."""
    slots = list(cycles[0]["neurons"])
    fig, axes = plt.subplots(
        len(cycles), 1, figsize=(max(6, 0.35 * len(slots)), 1.8 * len(cycles)), sharex=True, squeeze=False
    )
    for ax, cycle in zip(axes[:, 0], cycles):
        counts = [cycle["neurons"][s] for s in slots]
        colors = ["tab:blue" if ".attn." in s else "tab:orange" for s in slots]
        ax.bar(range(len(slots)), counts, color=colors)
        ax.set_ylabel("n_i")
        ax.set_title(f"cycle {cycle['cycle']}: {sum(counts)} neurons, sigma {cycle['sigma']:.0f}", fontsize=9)
    axes[-1, 0].set_xticks(range(len(slots)), [short(s) for s in slots], rotation=90, fontsize=7)
    axes[-1, 0].set_xlabel("adapter (block.msa / block.mlp)")
    fig.tight_layout()
    return save(fig, out / "tina_neurons.png")


def plot_accuracy(record: dict[str, Any], cycles: list[dict[str, Any]], out: Path) -> Path:
    """Last val/acc of each cycle against its trainable backbone parameters (plus the final test accuracy)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    points = [(c["trainable_backbone"], c["val_acc"], c["cycle"]) for c in cycles if c.get("val_acc") is not None]
    if points:
        xs, ys, _ = zip(*points)
        ax.plot(xs, ys, "o-", label="val acc (end of cycle)")
        for x, y, label in points:
            ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    test = (record.get("metrics") or {}).get("test_acc")
    if test is not None:
        ax.plot([cycles[-1]["trainable_backbone"]], [test], "s", color="tab:red", label="test acc (final)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable backbone parameters")
    ax.set_ylabel("accuracy")
    ax.set_title(f"TINA cycles: {record.get('dataset')} ({record.get('backbone')})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out / "tina_accuracy.png")


def adapters(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write the TINA figures of ``run_dir`` into ``out`` (default: the run dir); return their paths."""
    record, cycles = load_cycles(run_dir)
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_neurons(cycles, out), plot_accuracy(record, cycles, out)]
