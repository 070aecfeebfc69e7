"""From a spec to runs: the run of every cell, its key in the results index, and model selection.

Every run is named by its config key (:func:`peftbench.train.config_key` of the composed config), so a cell finds its
run in the index however the overrides were spelled. Composing with Hydra costs ~0.3 s, so :class:`Composer` composes
once per row and derives the other runs of the row (other task, seed, protocol, searched values) by setting values on
a copy; ``tests/test_tables.py`` checks that this gives the same keys as a full composition.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from peftbench.compose import CONFIG_DIR, compose_config, config_key
from peftbench.tables.spec import SCALES, Layout, Row, Spec, SpecError, task_overrides


def format_value(value: Any) -> str:
    """A YAML value as a Hydra command-line value (``[q,v]``, ``0.01``, ``true``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def _is_group(key: str) -> bool:
    return (Path(CONFIG_DIR) / key).is_dir()


class Composer:
    """Config keys of runs, composing with Hydra once per distinct ``common`` override list.

    ``exact=True`` (or ``PEFTBENCH_TABLES_EXACT=1``) composes every run in full (slow; the reference).
    """

    def __init__(self, exact: bool | None = None) -> None:
        self.exact = bool(int(os.environ.get("PEFTBENCH_TABLES_EXACT", "0"))) if exact is None else exact
        self._cache: dict[tuple, DictConfig] = {}

    def compose(self, overrides: list[str]) -> DictConfig:
        key = tuple(overrides)
        if key not in self._cache:
            self._cache[key] = compose_config(list(overrides))
        return self._cache[key]

    def config(self, common: list[str], column: list[str], sets: list[str]) -> DictConfig:
        """The config of ``common + column + sets`` (``column``: ``dataset=...`` first, then dataset values)."""
        full = [*common, *column, *sets]
        groups_in_sets = [o for o in _parse(sets) if "." not in o.key_or_group and _is_group(o.key_or_group)]
        if (
            self.exact
            or groups_in_sets
            or not column
            or not column[0].startswith("dataset=")
            or _touches_dataset(common)
        ):
            return self.compose(full)
        option = column[0].split("=", 1)[1]
        base = None
        for cached, cfg in self._cache.items():  # a composed config of the same row with another dataset
            if (
                len(cached) == len(common) + 1
                and cached[: len(common)] == tuple(common)
                and cached[-1].startswith("dataset=")
            ):
                base = cfg
                break
        if base is None:
            return self._derive(self.compose([*common, column[0]]), option, common, column[1:], sets)
        return self._derive(base, option, common, column[1:], sets)

    def _derive(
        self, base: DictConfig, option: str, common: list[str], col_values: list[str], sets: list[str]
    ) -> DictConfig:
        cfg = copy.deepcopy(base)
        if cfg._choices_.get("dataset") != option:
            text = _dataset_text(option)
            if text is None:
                return self.compose([*common, f"dataset={option}", *col_values, *sets])
            with open_dict(cfg):
                cfg.dataset = OmegaConf.create(text)
                cfg._choices_.dataset = option
            dataset_values = [o for o in common if o.lstrip("+").startswith("dataset.")]
            self._apply(cfg, dataset_values)
        self._apply(cfg, [*col_values, *sets])
        return cfg

    @staticmethod
    def _apply(cfg: DictConfig, overrides: list[str]) -> None:
        for ov in _parse(overrides):
            key = ov.key_or_group
            with open_dict(cfg):
                if ov.is_delete():
                    parent, _, leaf = key.rpartition(".")
                    node = OmegaConf.select(cfg, parent) if parent else cfg
                    node.pop(leaf, None)
                else:
                    OmegaConf.update(cfg, key, ov.value(), merge=False, force_add=ov.is_add() or ov.is_force_add())

    def key(self, common: list[str], column: list[str], sets: list[str]) -> str:
        return config_key(self.config(common, column, sets))

    def validate(self, overrides: list[str]) -> None:
        """Check that ``overrides`` compose, composing once per distinct set of group choices (fast, for tests).

        Group choices (``method=lora``) are composed with Hydra; value overrides (``method.rank=16``) are then set on
        a struct-mode copy, which raises for a key the config does not have, as Hydra would.
        """
        parsed = _parse(overrides)
        groups = [o for o, p in zip(overrides, parsed) if _group_override(p)]
        values = [o for o, p in zip(overrides, parsed) if not _group_override(p)]
        cfg = copy.deepcopy(self.compose(groups))
        OmegaConf.set_struct(cfg, True)
        for ov in _parse(values):
            if ov.is_delete():
                continue
            if ov.is_add() or ov.is_force_add():
                with open_dict(cfg):
                    OmegaConf.update(cfg, ov.key_or_group, ov.value(), merge=False, force_add=True)
            else:
                OmegaConf.update(cfg, ov.key_or_group, ov.value(), merge=False)
        OmegaConf.to_container(cfg, resolve=True)  # interpolations resolve


@functools.lru_cache(maxsize=256)
def _dataset_text(option: str) -> str | None:
    """The YAML of ``conf/dataset/<option>.yaml`` when it is plain values, following another spelling's one-line
    ``defaults: [<option>@_here_]`` to the config it names; None when only Hydra can compose it."""
    for _ in range(4):  # an alias names a real config; a chain this long is not ours
        path = Path(CONFIG_DIR) / "dataset" / f"{option}.yaml"
        text = path.read_text() if path.exists() else ""
        if not text or "@package" in text:
            return None
        loaded = OmegaConf.create(text)
        defaults = loaded.get("defaults")
        if defaults is None:
            return text
        if len(loaded) != 1 or len(defaults) != 1 or not str(defaults[0]).endswith("@_here_"):
            return None
        option = str(defaults[0]).removesuffix("@_here_")
    return None


def _touches_dataset(common: list[str]) -> bool:
    """Whether a group chosen in ``common`` (an experiment, say) sets dataset values: then compose every run in full."""
    return _touches_dataset_cached(tuple(common))


@functools.lru_cache(maxsize=256)
def _touches_dataset_cached(common: tuple[str, ...]) -> bool:
    for ov in _parse(list(common)):
        key = ov.key_or_group
        if "." in key or not _is_group(key) or key == "dataset" or not isinstance(ov.value(), str):
            continue
        path = Path(CONFIG_DIR) / key / f"{ov.value()}.yaml"
        if not path.exists() or "@package _global_" not in (text := path.read_text()):
            continue  # a group's own package cannot set dataset values
        loaded = OmegaConf.create(text)
        if "dataset" in loaded or any("dataset" in str(d) for d in loaded.get("defaults") or []):
            return True
    return False


def _group_override(ov) -> bool:
    key = ov.key_or_group
    return "/" in key or key.startswith("hydra") or ("." not in key and _is_group(key))


@dataclass
class Run:
    """One training run of the table."""

    row: str
    task: str
    seed: int
    protocol: str
    values: dict[str, Any]  # searched key -> value (empty without a search)
    common: list[str]
    column: list[str]
    key: str = ""

    @property
    def sets(self) -> list[str]:
        return [
            f"seed={self.seed}",
            f"protocol={self.protocol}",
            *(f"{k}={format_value(v)}" for k, v in self.values.items()),
        ]


@dataclass
class RowPlan:
    row: Row
    common: list[str]
    grid: list[dict[str, Any]]  # searched values in grid order ([{}] without a search)
    phase1: list[Run] = field(default_factory=list)  # tune (val + grid), final (val), or paper runs


def trimmed(values: list[Any], keep: int | None) -> list[Any]:
    """The central ``keep`` values of a grid (smoke scale); all of them when ``keep`` is None."""
    if keep is None or len(values) <= keep:
        return list(values)
    start = (len(values) - keep + 1) // 2
    return list(values[start : start + keep])


def grid_of(row: Row, scale: str) -> list[dict[str, Any]]:
    keep = SCALES[scale].max_grid_values
    keys = list(row.search)
    combos = itertools.product(*(trimmed(row.search[k], keep) for k in keys))
    return [dict(zip(keys, c)) for c in combos] or [{}]


def common_overrides(spec: Spec, row: Row, scale: str, extra: list[str]) -> list[str]:
    """Scale, then the spec's overrides for the scale, then the row's, then the command line's extras."""
    return [*SCALES[scale].overrides, *spec.overrides[scale], *(row.overrides or []), *extra]


def plan_rows(
    spec: Spec, lay: Layout, scale: str, selection: str, seeds: list[int], extra: list[str], composer: Composer
) -> list[RowPlan]:
    """The runs of phase 1 for every runnable row (phase 2 of selection=val depends on phase 1's results)."""
    plans = []
    for row in spec.rows:
        if not row.runnable:
            continue
        common = common_overrides(spec, row, scale, extra)
        grid = grid_of(row, scale)
        plan = RowPlan(row=row, common=common, grid=grid)
        protocol = "paper" if selection == "paper" else ("tune" if len(grid) > 1 else "final")  # 1 point: no choice
        for task in lay.tasks:
            column = task_overrides(spec.benchmark, task, scale)
            for seed in seeds:
                for values in grid:
                    run = Run(row.name, task, seed, protocol, values, common, column)
                    run.key = composer.key(common, column, run.sets)
                    plan.phase1.append(run)
        plans.append(plan)
    return plans


def check_composes(spec: Spec, scale: str, extra: list[str], composer: Composer) -> DictConfig | None:
    """Compose every runnable row at ``scale`` (one task): a row that does not compose is a one-line error.

    Returns the first row's config (None without runnable rows).
    """
    from peftbench.tables.spec import ACCOUNTING_DATASET

    first = None
    for i, row in enumerate(spec.rows):
        if not row.runnable:
            continue
        column = [ACCOUNTING_DATASET[scale]]
        sets = [f"{k}={format_value(v)}" for k, v in grid_of(row, scale)[0].items()]
        try:
            cfg = composer.config(common_overrides(spec, row, scale, extra), column, sets)
            first = cfg if first is None else first
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors of every kind
            msg = " ".join(str(err).split())[:300]
            try:  # is it the row, or what every row shares (the scale's / spec's / command line's overrides)?
                composer.config([*SCALES[scale].overrides, *spec.overrides[scale], *extra], column, [])
            except Exception:  # noqa: BLE001
                raise SpecError(
                    f"{spec.where()}: overrides.{scale} (or the command line's key=value) does not compose: {msg}"
                    " (fix them; `python -m peftbench.train --cfg job <overrides>` shows the config)"
                ) from err
            raise SpecError(
                f"{spec.where()}: rows[{i}] ({row.name}): does not compose at scale={scale}: {msg}"
                " (fix the row's overrides; see conf/method/*.yaml for option names)"
            ) from err
    return first


# --- selection --------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What a (row, task, seed) reports after selection."""

    status: str  # ok | failed | missing
    value: float | None = None  # metric x 100
    record: dict[str, Any] | None = None  # the reported run's index record
    chosen: dict[str, Any] = field(default_factory=dict)
    searched: list[dict[str, Any]] = field(default_factory=list)  # per grid point: values, key, status, val/test
    error: str | None = None
    final: Run | None = None  # selection=val with a search: the run to launch / look up


def _status(record: dict | None) -> str:
    return "missing" if record is None else record.get("status", "missing")


def select(runs: list[Run], latest: dict[str, dict], selection: str, metric: str, has_search: bool) -> Outcome:
    """Select over the grid runs of one (row, task, seed), in grid order.

    selection=val with a search: the best ``val_acc`` (ties: first in grid order) -> ``final`` run to look up;
    selection=val without a search: the single final run; selection=paper: the max ``metric`` over the grid.
    """
    records = [latest.get(r.key) for r in runs]
    searched = [
        {
            "values": r.values,
            "key": r.key,
            "status": _status(rec),
            "run_dir": rec.get("run_dir") if rec else None,
            "val_acc": (rec or {}).get("metrics", {}).get("val_acc"),
            metric: (rec or {}).get("metrics", {}).get(metric),
        }
        for r, rec in zip(runs, records)
    ]
    if any(rec is None for rec in records):
        return Outcome("missing", searched=searched)
    ok = [(r, rec) for r, rec in zip(runs, records) if rec.get("status") == "ok"]
    if not ok:
        return Outcome("failed", searched=searched, error=records[0].get("error") or "failed")
    if selection == "val" and has_search:
        best_run, _ = max(ok, key=lambda p: (p[1]["metrics"].get("val_acc", float("-inf")), -runs.index(p[0])))
        final = Run(
            best_run.row, best_run.task, best_run.seed, "final", best_run.values, best_run.common, best_run.column
        )
        return Outcome("missing", chosen=dict(best_run.values), searched=searched, final=final)
    best_run, best = max(ok, key=lambda p: (p[1]["metrics"].get(metric, float("-inf")), -runs.index(p[0])))
    value = best["metrics"].get(metric)
    if value is None:
        return Outcome("failed", record=best, searched=searched, error=f"metric {metric} not in the run's results")
    return Outcome(
        "ok", value=100.0 * value, record=best, chosen=dict(best_run.values) if has_search else {}, searched=searched
    )


def resolve_final(outcome: Outcome, latest: dict[str, dict], metric: str) -> Outcome:
    """selection=val with a search: fill ``outcome`` from the final run (``outcome.final.key`` must be set)."""
    rec = latest.get(outcome.final.key)
    if rec is None:
        return outcome
    outcome.record = rec
    if rec.get("status") != "ok":
        outcome.status, outcome.error = "failed", rec.get("error") or "failed"
        return outcome
    value = rec.get("metrics", {}).get(metric)
    if value is None:
        outcome.status, outcome.error = "failed", f"metric {metric} not in the run's results"
        return outcome
    outcome.status, outcome.value = "ok", 100.0 * value
    return outcome
