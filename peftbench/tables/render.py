"""Cells of a table (ours, published, difference, provenance) and their Markdown, CSV, LaTeX and W&B renderings."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftbench.accounting import paper_fraction
from peftbench.tables.plan import Outcome
from peftbench.tables.spec import ACCOUNTING_DATASET, PARAM_KEYS, SCALES, Layout, Spec

PARAM_LABEL = {"tuned_percent": "Tuned / Total (%)", "params_m": "Params (M)"}


@dataclass
class Cell:
    status: str  # ok | failed | missing | published (published-only row)
    mean: float | None = None
    std: float | None = None
    n: int = 0
    published: float | None = None
    diff: float | None = None
    error: str | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def combine(parts: list[tuple[str, float | None]]) -> tuple[str, float | None]:
    """Mean of parts (status, value): failed if any failed, missing if any missing."""
    statuses = {s for s, _ in parts}
    if not parts:
        return "missing", None
    if "failed" in statuses:
        return "failed", None
    if "missing" in statuses:
        return "missing", None
    return "ok", _mean([v for _, v in parts])


def summary_value(
    key: str, members: list[str], lay: Layout, spec: Spec, per_task: dict[str, tuple[str, float | None]]
) -> tuple[str, float | None]:
    """A summary column for one seed: group / shots means of tasks; ``mean`` per ``mean_of`` (groups: of groups)."""
    if key == "mean" and spec.mean_of == "groups":
        groups: dict[str, list[str]] = {}
        for t in members:
            groups.setdefault(lay.tasks.get(t, ""), []).append(t)
        if len(groups) > 1 or "" not in groups:
            return combine([combine([per_task[t] for t in ts]) for ts in groups.values()])
    return combine([per_task[t] for t in members])


def param_value(record: dict[str, Any], key: str) -> float | None:
    params = record.get("params") or {}
    tuned_percent, params_m = paper_fraction(params)  # backbone + head, as the papers count
    if key == "tuned_percent":
        return tuned_percent
    if key == "params_m" and params_m is not None:
        return params_m
    return (record.get("metrics") or {}).get(key)


def across_seeds(per_seed: list[tuple[str, float | None]]) -> Cell:
    status, _ = combine(per_seed)
    if status != "ok":
        return Cell(status=status, n=len(per_seed))
    values = [v for _, v in per_seed]
    return Cell(
        status="ok", mean=_mean(values), std=statistics.stdev(values) if len(values) > 1 else None, n=len(values)
    )


def build_cells(
    spec: Spec,
    lay: Layout,
    scale: str,
    seeds: list[int],
    outcomes: dict[str, dict[tuple[str, int], Outcome]],
    accounting: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Cell]]:
    """Row name -> column key (params key first) -> Cell."""
    table: dict[str, dict[str, Cell]] = {}
    columns = ([spec.params] if spec.params != "none" else []) + lay.shown
    cpu = SCALES[scale].embedded  # vit_micro on vtab-mini: nothing here reproduces a published ViT-B number
    for row in spec.rows:
        if cpu and not row.runnable:
            continue  # a published-only row has nothing to show at a CPU scale
        cells: dict[str, Cell] = {}
        got = outcomes.get(row.name)
        for col in columns:
            published = None if cpu else row.published.get(col)
            if row.runnable and not lay.tasks and row.name in accounting:  # parameters counted without training
                got = {}
            if not row.runnable or got is None:
                cells[col] = Cell(status="published" if row.published else "missing", published=published)
                continue
            if col in lay.tasks:
                per_seed = [(got[(col, s)].status, got[(col, s)].value) for s in seeds]
                cell = across_seeds(per_seed)
                cell.runs = [_provenance(got[(col, s)], s) for s in seeds]
                errors = [got[(col, s)].error for s in seeds if got[(col, s)].status == "failed"]
                cell.error = errors[0] if errors else None
            elif col in lay.summaries:
                members = lay.summaries[col]
                per_seed = []
                for s in seeds:
                    per_task = {t: (got[(t, s)].status, got[(t, s)].value) for t in lay.tasks}
                    per_seed.append(summary_value(col, members, lay, spec, per_task))
                cell = across_seeds(per_seed)
                cell.runs = [{"summary_of": members, "mean_of": spec.mean_of if col == "mean" else "tasks"}]
            else:  # the params column, or an extra (params_m, latency_ms ...): mean over the reported runs
                cell = _extra(col, row.name, lay, seeds, got, accounting)
            cell.published = published
            if cell.mean is not None and published is not None:
                cell.diff = cell.mean - published
            cells[col] = cell
        table[row.name] = cells
    return table


def _extra(col: str, row: str, lay: Layout, seeds: list[int], got: dict, accounting: dict) -> Cell:
    if not lay.tasks:  # a table without tasks: parameters counted without training
        acc = accounting.get(row) or {}
        if acc.get("error"):
            return Cell(status="failed", error=acc["error"], runs=[{"accounting": acc.get("overrides")}])
        value = acc.get(col) if col in PARAM_KEYS else None
        return Cell(
            status="ok" if value is not None else "missing",
            mean=value,
            n=1 if value is not None else 0,
            runs=[{"accounting": acc.get("overrides")}] if acc else [],
        )
    values, failed = [], False
    for (_task, _seed), out in got.items():
        if out.status == "ok" and out.record is not None and (v := param_value(out.record, col)) is not None:
            values.append(v)
        failed |= out.status == "failed"
    if not values:
        return Cell(status="failed" if failed else "missing")
    return Cell(status="ok", mean=_mean(values), n=len(values), runs=[{"mean_over_runs": len(values)}])


def _provenance(out: Outcome, seed: int) -> dict[str, Any]:
    rec = out.record or {}
    info: dict[str, Any] = {
        "seed": seed,
        "status": out.status,
        "key": rec.get("key"),
        "run_dir": rec.get("run_dir"),
        "protocol": rec.get("protocol"),
    }
    if out.final is not None and not rec:
        info["key"] = out.final.key
    if out.chosen:
        info["chosen"] = out.chosen
    if len(out.searched) > 1 or out.chosen:
        info["searched"] = out.searched
    if out.error:
        info["error"] = out.error
    return info


# --- text ------------------------------------------------------------------------------------------------------
def _decimals(col: str, published: float | None) -> int:
    base = 2 if col in PARAM_KEYS else 1
    if published is not None:
        text = repr(published)
        if "." in text and "e" not in text:
            base = max(base, len(text.split(".")[1]))
    return base


def column_decimals(table: dict[str, dict[str, Cell]]) -> dict[str, int]:
    """Per column, the most decimals any published number of it was typed with (72.90 is typed 72.9 in YAML)."""
    out: dict[str, int] = {}
    for cells in table.values():
        for col, cell in cells.items():
            out[col] = max(out.get(col, 0), _decimals(col, cell.published))
    return out


def cell_text(col: str, cell: Cell, pm: str = "±", decimals: int | None = None) -> str:
    d = decimals if decimals is not None else _decimals(col, cell.published)
    pub = f"{cell.published:.{d}f}" if cell.published is not None else None
    if cell.status == "ok":
        ours = f"{cell.mean:.{d}f}" + (f"{pm}{cell.std:.{d}f}" if cell.std is not None else "")
    elif cell.status == "failed":
        ours = "failed"
    else:
        ours = "–"
    if pub is None:
        return ours
    if cell.diff is not None:
        return f"{ours} ({pub}, {cell.diff:+.{d}f})"
    return f"{ours} ({pub})"


def header(spec: Spec, lay: Layout) -> list[str]:
    params = [PARAM_LABEL[spec.params]] if spec.params != "none" else []
    return ["Method", *params, *[PARAM_LABEL.get(c, c) for c in lay.shown]]


def row_label(spec: Spec, name: str) -> str:
    row = next(r for r in spec.rows if r.name == name)
    return name if row.runnable else f"{name} (published only)"


def caption(spec: Spec, scale: str, selection: str, seeds: list[int], runnable: bool) -> list[str]:
    lines = [f"{spec.title} ({spec.source}).", f"Scale `{scale}`: {SCALES[scale].description}."]
    if not runnable:
        lines.append(
            "Our side shows trainable parameters only, counted without training on"
            f" `{ACCOUNTING_DATASET[scale]}`; the other columns are the paper's measurements (costs are"
            " measured by `make bench`, not here). Cells: ours (published, ours − published); – none."
        )
        return [*lines, *([spec.note] if spec.note else []), *(f"{r.name}: {r.note}" for r in spec.rows if r.note)]
    if selection == "val":
        lines.append(
            "Model selection `selection=val`: a searched row picks its values on val200 after training on"
            " train800, then one run on train800val200 reports the last-epoch test accuracy; a row without"
            " a search is that final run."
        )
    else:
        lines.append(
            "Model selection `selection=paper` (the papers' habit): the MAXIMUM test accuracy over epochs"
            " and over the searched grid is reported, i.e. the test set selects the model."
        )
    seed_txt = f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    if SCALES[scale].embedded:
        lines.append(
            f"Cells: ours ({seed_txt}, x100); – not run yet; `failed`: the run failed (error and run directory in"
            " cells.json). No published number is set beside these: they come from vit_micro on the embedded"
            " vtab-mini tasks, not from ViT-B/16 on VTAB-1k" + (" (smoke: a pipeline check, every method near"
            " chance)." if scale == "smoke" else ".")
        )
    else:
        lines.append(
            f"Cells: ours ({seed_txt}, x100) then (published, ours − published); – not run yet;"
            " `failed`: the run failed (error and run directory in cells.json)."
        )
    if spec.note:
        lines.append(spec.note)
    lines += [f"{r.name}: {r.note}" for r in spec.rows if r.note]
    return lines


def markdown(spec: Spec, lay: Layout, table: dict[str, dict[str, Cell]], cap: list[str], tag: str = "") -> str:
    head = header(spec, lay)
    cols = list(next(iter(table.values())).keys()) if table else []
    dec = column_decimals(table)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, cells in table.items():
        out.append(
            "| " + " | ".join([row_label(spec, name), *(cell_text(c, cells[c], decimals=dec[c]) for c in cols)]) + " |"
        )
    title = f"**{spec.name}**{f' ({tag})' if tag else ''}: {cap[0]}"
    return "\n".join([title, "", *out, "", *(f"- {line}" for line in cap[1:])]) + "\n"


def csv_text(spec: Spec, table: dict[str, dict[str, Cell]], scale: str, selection: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "table",
            "scale",
            "selection",
            "row",
            "column",
            "status",
            "ours",
            "ours_std",
            "n",
            "published",
            "diff",
            "run_dirs",
            "chosen",
            "error",
        ]
    )
    for name, cells in table.items():
        for col, c in cells.items():
            run_dirs = ";".join(r["run_dir"] for r in c.runs if r.get("run_dir"))
            chosen = (
                json.dumps([r["chosen"] for r in c.runs if r.get("chosen")])
                if any(r.get("chosen") for r in c.runs)
                else ""
            )
            fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
            w.writerow(
                [
                    spec.name,
                    scale,
                    selection,
                    name,
                    col,
                    c.status,
                    fmt(c.mean),
                    fmt(c.std),
                    c.n,
                    "" if c.published is None else repr(c.published),
                    fmt(c.diff),
                    run_dirs,
                    chosen,
                    c.error or "",
                ]
            )
    return buf.getvalue()


def _tex(text: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("†", r"$^\dagger$"),
        ("–", "--"),
        ("−", "-"),
    ):
        text = text.replace(a, b)
    return text


def latex(spec: Spec, lay: Layout, table: dict[str, dict[str, Cell]], cap: list[str]) -> str:
    head = header(spec, lay)
    cols = list(next(iter(table.values())).keys()) if table else []
    dec = column_decimals(table)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
        r"\hline",
        " & ".join(_tex(h) for h in head) + r" \\",
        r"\hline",
    ]
    for name, cells in table.items():
        texts = [_tex(cell_text(c, cells[c], "PLUSMINUS", dec[c])).replace("PLUSMINUS", r"$\pm$") for c in cols]
        lines.append(" & ".join([_tex(row_label(spec, name)), *texts]) + r" \\")
    lines += [
        r"\hline",
        r"\end{tabular}",
        r"\caption{" + _tex(" ".join(cap)) + "}",
        r"\label{tab:" + spec.name.replace("_", "-") + "}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def cells_json(
    spec: Spec,
    lay: Layout,
    table: dict[str, dict[str, Cell]],
    scale: str,
    selection: str,
    seeds: list[int],
    group: str,
    index_file: Path,
) -> dict[str, Any]:
    return {
        "table": spec.name,
        "title": spec.title,
        "source": spec.source,
        "spec": str(spec.path),
        "scale": scale,
        "selection": selection,
        "seeds": seeds,
        "group": group,
        "index": str(index_file),
        "metric": spec.metric,
        "tasks": lay.tasks,
        "summaries": lay.summaries,
        "rows": [
            {
                "name": row.name,
                "overrides": row.overrides,
                "search": row.search,
                "note": row.note,
                "cells": {c: asdict(cell) for c, cell in table[row.name].items()},
            }
            for row in spec.rows
            if row.name in table  # a published-only row is left out at a CPU scale
        ],
    }


def write_outputs(out_dir: Path, md: str, csv_: str, tex: str, cells: dict[str, Any]) -> None:
    from peftbench.records.results import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(md)
    (out_dir / "table.csv").write_text(csv_)
    (out_dir / "table.tex").write_text(tex)
    write_json_atomic(out_dir / "cells.json", cells)


def log_wandb(
    spec: Spec, lay: Layout, table: dict[str, dict[str, Cell]], scale: str, out_dir: Path, config: dict[str, Any]
) -> str:
    """Log the rendered table as a ``wandb.Table`` in one run ``table-<name>-<scale>``, group ``<name>-<scale>``."""
    import os

    import wandb

    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    cols = list(next(iter(table.values())).keys()) if table else []
    dec = column_decimals(table)
    wb = wandb.Table(
        columns=header(spec, lay),
        data=[
            [row_label(spec, n), *(cell_text(c, cells[c], decimals=dec[c]) for c in cols)] for n, cells in table.items()
        ],
    )
    run = wandb.init(
        project="peftbench",
        group=f"{spec.name}-{scale}",
        name=f"table-{spec.name}-{scale}",
        job_type="table",
        mode=mode,
        dir=str(out_dir),
        config=config,
        reinit=True,
    )
    run.log({f"table/{spec.name}": wb})
    path = run.dir
    run.finish()
    return str(path)
