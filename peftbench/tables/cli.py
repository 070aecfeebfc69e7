"""``python -m peftbench.tables <name> [scale=smoke|mini|paper] [selection=val|paper] [seeds=0,1,2] [launcher=<name>]
[logger=wandb] [tasks=<t1>,<t2>] [output_dir=outputs] [<key>=<value> ...] [--render-only] [--dry-run]`` and
``python -m peftbench.tables --list``. The table's options are the keys of ``conf/tables.yaml``, composed with Hydra
like every entry point's; any other ``key=value`` goes to the runs.

Regenerates a paper table from its spec: launches the runs that are not ``ok`` in the results index (row by row,
one Hydra multirun per row and phase), selects per cell, and writes ``<output_dir>/tables/<name>/<scale>/`` with
``table.md`` (printed), ``table.csv``, ``table.tex`` and ``cells.json`` (every cell's runs). Any other ``key=value``
is passed to every run (and is part of the runs' keys: pass the same ones again to re-render).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from peftbench.errors import PeftbenchError
from peftbench.records.results import latest_by_key
from peftbench.tables.launch import run_all, sweeps
from peftbench.tables.plan import Composer, Outcome, check_composes, plan_rows, resolve_final, select
from peftbench.tables.render import (
    build_cells,
    caption,
    cells_json,
    csv_text,
    latex,
    log_wandb,
    markdown,
    write_outputs,
)
from peftbench.tables.spec import (
    ACCOUNTING_DATASET,
    NOT_IN_PEFTBENCH,
    SCALES,
    Spec,
    SpecError,
    layout,
    list_specs,
    load_spec,
)

USAGE = __doc__


#: the command line's flags: shorthands of the boolean keys of ``conf/tables.yaml``
FLAGS = {"--list": "list=true", "--render-only": "render_only=true", "--dry-run": "dry_run=true"}
_LISTS = ("seeds", "tasks")  # comma lists without brackets are accepted: seeds=0,1,2


def parse(argv: list[str]) -> dict[str, Any]:
    """Split ``argv`` into the table's options (composed from ``conf/tables.yaml``), overrides for every run
    (``extra``) and launcher settings for the sweeps (``hydra``); one-line :class:`SpecError` for bad input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from peftbench.compose import CONFIG_DIR, compose_config

    own_keys = set(OmegaConf.load(Path(CONFIG_DIR) / "tables.yaml"))
    own: list[str] = []
    extra: list[str] = []
    hydra: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if arg in FLAGS:
            own.append(FLAGS[arg])
        elif arg.startswith("-"):
            raise SpecError(f"{arg}: unknown flag (use {', '.join(FLAGS)}; every other option is key=value)")
        elif "=" not in arg:
            if any(o.startswith("name=") for o in own):
                raise SpecError(f"{arg}: one table at a time (got {own[0].split('=', 1)[1]} already)")
            own.insert(0, f"name={arg}")
        else:
            key, value = arg.split("=", 1)
            if key in _LISTS and "," in value and not value.startswith("["):
                own.append(f"{key}=[{value}]")
            elif key in own_keys:
                own.append(arg)
            elif key == "paths.output_dir":
                own.append(f"output_dir={value}")
            elif key.lstrip("+~").startswith("hydra"):  # launcher settings: for the sweeps only, not the runs' keys
                hydra.append(arg)
            else:
                extra.append(arg)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in own:  # name the one that does not parse
        try:
            OverridesParser.create().parse_overrides([override])
        except HydraException as err:
            raise SpecError(f"{override}: {str(err).strip().splitlines()[0]} (Hydra override syntax)") from err
    try:
        cfg = OmegaConf.to_container(compose_config(own, config_name="tables"), resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise SpecError(f"{' '.join(own)}: {str(err).strip().splitlines()[0]}") from err
    cfg.pop("_choices_", None)
    opts = _checked(cfg)
    logger = [a.split("=", 1)[1] for a in extra if a.split("=", 1)[0] == "logger"]
    opts.update(extra=extra, hydra=hydra, logger=logger[-1] if logger else None)
    if opts["name"] is None and not opts["list"]:
        raise SpecError("no table named (e.g. `python -m peftbench.tables spt_1 scale=smoke`; --list lists them)")
    return opts


def _checked(cfg: dict[str, Any]) -> dict[str, Any]:
    """The composed options, each checked for its type and range."""
    if cfg["scale"] not in SCALES:
        raise SpecError(f"scale={cfg['scale']}: unknown scale (use {' or '.join(SCALES)})")
    if cfg["selection"] not in ("val", "paper"):
        raise SpecError(f"selection={cfg['selection']}: unknown (use val or paper)")
    seeds, tasks = cfg["seeds"], cfg["tasks"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if seeds is not None and not (isinstance(seeds, list) and all(type(s) is int for s in seeds)):
        raise SpecError(f"seeds={cfg['seeds']}: not a list of integers (e.g. seeds=0,1,2)")
    if isinstance(tasks, str):
        tasks = [tasks]
    if tasks is not None and not (isinstance(tasks, list) and all(isinstance(t, str) and t for t in tasks)):
        raise SpecError(f"tasks={cfg['tasks']}: not a list of column names (e.g. tasks=cifar100,dtd)")
    for key in ("dry_run", "render_only", "list"):
        if not isinstance(cfg[key], bool):
            raise SpecError(f"{key}={cfg[key]}: not true or false")
    for key in ("name", "output_dir", "launcher"):
        if cfg[key] is not None and not isinstance(cfg[key], str):
            raise SpecError(f"{key}={cfg[key]}: not a name")
    return {
        "name": cfg["name"], "scale": cfg["scale"], "selection": cfg["selection"], "seeds": seeds or None,
        "tasks": tasks or None, "launcher": check_launcher(cfg["launcher"]) if cfg["launcher"] else None,
        "output_dir": cfg["output_dir"] or "outputs", "list": cfg["list"], "render_only": cfg["render_only"],
        "dry_run": cfg["dry_run"],
    }


PLUGIN_LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm")


def check_launcher(name: str) -> str:
    """A Hydra launcher: ``conf/hydra/launcher/<name>.yaml`` or one of the installed plugins' own configs."""
    from peftbench.compose import CONFIG_DIR

    ours = sorted(p.stem for p in (Path(CONFIG_DIR) / "hydra" / "launcher").glob("*.yaml"))
    if name not in ours and name not in PLUGIN_LAUNCHERS:
        raise SpecError(
            f"launcher={name}: unknown Hydra launcher (use one of: {', '.join(ours + list(PLUGIN_LAUNCHERS))})"
        )
    return name


def list_tables() -> None:
    for path in list_specs():
        try:
            spec = load_spec(path)
        except PeftbenchError as err:
            print(f"{path.stem:16s} INVALID: {err}")
            continue
        runnable = sum(r.runnable for r in spec.rows)
        print(f"{spec.name:16s} {spec.benchmark:9s} {runnable:2d} run / {len(spec.rows):2d} rows  {spec.title}")


def accounting(spec: Spec, scale: str, extra: list[str], composer: Composer) -> dict[str, dict[str, Any]]:
    """Trainable parameters of every runnable row without training (tables without accuracy columns)."""
    from peftbench.accounting import paper_fraction
    from peftbench.params import parameter_accounting
    from peftbench.tables.plan import common_overrides

    out = {}
    for row in spec.rows:
        if not row.runnable:
            continue
        common = common_overrides(spec, row, scale, extra)
        column = [ACCOUNTING_DATASET[scale]]
        try:
            report = parameter_accounting(copy.deepcopy(composer.config(common, column, ["seed=0"])))
            tuned_percent, params_m = paper_fraction(report)  # backbone + head, as the papers count
            out[row.name] = {
                "tuned_percent": tuned_percent,
                "params_m": params_m,
                "overrides": [*common, *column],
            }
        except Exception as err:  # noqa: BLE001 - recorded in the cell
            out[row.name] = {"error": f"{type(err).__name__}: {err}", "overrides": [*common, *column]}
    return out


def regenerate(opts: dict[str, Any]) -> str:
    spec = load_spec(opts["name"])
    scale, selection = opts["scale"], opts["selection"]
    seeds = opts["seeds"] or list(SCALES[scale].seeds)
    out_root = Path(opts["output_dir"])
    extra = [f"paths.output_dir={out_root}", *opts["extra"]]
    lay = layout(spec, scale, opts["tasks"])
    composer = Composer()
    published_only = spec.benchmark in NOT_IN_PEFTBENCH and scale == "paper"
    if published_only and not opts["render_only"] and any(r.runnable for r in spec.rows):
        raise SpecError(
            f"{spec.where()}: the {spec.benchmark} datasets are not in peftbench, so scale=paper cannot"
            " run this table (scale=smoke runs it on vtab-mini; --render-only shows the published rows)"
        )
    first = None if published_only else check_composes(spec, scale, extra, composer)
    index_file = Path(OmegaConf.select(first, "paths.index_file")) if first is not None else out_root / "index.jsonl"
    group = f"{spec.name}-{scale}"
    table_dir = out_root / "tables" / spec.name / scale
    outcomes: dict[str, dict[tuple[str, int], Outcome]] = {}
    acc: dict[str, dict[str, Any]] = {}
    runnable = bool(lay.tasks) and not published_only
    if not published_only and not lay.tasks:
        acc = accounting(spec, scale, extra, composer)
    elif runnable:
        plans = plan_rows(spec, lay, scale, selection, seeds, extra, composer)
        if opts["dry_run"]:
            for plan in plans:
                for args, members in sweeps(plan.phase1, by_values=False):
                    print(
                        f"# {plan.row.name}: {len(members)} run(s)\npython -m peftbench.train --multirun "
                        + " ".join(args)
                        + f" skip_done=true group={group}"
                        + (f" hydra/launcher={opts['launcher']}" if opts["launcher"] else "")
                        + "".join(f" {h}" for h in opts["hydra"])
                    )
            return ""
        for i, plan in enumerate(plans):
            label = f"[{i + 1}/{len(plans)}] {plan.row.name}"
            outcomes[plan.row.name] = run_row(
                plan, lay, seeds, selection, spec.metric, index_file, group, out_root, table_dir, opts, label, composer
            )
    table = build_cells(spec, lay, scale, seeds, outcomes, acc)
    cap = caption(spec, scale, selection, seeds, bool(lay.tasks))
    tag = f"scale={scale}" + (f", selection={selection}" if lay.tasks else "")
    md = markdown(spec, lay, table, cap, tag)
    write_outputs(
        table_dir,
        md,
        csv_text(spec, table, scale, selection),
        latex(spec, lay, table, cap),
        cells_json(spec, lay, table, scale, selection, seeds, group, index_file),
    )
    if opts["logger"] == "wandb":
        where = log_wandb(
            spec,
            lay,
            table,
            scale,
            table_dir,
            {"table": spec.name, "scale": scale, "selection": selection, "seeds": seeds},
        )
        print(f"peftbench.tables: W&B table logged ({where})", file=sys.stderr)
    print(f"peftbench.tables: wrote {table_dir}/table.md, table.csv, table.tex, cells.json", file=sys.stderr)
    return md


def run_row(plan, lay, seeds, selection, metric, index_file, group, out_root, table_dir, opts, label, composer):
    """Phase 1 (and phase 2 of selection=val with a search) of one row; (task, seed) -> Outcome."""
    render_only = opts["render_only"]
    errors: dict[str, str] = {}
    latest = latest_by_key(index_file)

    def launch(runs: list, by_values: bool, what: str) -> None:
        """Run what is not ``ok`` yet (unless render-only), record sweep errors, refresh ``latest``."""
        nonlocal latest
        todo = [r for r in runs if latest.get(r.key, {}).get("status") != "ok"]
        if todo and not render_only:
            errors.update(
                run_all(todo, by_values=by_values, group=group, out_root=out_root, table_dir=table_dir,
                        launcher=opts["launcher"], hydra=opts["hydra"], label=what,
                        tags=["table:{}".format(group.rsplit("-", 1)[0]), "scale:{}".format(group.rsplit("-", 1)[-1])])
            )
            latest = latest_by_key(index_file)

    launch(plan.phase1, False, label)
    has_search = len(plan.grid) > 1  # a grid trimmed to one point (scale=mini) has nothing to choose
    outcomes = {}
    for task in lay.tasks:
        for seed in seeds:
            runs = [r for r in plan.phase1 if r.task == task and r.seed == seed]
            outcomes[(task, seed)] = select(runs, latest, selection, metric, has_search)
    finals = [o.final for o in outcomes.values() if o.final is not None]
    if finals:
        for f in finals:
            f.key = composer.key(f.common, f.column, f.sets)
        launch(finals, True, f"{label} (final, selected on val)")
        for o in outcomes.values():
            if o.final is not None:
                resolve_final(o, latest, metric)
    for o in outcomes.values():
        pending = [o.final.key] if o.final is not None else [s["key"] for s in o.searched if s["status"] != "ok"]
        if o.status == "missing" and any(k in errors for k in pending):
            o.status = "failed"
            o.error = next(errors[k] for k in pending if k in errors)
    return outcomes


def main(argv: list[str] | None = None) -> None:
    try:
        opts = parse(sys.argv[1:] if argv is None else argv)
        if opts["list"]:
            list_tables()
            return
        md = regenerate(opts)
        if md:
            print(md)
    except PeftbenchError as err:
        print(f"peftbench.tables: error: {err}", file=sys.stderr)
        sys.exit(1)
