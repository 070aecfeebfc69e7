"""Figures over many runs, read from the results index (``outputs/index.jsonl``, one JSON record per run).

Records kept: ``status == "ok"``, the latest per run (``key``, else ``run_dir``), and with ``--group NAME`` only
those whose ``group`` is NAME (see :func:`peftbench.plots.common.index_records`). Repeated runs of one point
(seeds) are averaged; the number of runs behind a point is in the legend or the annotation.

* ``ne``: Heart-LoRA Fig. 8, accuracy against ne (heads deactivated per layer, from the ``method.ne=`` override,
  else the run's ``selection.ne``), one line per task. ``heart_ne.png``.
* ``params``: SPT Fig. 3a, accuracy against trainable backbone parameters (log x), one marker per method
  variant (the method plus its ``method.*`` overrides), accuracy and parameters averaged over the tasks present.
  ``params.png``.
* ``compression``: TINA Fig. 3, accuracy against the adapters' compression sigma = (block width) / (hidden
  neurons) for TINA (``selection.sigma_final``) and plain adapters (``method.sigma=``, else width / ``method.n``),
  marker area proportional to the trainable parameters, one panel per task. ``compression.png``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftbench.plots.common import (
    PREFIX,
    fail,
    index_records,
    metric,
    out_dir,
    override,
    parse_float,
    plt,
    save,
)

CONF = Path(__file__).resolve().parent.parent.parent / "conf"
#: hidden width of ``method=adapter`` when no ``method.n=`` is given (conf/method/adapter.yaml)
ADAPTER_N = 8
#: block width by timm model family, when the backbone config has no ``arch.embed_dim``
WIDTHS = {"tiny": 192, "small": 384, "base": 768, "large": 1024, "huge": 1280}


#: overrides that never make two runs different experiments (where they write, how they log, which seed / task)
_SAME = ("seed", "dataset", "paths.", "logger", "group", "run_dir", "resume", "keep_checkpoint", "skip_done",
         "hydra", "trainer.enable_progress_bar", "data.num_workers", "callbacks")


def _differing(records: list[dict[str, Any]]) -> list[str]:
    """The overrides some of ``records`` have and others lack (seed, task, paths and logging left out)."""
    sets = [
        {str(o).lstrip("+~") for o in r.get("overrides") or [] if not str(o).lstrip("+~").startswith(_SAME)}
        for r in records
    ]
    return sorted(set.union(*sets) - set.intersection(*sets)) if sets else []


def group_runs(
    records: list[dict[str, Any]], label_of, key: str, index: Path | str = "index", mixed: str = "refuse"
) -> dict[Any, list[dict[str, Any]]]:
    """Records by ``label_of(record)`` (what a figure draws as one point or line), checking that the runs averaged
    into one label differ only in their seed (``key="key_seedless"``) or seed and task (``"key_variant"``).

    Runs that differ in anything else are never averaged silently: ``mixed="refuse"`` stops with one line naming
    the differing overrides; ``"warn"`` prints that line as a warning and averages them anyway. Records written
    before these keys existed fall back to their overrides (seed, task, paths and logging left out).
    """
    if mixed not in ("refuse", "warn"):
        raise ValueError(f"mixed must be 'refuse' or 'warn', got {mixed!r}")
    by: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by[label_of(r)].append(r)
    for label, runs in by.items():
        kinds = {r.get(key) or repr(sorted(_differing([r, {}]))) for r in runs}
        if len(kinds) > 1:
            diff = _differing(runs)
            what = f"differ in {', '.join(diff)}" if diff else "have different configs (their run keys differ)"
            message = (
                f"the runs of {label!r} {what}: they are not one point; pick them with --group / --dataset, or "
                "pass --mixed=warn to average them anyway"
            )
            if mixed == "refuse":
                fail(index, message)
            print(f"{PREFIX}: warning: {index}: {message.split('; pick')[0]} (averaged, as --mixed=warn asks)",
                  file=sys.stderr)
    return by


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean of a non-empty iterable."""
    values = list(values)
    return float(sum(values) / len(values))


def select(records: list[dict[str, Any]], methods: Iterable[str] | None, datasets: Iterable[str] | None) -> list:
    """Records of the given methods and datasets (None = all)."""
    methods, datasets = (set(methods) if methods else None), (set(datasets) if datasets else None)
    return [
        r
        for r in records
        if (methods is None or r.get("method") in methods) and (datasets is None or r.get("dataset") in datasets)
    ]


# --- Heart-LoRA: accuracy vs ne ---------------------------------------------------------------------------
def ne_of(record: dict[str, Any]) -> int | None:
    """Heads deactivated per layer: the ``method.ne=`` override, else the largest ``selection.ne`` value."""
    value = parse_float(override(record.get("overrides"), "method.ne"))
    if value is not None:
        return int(value)
    per_layer = (record.get("selection") or {}).get("ne") or {}
    return max((int(v) for v in per_layer.values()), default=None) if isinstance(per_layer, dict) else None


def ne_curves(
    records: list[dict[str, Any]], datasets: Iterable[str] | None = None, metric_name: str = "test_acc",
    index: Path | str = "index", mixed: str = "refuse",
) -> dict[str, list[tuple[int, float, int]]]:
    """{task: [(ne, mean accuracy, runs), ...] sorted by ne} over the ``heart_lora`` records."""
    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    usable = [r for r in select(records, ["heart_lora"], datasets)
              if ne_of(r) is not None and metric(r, metric_name) is not None]
    for (task, ne), runs in group_runs(
        usable, lambda r: (str(r.get("dataset")), ne_of(r)), "key_seedless", index, mixed
    ).items():
        points[task][ne].extend(metric(r, metric_name) for r in runs)
    return {d: [(ne, mean(a), len(a)) for ne, a in sorted(by.items())] for d, by in sorted(points.items())}


def draw_ne(curves: dict[str, list[tuple[int, float, int]]], metric_name: str, out: Path) -> Path:
    """Write ``heart_ne.png``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, pts in curves.items():
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=task)
    ticks = sorted({p[0] for pts in curves.values() for p in pts})
    ax.set_xticks(ticks)
    ax.set_xlabel("ne (heads deactivated per layer)")
    ax.set_ylabel(f"{metric_name} (%)")
    ax.set_title("Heart-LoRA: accuracy against ne", fontsize=9)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)
    fig.tight_layout()
    return save(fig, out / "heart_ne.png")


# --- accuracy vs trainable parameters per method -----------------------------------------------------------
@dataclass
class Point:
    """One method variant averaged over the tasks it ran on."""

    method: str
    detail: str  # its ``method.*`` overrides, e.g. ``rank=16`` ("" for the method's defaults)
    params: float  # mean trainable backbone parameters (or percent) over tasks
    acc: float  # mean over tasks of the per-task mean accuracy
    tasks: int
    runs: int
    task_names: list[str] | None = None  # which tasks the mean is over

    @property
    def label(self) -> str:
        """``lora`` or ``lora (rank=16)``."""
        return self.method + (f" ({self.detail})" if self.detail else "")


def variant(record: dict[str, Any]) -> tuple[str, str]:
    """(method, its ``method.*`` overrides joined, e.g. ``rank=16, scale=2``): what tells variants apart."""
    extra = sorted(
        str(o).lstrip("+").removeprefix("method.")
        for o in record.get("overrides") or []
        if str(o).lstrip("+").startswith("method.")
    )
    return str(record.get("method")), ", ".join(extra)


def params_points(
    records: list[dict[str, Any]],
    datasets: Iterable[str] | None = None,
    metric_name: str = "test_acc",
    x: str = "trainable_backbone",
    index: Path | str = "index",
    mixed: str = "refuse",
) -> list[Point]:
    """One :class:`Point` per method variant: per task the mean over its runs (seeds), then the mean over tasks.

    ``x``: ``trainable_backbone`` (parameters) or ``tuned_percent`` (of the pre-trained backbone). A variant's runs
    must differ only in seed and task (:func:`group_runs`, ``mixed``).
    """
    usable = [
        r for r in select(records, None, datasets)
        if metric(r, metric_name) is not None and (r.get("params") or {}).get(x) is not None
    ]
    points = []
    for (method, detail), runs in group_runs(usable, variant, "key_variant", index, mixed).items():
        tasks: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in runs:
            tasks[str(r.get("dataset"))].append((float(r["params"][x]), metric(r, metric_name)))
        per_task = [(mean(s for s, _ in v), mean(a for _, a in v)) for v in tasks.values()]
        size, acc = mean(s for s, _ in per_task), mean(a for _, a in per_task)
        points.append(Point(method, detail, size, acc, len(tasks), len(runs), sorted(tasks)))
    return sorted(points, key=lambda p: (p.params, p.label))


def draw_params(points: list[Point], metric_name: str, x: str, out: Path) -> Path:
    """Write ``params.png``: one colour and marker per method, its variants joined by a line and annotated.

    Log x; a variant with 0 parameters sits at the left edge, annotated "0". A point averaged over fewer tasks than
    the most any point has says how many.
    """
    fig, ax = plt.subplots(figsize=(8, 5))
    positive = [p.params for p in points if p.params > 0]
    floor = min(positive) / 3 if positive else 1.0
    most = max(p.tasks for p in points)
    methods = sorted({p.method for p in points})
    markers = "osD^v<>pP*Xh"
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    for i, method in enumerate(methods):
        own = [p for p in points if p.method == method]
        xs = [p.params if p.params > 0 else floor for p in own]
        ys = [100 * p.acc for p in own]
        style = {"color": cmap(i % cmap.N), "marker": markers[i % len(markers)]}
        ax.plot(xs, ys, "-", lw=0.8, ms=7, label=method, **style)
        for p, xv, yv in zip(own, xs, ys):
            note = ("0 params; " if p.params <= 0 else "") + (p.detail if len(own) > 1 else "")
            if p.tasks < most:  # a mean over fewer tasks than other points: say which
                note += f" [only {', '.join(p.task_names or [])}]" if p.task_names else f" [{p.tasks} tasks]"
            if note.strip("; "):
                ax.annotate(note.strip("; "), (xv, yv), textcoords="offset points", xytext=(5, 3), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("trainable backbone parameters (%)" if x == "tuned_percent" else "trainable backbone parameters")
    ax.set_ylabel(f"mean {metric_name} over tasks (%)")
    ax.set_title("accuracy against trainable parameters", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(
        fontsize=7,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        title=f"mean over up to {most} task{'s' * (most != 1)}",
    )
    fig.tight_layout()
    return save(fig, out / "params.png")


# --- TINA vs adapters: accuracy vs compression ------------------------------------------------------------
def backbone_width(name: str | None) -> int | None:
    """Block width of a backbone config (``conf/backbone/<name>.yaml``: ``arch.embed_dim``, the timm family, or the
    timm model itself)."""
    if not name:
        return None
    from omegaconf import OmegaConf

    path = CONF / "backbone" / f"{name}.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    width = OmegaConf.select(cfg, "arch.embed_dim")
    if width:
        return int(width)
    timm_name = str(cfg.get("timm_name") or "")
    width = next((w for family, w in WIDTHS.items() if f"_{family}_" in timm_name), None)
    return width if width is not None or not timm_name else _timm_width(timm_name)


def _timm_width(timm_name: str) -> int | None:
    """Width of timm model ``timm_name`` (e.g. ``vit_micro``), built without memory on the meta device."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(timm_name.split(".")[0], pretrained=False)
    except Exception:  # noqa: BLE001 - not a timm name: the width is unknown
        return None
    return int(getattr(model, "embed_dim", model.num_features))


def sigma_of(record: dict[str, Any]) -> float | None:
    """Compression sigma of a TINA run (``selection.sigma_final``) or a plain adapter run (see module docs)."""
    if record.get("method") == "tina":
        selection = record.get("selection") or {}
        if selection.get("sigma_final") is not None:
            return float(selection["sigma_final"])
        cycles = selection.get("cycles") or []
        return float(cycles[-1]["sigma"]) if cycles else None
    sigma = parse_float(override(record.get("overrides"), "method.sigma"))
    if sigma is not None:
        return sigma
    width = backbone_width(record.get("backbone"))
    n = parse_float(override(record.get("overrides"), "method.n")) or ADAPTER_N
    return None if width is None else width / n


def compression_points(
    records: list[dict[str, Any]], datasets: Iterable[str] | None = None, metric_name: str = "test_acc",
    index: Path | str = "index", mixed: str = "refuse",
) -> dict[str, dict[str, list[tuple[float, float, float, int]]]]:
    """{task: {method: [(sigma, mean accuracy, mean trainable backbone params, runs), ...] by sigma}}."""
    by: dict[str, dict[str, dict[float, list[tuple[float, float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    usable = [r for r in select(records, ["tina", "adapter"], datasets)
              if sigma_of(r) is not None and metric(r, metric_name) is not None]

    def point(r: dict[str, Any]) -> tuple[str, str, float]:
        return str(r.get("dataset")), str(r["method"]), round(sigma_of(r), 3)

    for (task, method, sigma), runs in group_runs(usable, point, "key_seedless", index, mixed).items():
        for r in runs:
            size = (r.get("params") or {}).get("trainable_backbone")
            by[task][method][sigma].append((metric(r, metric_name), float(size or 0)))
    return {
        task: {
            m: [(s, mean(a for a, _ in v), mean(p for _, p in v), len(v)) for s, v in sorted(pts.items())]
            for m, pts in sorted(methods.items())
        }
        for task, methods in sorted(by.items())
    }


def draw_compression(
    points: dict[str, dict[str, list[tuple[float, float, float, int]]]], metric_name: str, out: Path
) -> Path:
    """Write ``compression.png`` (one panel per task; marker area ~ trainable parameters)."""
    tasks = list(points)
    biggest = max((p[2] for t in points.values() for m in t.values() for p in m), default=1.0) or 1.0
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    colors = {"tina": "tab:red", "adapter": "tab:blue"}
    for ax, task in zip(axes[0], tasks):
        for method, pts in points[task].items():
            xs, ys = [p[0] for p in pts], [100 * p[1] for p in pts]
            ax.plot(xs, ys, "-", color=colors.get(method), lw=1)
            ax.scatter(xs, ys, s=[20 + 400 * p[2] / biggest for p in pts], color=colors.get(method), alpha=0.6)
            ax.plot([], [], "o-", color=colors.get(method), label="TINA" if method == "tina" else "adapters")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression sigma = width / hidden neurons")
        ax.set_ylabel(f"{metric_name} (%)")
        ax.set_title(f"{task} (marker area ~ trainable parameters)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out / "compression.png")


# --- entry points -----------------------------------------------------------------------------------------
def ne(
    index: Path,
    out: Path | None = None,
    datasets: list[str] | None = None,
    group: str | None = None,
    metric_name: str = "test_acc",
    mixed: str = "refuse",
) -> list[Path]:
    """Heart-LoRA Fig. 8 from ``index``."""
    curves = ne_curves(index_records(index, group), datasets, metric_name, index, mixed)
    if not curves:
        fail(index, f"no ok heart_lora runs with {metric_name}{where(datasets, group)}; run method=heart_lora first")
    return [draw_ne(curves, metric_name, out_dir(out, Path(index)))]


def params(
    index: Path,
    out: Path | None = None,
    datasets: list[str] | None = None,
    group: str | None = None,
    metric_name: str = "test_acc",
    x: str = "trainable_backbone",
    mixed: str = "refuse",
) -> list[Path]:
    """SPT Fig. 3a from ``index``."""
    points = params_points(index_records(index, group), datasets, metric_name, x, index, mixed)
    if not points:
        fail(index, f"no ok runs with {metric_name} and params.{x}{where(datasets, group)}")
    return [draw_params(points, metric_name, x, out_dir(out, Path(index)))]


def compression(
    index: Path,
    out: Path | None = None,
    datasets: list[str] | None = None,
    group: str | None = None,
    metric_name: str = "test_acc",
    mixed: str = "refuse",
) -> list[Path]:
    """TINA Fig. 3 from ``index``."""
    points = compression_points(index_records(index, group), datasets, metric_name, index, mixed)
    if not points:
        fail(index, f"no ok tina or adapter runs with {metric_name}{where(datasets, group)}")
    return [draw_compression(points, metric_name, out_dir(out, Path(index)))]


def where(datasets: list[str] | None, group: str | None) -> str:
    """`` (dataset ..., group ...)`` for error messages."""
    parts = ([f"dataset in {datasets}"] if datasets else []) + ([f"group {group!r}"] if group else [])
    return f" ({', '.join(parts)})" if parts else ""
