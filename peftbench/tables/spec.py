"""Table specs (``conf/table/<name>.yaml``, format in ``conf/table/SCHEMA.md``): benchmarks, scales, load + validate.

A spec is validated before anything runs; every problem is a :class:`SpecError` that the command line prints as one
line (``peftbench.tables: error: <file>: <what> (what to do)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from peftbench.data.embedded import TASKS as EMBEDDED
from peftbench.data.embedded import VTAB_MINI as EMBEDDED_SUITE
from peftbench.data.vtab import vtab_groups
from peftbench.errors import PeftbenchError

TABLE_DIR = Path(__file__).resolve().parent.parent.parent / "conf" / "table"

# --- benchmarks: the paper-scale columns ------------------------------------------------------------------------
VTAB_GROUPS = vtab_groups()  # group -> the papers' column keys (cifar100, ...), from peftbench.data.vtab
FGVC_TASKS = ["cub", "nabirds", "flowers", "dogs", "cars"]
FEWSHOT_TASKS = ["fgvc_aircraft", "food101", "oxford_flowers102", "oxford_pets", "stanford_cars"]
FEWSHOT_SHOTS = [1, 2, 4, 8, 16]
DOMAINNET_TASKS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
BENCHMARKS = ("vtab", "fgvc", "fewshot", "domainnet", "multitask", "none")
NOT_IN_PEFTBENCH = ("domainnet", "multitask")  # tables of these benchmarks are published-only at paper scale
PARAM_KEYS = ("tuned_percent", "params_m")
KEY_RE = re.compile(r"^[a-z][a-z0-9_@]*$")

# --- scales: the ONE place that says what `scale=paper` and `scale=smoke` run -----------------------------------
#: vtab-mini, the embedded suite (conf/dataset/embedded/): task -> VTAB group (from peftbench.data.embedded)
VTAB_MINI = {name: EMBEDDED[name].group for name in EMBEDDED_SUITE}


@dataclass(frozen=True)
class Scale:
    """What a scale runs: overrides put first on every run, default seeds, and how far search grids are trimmed."""

    name: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    max_grid_values: int | None  # per searched key; None: the whole grid
    description: str
    embedded: bool = False  # runs vtab-mini with vit_micro on a CPU: no published number is set beside ours


SCALES = {
    "paper": Scale(
        "paper",
        (),
        (0, 1, 2),
        None,
        "the papers' tasks and backbones (the spec's `overrides.paper`); for GPU machines",
    ),
    "smoke": Scale(
        "smoke",
        (
            "backbone=vit_micro",
            "logger=none",
            "trainer.max_epochs=1",
            "scheduler.warmup_epochs=0",
            "trainer.enable_progress_bar=false",
        ),
        (0,),
        2,
        "vtab-mini (7 embedded tasks) with the embedded vit_micro, 1 epoch, grids trimmed to their 2 central values;"
        " a pipeline check (every method near chance), minutes on a CPU",
        embedded=True,
    ),
    "mini": Scale(
        "mini",
        ("backbone=vit_micro", "logger=none", "trainer.enable_progress_bar=false"),
        (0, 1, 2),
        1,
        "vtab-mini (7 embedded tasks) with the embedded vit_micro at the tasks' recipe (30 epochs, 3 warm-up, lr"
        " 3e-3), seeds 0, 1, 2, grids trimmed to their central value (no search); methods separate, about an hour"
        " on 2 CPU cores for a three-row table",
        embedded=True,
    ),
}
#: benchmark `none` tables without accuracy columns: the dataset a row's parameters are counted on
ACCOUNTING_DATASET = {"paper": "dataset=vtab/cifar100", "smoke": "dataset=embedded/digits",
                      "mini": "dataset=embedded/digits"}


class SpecError(PeftbenchError):
    """A problem with a table spec or the tables command line; ``str`` is ``<file>: <what> (what to do)``."""


@dataclass
class Row:
    name: str
    overrides: list[str] | None  # None: published-only
    search: dict[str, list[Any]] = field(default_factory=dict)
    published: dict[str, float] = field(default_factory=dict)
    note: str | None = None

    @property
    def runnable(self) -> bool:
        return self.overrides is not None


@dataclass
class Spec:
    name: str
    path: Path
    title: str
    source: str
    benchmark: str
    columns: list[str] | None
    mean_of: str
    metric: str
    params: str
    overrides: dict[str, list[str]]
    rows: list[Row]
    note: str | None = None

    def where(self) -> str:
        try:
            return str(self.path.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(self.path)


# --- columns ------------------------------------------------------------------------------------------------------
def paper_tasks(benchmark: str, columns: list[str] | None) -> dict[str, str]:
    """Paper-scale task key -> its group ("" when the benchmark has no groups)."""
    if benchmark in ("vtab", "none"):
        return {t: g for g, ts in VTAB_GROUPS.items() for t in ts}
    if benchmark == "fgvc":
        return dict.fromkeys(FGVC_TASKS, "")
    if benchmark == "fewshot":
        return {f"{t}@{k}": "" for k in FEWSHOT_SHOTS for t in FEWSHOT_TASKS}
    if benchmark == "domainnet":
        return dict.fromkeys(DOMAINNET_TASKS, "")
    return {c: "" for c in (columns or []) if c not in ("mean",) and c not in PARAM_KEYS}  # multitask: as printed


def summary_keys(benchmark: str) -> list[str]:
    if benchmark in ("vtab", "none"):
        return [*VTAB_GROUPS, "mean"]
    if benchmark == "fewshot":
        return [f"mean@{k}" for k in FEWSHOT_SHOTS]
    return ["mean"]


def task_overrides(benchmark: str, task: str, scale: str) -> list[str]:
    """The overrides that select ``task`` (a column key) at ``scale``."""
    if SCALES[scale].embedded:
        return [f"dataset=embedded/{task}"]
    if benchmark in ("vtab", "none"):
        return [f"dataset=vtab/{task}"]
    if benchmark == "fgvc":
        return [f"dataset=fgvc/{task}"]
    if benchmark == "fewshot":
        name, shots = task.split("@")
        return [f"dataset=fewshot/{name}", f"dataset.shots={shots}"]
    raise SpecError(
        f"{benchmark}: the {benchmark} datasets are not in peftbench (run scale=smoke, or add the data"
        " and a dataset config)"
    )


@dataclass
class Layout:
    """The columns of a table at one scale: tasks to run (key -> group) and the summaries / extras shown."""

    tasks: dict[str, str]  # every task whose run is needed, key -> group ("" if none)
    shown: list[str]  # column keys in display order (tasks, summaries, extras); the params column is separate
    summaries: dict[str, list[str]]  # summary key -> the task keys it averages (via groups for mean_of=groups)
    extras: list[str]


def layout(spec: Spec, scale: str, only_tasks: list[str] | None = None) -> Layout:
    """Columns of ``spec`` at ``scale`` (``only_tasks`` restricts the tasks, e.g. ``tasks=digits,count``)."""
    ptasks = paper_tasks(spec.benchmark, spec.columns)
    psum = summary_keys(spec.benchmark)
    requested = spec.columns or [*(ptasks if spec.benchmark != "none" else []), *psum]
    extras = [c for c in requested if c not in ptasks and c not in psum]
    wanted_sums = [c for c in requested if c in psum]
    if not any(c in ptasks or c in psum for c in requested):  # a cost table: no accuracy columns, no tasks
        return Layout(tasks={}, shown=list(extras), summaries={}, extras=extras)
    if SCALES[scale].embedded:
        all_tasks = dict(VTAB_MINI) if spec.benchmark in ("vtab", "none") else dict.fromkeys(VTAB_MINI, "")
        sums = [s for s in wanted_sums if s in (*VTAB_GROUPS, "mean")]
        if spec.benchmark not in ("vtab", "none"):
            sums = ["mean"]
        elif not sums and any(c in ptasks for c in requested):
            sums = ["mean"]
        shown_tasks = list(all_tasks)
    else:
        all_tasks = dict(ptasks)
        sums = wanted_sums
        shown_tasks = [c for c in requested if c in ptasks]
    if only_tasks:
        unknown = [t for t in only_tasks if t not in all_tasks]
        if unknown:
            raise SpecError(
                f"{spec.where()}: tasks={','.join(unknown)} not a {scale}-scale column of this table"
                f" (use some of: {', '.join(all_tasks)})"
            )
        all_tasks = {t: g for t, g in all_tasks.items() if t in only_tasks}
        shown_tasks = [t for t in shown_tasks if t in only_tasks]
    summaries: dict[str, list[str]] = {}
    for s in sums:
        if s in VTAB_GROUPS:
            summaries[s] = [t for t, g in all_tasks.items() if g == s]
        elif s.startswith("mean@"):
            summaries[s] = [t for t in all_tasks if t.endswith("@" + s.split("@")[1])]
        else:
            summaries[s] = list(all_tasks)
    summaries = {s: members for s, members in summaries.items() if members}
    needed = set(shown_tasks) | {t for m in summaries.values() for t in m}
    tasks = {t: g for t, g in all_tasks.items() if t in needed}
    shown = [*[t for t in tasks if t in shown_tasks], *[s for s in requested if s in summaries]]
    shown += [s for s in summaries if s not in shown]
    return Layout(tasks=tasks, shown=[*shown, *extras], summaries=summaries, extras=extras)


# --- loading -------------------------------------------------------------------------------------------------------
TOP_KEYS = {
    "title",
    "source",
    "benchmark",
    "columns",
    "mean_of",
    "metric",
    "params",
    "overrides",
    "rows",
    "note",
    "notes",
    "caption",
}
ROW_KEYS = {"name", "overrides", "search", "published", "note"}


def list_specs(table_dir: Path = TABLE_DIR) -> list[Path]:
    return sorted(p for p in table_dir.glob("*.yaml") if not p.name.startswith("_"))


def find_spec(name: str, table_dir: Path = TABLE_DIR) -> Path:
    """A spec by name (``spt_1``, ``spt-1``) or by path."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.exists():
            raise SpecError(f"{name}: no such table spec file (check the path)")
        return path
    path = table_dir / f"{name.replace('-', '_')}.yaml"
    if not path.exists():
        known = ", ".join(p.stem for p in list_specs(table_dir))
        raise SpecError(f"{path}: unknown table '{name}' (known: {known}; `python -m peftbench.tables --list`)")
    return path


def load_spec(name_or_path: str | Path, table_dir: Path = TABLE_DIR) -> Spec:
    """Load and validate a spec (structure, column keys, published keys, override syntax); no composition."""
    path = find_spec(str(name_or_path), table_dir)
    where = str(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # noqa: BLE001 - YAML errors of every kind
        raise SpecError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a table spec is a mapping (see conf/table/SCHEMA.md)")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(TOP_KEYS)})")
    for key in ("title", "source", "benchmark", "rows"):
        if key not in raw:
            raise SpecError(f"{where}: missing `{key}` (see conf/table/SCHEMA.md)")
    bench = raw["benchmark"]
    if bench not in BENCHMARKS:
        raise SpecError(f"{where}: benchmark '{bench}' unknown (use one of: {', '.join(BENCHMARKS)})")
    mean_of = raw.get("mean_of", "groups" if bench in ("vtab", "none") else "tasks")
    if mean_of not in ("groups", "tasks"):
        raise SpecError(f"{where}: mean_of '{mean_of}' unknown (use groups or tasks)")
    params = raw.get("params", "tuned_percent")
    if params not in (*PARAM_KEYS, "none"):
        raise SpecError(f"{where}: params '{params}' unknown (use tuned_percent, params_m or none)")
    columns = raw.get("columns")
    if columns is not None and (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)):
        raise SpecError(f"{where}: `columns` must be a list of column keys")
    ptasks = paper_tasks(bench, columns)
    psum = summary_keys(bench)
    for c in columns or []:
        if c not in ptasks and c not in psum and not KEY_RE.match(c):
            raise SpecError(f"{where}: column '{c}' is neither a {bench} column nor a lower-case extra key")
    if bench == "multitask" and not columns:
        raise SpecError(f"{where}: a multitask table lists its task keys in `columns`")
    valid = set(ptasks) | set(psum) | set(columns or []) | ({params} - {"none"})
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict) or set(overrides) - set(SCALES):
        raise SpecError(f"{where}: `overrides` maps scales ({', '.join(SCALES)}) to lists of overrides")
    overrides = {s: _strings(overrides.get(s) or [], f"{where}: overrides.{s}") for s in SCALES}
    if not isinstance(raw["rows"], list) or not raw["rows"]:
        raise SpecError(f"{where}: `rows` must be a non-empty list")
    rows, names = [], set()
    for i, r in enumerate(raw["rows"]):
        rows.append(_row(r, f"{where}: rows[{i}]", valid, bench))
        if rows[-1].name in names:
            raise SpecError(f"{where}: rows[{i}]: duplicate row name '{rows[-1].name}' (make row names unique)")
        names.add(rows[-1].name)
    note = raw.get("note") or raw.get("notes") or raw.get("caption")
    return Spec(
        name=path.stem,
        path=path,
        title=str(raw["title"]),
        source=str(raw["source"]),
        benchmark=bench,
        columns=columns,
        mean_of=mean_of,
        metric=str(raw.get("metric", "test_acc")),
        params=params,
        overrides=overrides,
        rows=rows,
        note=str(note) if note else None,
    )


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: must be a list of override strings such as method=lora")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for v in value:
        try:
            ov = parser.parse_override(v)
        except Exception as err:  # noqa: BLE001 - Hydra's grammar errors
            raise SpecError(f"{where}: override '{v}' does not parse ({str(err).splitlines()[0]})") from err
        if ov.is_sweep_override():
            raise SpecError(f"{where}: override '{v}' is a sweep (put searched values under `search:`)")
        _refuse_code(ov.key_or_group, ov.value(), f"{where}: override '{v}'")
    return list(value)


def _refuse_code(key: str, value: Any, where: str) -> None:
    """A spec file (perhaps someone else's) sets option choices and plain values only: no ``_target_`` or other
    ``_key_``, no ``hydra.`` settings (a search path could bring configs of its own), no interpolation."""
    parts = key.lstrip("+~").replace("/", ".").split(".")
    if parts[0] == "hydra" or any(p.startswith("_") for p in parts):
        raise SpecError(
            f"{where}: refused: a table spec sets option choices and plain values only (no _keys_, no hydra.)"
        )
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any(str(k).startswith("_") for k in item):
                raise SpecError(f"{where}: refused: a value may not hold a _target_ or other _key_")
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, str) and "${" in item:
            raise SpecError(f"{where}: refused: a value may not hold an interpolation")


def _row(r: Any, where: str, valid: set[str], bench: str) -> Row:
    if not isinstance(r, dict) or "name" not in r:
        raise SpecError(f"{where}: a row is a mapping with at least `name`")
    where = f"{where} ({r['name']})"
    unknown = set(r) - ROW_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(ROW_KEYS)})")
    overrides = _strings(r["overrides"], f"{where}: overrides") if r.get("overrides") is not None else None
    search = r.get("search") or {}
    if not isinstance(search, dict):
        raise SpecError(f"{where}: `search` maps a config key to a list of values")
    for k, values in search.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: search.{k} must be a non-empty list of values")
        _refuse_code(str(k), values, f"{where}: search.{k}")
    if search and overrides is None:
        raise SpecError(f"{where}: `search` without `overrides` (a published-only row runs nothing)")
    published = r.get("published") or {}
    if not isinstance(published, dict):
        raise SpecError(f"{where}: `published` maps column keys to numbers")
    for k, v in published.items():
        if k not in valid:
            hint = "list it in `columns`" if KEY_RE.match(str(k)) else "use the keys of conf/table/SCHEMA.md"
            raise SpecError(f"{where}: published key '{k}' is not a column of this {bench} table ({hint})")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise SpecError(f"{where}: published.{k} = {v!r} is not a number (type it as printed, e.g. 72.3)")
    return Row(
        name=str(r["name"]),
        overrides=overrides,
        search=dict(search),
        published={k: float(v) for k, v in published.items() if v is not None},
        note=str(r["note"]) if r.get("note") else None,
    )
