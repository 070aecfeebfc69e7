"""One way to compose a run's config, name it, and read a config back from a file safely.

Every entry point (train, score, params, export, bench, tables) composes ``conf/`` through :func:`compose_config`
(or Hydra's own ``@hydra.main`` for ``python -m peftbench.train``) and names a run by :func:`config_key`.

A config read back from a file (``task.pt``, a resumed or downloaded run) never chooses code to run:
:func:`config_from_file` recomposes it from its recorded group choices through ``conf/`` and refuses every
``_target_`` (and every other instantiation key) that ``conf/`` does not put at that place, and every
interpolation, with one line naming the file and the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from peftbench.errors import ConfigError, PeftbenchError
from peftbench.records.results import run_key

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

if not OmegaConf.has_resolver("pid"):  # ${pid:} in run folder names: unique across concurrent processes
    OmegaConf.register_new_resolver("pid", os.getpid)


def _register_vtab_resolvers() -> None:
    """``${vtab_classes:cifar}``, ``${vtab_group:cifar}``, ``${suite_tasks:vtab}``: conf/ reads the task registries."""
    from peftbench.data import vtab

    for name, fn in (("vtab_classes", vtab.vtab_classes), ("vtab_group", vtab.vtab_group),
                     ("suite_tasks", vtab.suite_tasks)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register_vtab_resolvers()

#: keys that make Hydra's ``instantiate`` import or call something
INSTANTIATE_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` outside a Hydra app (tests, tools).

    The group choices are kept under ``_choices_`` so results (and files written from this config) can name
    the options.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance().hydra  # inside a Hydra app (python -m peftbench.train): step aside, then back
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().hydra = running
    picked = {k: v for k, v in cfg.hydra.runtime.choices.items() if v and not k.startswith("hydra")}
    with open_dict(cfg):
        del cfg["hydra"]
        cfg["_choices_"] = picked
    return cfg


def choices(cfg: DictConfig) -> dict[str, str]:
    """Group -> chosen option (``method`` -> ``lora``), from Hydra when running under it, else from the config."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v and not k.startswith("hydra")}
    return {k: str(v) for k, v in (cfg.get("_choices_") or {}).items()}


def record_choices(cfg: DictConfig) -> DictConfig:
    """Store the group choices in ``cfg._choices_`` (in place; not part of the run key) and return ``cfg``."""
    picked = choices(cfg)
    with open_dict(cfg):
        cfg["_choices_"] = picked
    return cfg


def config_key(cfg: DictConfig) -> str:
    """The run key of ``cfg`` (see :func:`peftbench.records.results.run_key`)."""
    return run_key(OmegaConf.to_container(cfg, resolve=True))


def point_keys(cfg: DictConfig) -> dict[str, str]:
    """What figures may average over: ``key_seedless`` (the run key with the seed, and every value taken from it,
    left out: the runs of one point on one task) and ``key_variant`` (also without the dataset: one method
    variant's runs on several tasks, with everything else, epochs and learning rate included, equal)."""
    seedless = cfg.copy()
    with open_dict(seedless):
        seedless.seed = "*"  # before resolving: ${seed} in scorer / method / dataset configs follows
    plain = OmegaConf.to_container(seedless, resolve=True)
    keyed = {"key_seedless": run_key(plain)}
    plain.pop("dataset", None)
    keyed["key_variant"] = run_key(plain)
    return keyed


def instantiate_group(node: Any, group: str, **kwargs: Any) -> Any:
    """Hydra's ``instantiate`` of ``node`` (with ``kwargs``) for config group ``group``; a constructor's ValueError or
    TypeError (a value out of its domain, an unknown key) becomes one :class:`ConfigError` line naming the group.

    ``node`` must come from ``conf/`` (composed, or checked by :func:`config_from_file`).
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)  # safe: composed from conf/ (or checked by config_from_file)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, PeftbenchError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"{group}: {cause}") from None
        raise


def build_task(dataset_cfg: DictConfig):  # -> peftbench.data.base.Task
    """Instantiate the dataset config's task; its ``recipe`` block (epochs, warm-up, lr) is for other groups."""
    spec = OmegaConf.to_container(dataset_cfg, resolve=True)
    spec.pop("recipe", None)
    return instantiate_group(spec, "dataset")


def check_run_values(cfg: DictConfig) -> None:
    """One line for run-level values out of their domain (the groups' constructors check their own)."""
    checks = [
        ("seed", isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool), "an integer"),
        ("label_smoothing", isinstance(cfg.label_smoothing, (int, float)) and 0 <= cfg.label_smoothing < 1,
         "a number in [0, 1)"),
        ("paper_eval_every", isinstance(cfg.paper_eval_every, int) and cfg.paper_eval_every >= 1, "an integer >= 1"),
        ("scoring.n_samples", cfg.scoring.n_samples is None
         or (isinstance(cfg.scoring.n_samples, int) and cfg.scoring.n_samples >= 0), "an integer >= 0 or null (all)"),
        ("scoring.batch_size", isinstance(cfg.scoring.batch_size, int) and cfg.scoring.batch_size >= 1,
         "an integer >= 1"),
        ("checkpoint_every", _auto_or_positive(cfg.get("checkpoint_every", "auto")), "auto or an integer >= 1"),
        ("compile", isinstance(cfg.get("compile", False), bool), "true or false"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: expected {expected}")
    image, built = cfg.data.get("image_size"), cfg.backbone.get("image_size")
    if built is not None and image != built:
        raise ConfigError(
            f"data.image_size={image} but the backbone is built for {built}: set backbone.image_size instead "
            "(data.image_size follows it)"
        )


def _auto_or_positive(value: Any) -> bool:
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def check_factories(optimizer: Any, scheduler: Any) -> None:
    """Build the optimizer and schedule once on a dummy parameter: a bad lr / weight decay / warm-up is one
    :class:`ConfigError` line now, not a traceback from inside ``trainer.fit``."""
    try:
        opt = optimizer(params=[{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"optimizer: {err}") from None
    if scheduler is not None:
        try:
            scheduler(opt, total_steps=10, steps_per_epoch=1)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"scheduler: {err}") from None


@dataclass
class Parts:
    """What a run is built from, without Lightning: every entry point assembles a run through :func:`build_parts`."""

    task: Any  # peftbench.data.base.Task
    model: Any  # the timm backbone with its fresh head, before the method is applied
    pretrained_backbone: int  # parameters of the backbone without its head
    method: Any  # peftbench.methods.base.Method
    scorer: Any  # a pure scorer, or None
    optimizer: Any  # optimizer factory taking ``params``
    scheduler: Any  # schedule factory, or None


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (what a run's model initialisation draws from)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_parts(cfg: DictConfig) -> Parts:
    """Check ``cfg``'s run-level values, seed, and instantiate task, backbone, optimizer, schedule, method and
    scorer (one line for any value out of its domain). ``cfg`` must come from ``conf/`` (composed, or checked by
    :func:`config_from_file`)."""
    from peftbench.accounting import backbone_size

    check_run_values(cfg)
    seed_all(int(cfg.seed))
    task = build_task(cfg.dataset)
    model = instantiate_group(cfg.backbone, "backbone", num_classes=task.num_classes)
    optimizer = instantiate_group(cfg.optimizer, "optimizer")
    scheduler = instantiate_group(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    check_factories(optimizer, scheduler)
    return Parts(
        task=task,
        model=model,
        pretrained_backbone=backbone_size(model),
        method=instantiate_group(cfg.method, "method"),
        scorer=instantiate_group(cfg.scorer, "scorer") if cfg.get("scorer") else None,
        optimizer=optimizer,
        scheduler=scheduler,
    )


# --- configs read back from files ----------------------------------------------------------------------------------
def _walk(node: Any, path: str = ""):
    """Yield (dotted path, key, value) for every mapping entry below ``node`` (a plain container)."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            yield where, key, value
            yield from _walk(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _lookup(node: Any, path: str) -> Any:
    """The value at dotted ``path`` (with ``[i]`` list indices) in a plain container, or a sentinel."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(node, list) or i >= len(node):
                return _MISSING
            node = node[i]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


_MISSING = object()


def _groups() -> set[str]:
    return {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}


def _check_choices(picked: Any, source: str) -> list[str]:
    """``group=option`` overrides for recorded choices (known groups, option names without path tricks)."""
    if not isinstance(picked, dict) or not picked:
        raise PeftbenchError(
            f"{source}: no recorded group choices (_choices_); the file is damaged or was written by an older "
            "peftbench: re-create it by training (or resuming) the run"
        )
    groups, out = _groups(), []
    for group, option in picked.items():
        option = str(option)
        if group not in groups:
            known = ", ".join(sorted(groups))
            raise PeftbenchError(f"{source}: _choices_.{group}: unknown config group (known: {known})")
        if not _OPTION.fullmatch(option) or ".." in option:
            raise PeftbenchError(f"{source}: _choices_.{group}={option!r} is not an option name of conf/{group}/")
        out.append(f"{group}={option}")
    return out


def config_from_file(stored: str | dict, source: str, search_path: Sequence[str] = ()) -> DictConfig:
    """Rebuild a run's config from what a file recorded, without letting the file choose code to run.

    ``stored`` is the resolved config a run wrote (YAML text or a mapping) with its group choices under
    ``_choices_``. The config is recomposed from those choices through ``conf/``; the file's plain values are
    merged on top. ``search_path``: extra config folders the CALLER trusts (a command-line option, never the
    file) searched after ``conf/``, for config groups of one's own (e.g. the tests'). Refused with one line naming
    ``source`` and the key: an interpolation (``${...}``), a choice that is not an option of ``conf/``, and any
    instantiation key (``_target_``, ``_partial_``, ``_args_``, ...) whose value differs from what ``conf/``
    composes at that place (or that ``conf/`` does not have there).
    """
    if isinstance(stored, str):
        try:
            raw = OmegaConf.to_container(OmegaConf.create(stored), resolve=False)
        except Exception as err:  # noqa: BLE001 - any parse failure is a damaged file
            raise PeftbenchError(
                f"{source}: its config is not valid YAML ({type(err).__name__}); the file is damaged"
            ) from None
    elif isinstance(stored, dict):
        raw = stored
    else:
        raise PeftbenchError(f"{source}: its config is a {type(stored).__name__}, not a mapping; the file is damaged")
    if not isinstance(raw, dict):
        raise PeftbenchError(f"{source}: its config is not a mapping; the file is damaged")
    for where, key, value in _walk(raw):
        if not isinstance(key, str):
            raise PeftbenchError(f"{source}: key {where!r} is not a string; the file is damaged")
        if isinstance(value, str) and "${" in value:
            raise PeftbenchError(f"{source}: {where} holds an interpolation ({value[:60]!r}); refused: a file's config "
                                 "holds plain values only")
    overrides = _check_choices(raw.get("_choices_"), source)
    if search_path:
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{Path(p).resolve()}" for p in search_path) + "]")
    try:
        base = compose_config(overrides)
    except Exception as err:  # noqa: BLE001 - an option that conf/ does not have
        raise PeftbenchError(f"{source}: its recorded choices do not compose with conf/ ({type(err).__name__}: "
                             f"{str(err).splitlines()[0]})") from None
    reference = OmegaConf.to_container(base, resolve=False)
    for where, key, value in _walk(raw):
        if key in INSTANTIATE_KEYS and _lookup(reference, where) != value:
            expected = _lookup(reference, where)
            expected = "nothing" if expected is _MISSING else repr(expected)
            raise PeftbenchError(
                f"{source}: {where} = {value!r} is refused: conf/ puts {expected} there for the recorded choices; "
                "a file cannot choose code to run (re-create the file with peftbench, or pass the options on the "
                "command line)"
            )
    body = {k: v for k, v in raw.items() if k != "_choices_"}
    try:
        with open_dict(base):
            return OmegaConf.merge(base, OmegaConf.create(body))
    except Exception as err:  # noqa: BLE001 - a value of the wrong shape for conf/
        raise PeftbenchError(f"{source}: its config does not fit conf/ ({type(err).__name__}: {err}); the file is "
                             "damaged or from another peftbench version") from None


# --- command-line values of the wrong type ------------------------------------------------------------------------
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number"}
#: keys whose conf/ value is one of several accepted types (Lightning: devices=1 or "auto" or [0, 1])
_ANY_TYPE = ("trainer.devices",)


def check_value_types(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse a ``key=value`` override whose value has another type than the one ``conf/`` gives that key.

    ``optimizer.lr=fast`` or ``seed=abc`` would otherwise surface as a traceback deep inside torch or Lightning.
    The reference is the config composed from the same group choices without value overrides; keys ``conf/``
    leaves null or that hold strings, lists or mappings accept any value of that kind (their owners check them).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = [o for o in OverridesParser.create().parse_overrides(list(overrides)) if not o.is_delete()]
    groups = _groups()

    def is_choice(o) -> bool:
        key = o.key_or_group.lstrip("+~")
        return "." not in key and (key in groups or "/" in key)

    values = [o for o in parsed if not is_choice(o) and not o.key_or_group.lstrip("+~").startswith("hydra")]
    if not values:
        return
    choices_only = [f"{g}={o}" for g, o in choices(cfg).items()] + _search_path_overrides(overrides)
    try:
        reference = OmegaConf.to_container(compose_config(choices_only), resolve=True)
    except Exception:  # noqa: BLE001 - the real composition succeeded; without a reference there is nothing to check
        return
    for o in values:
        key = o.key_or_group.lstrip("+")
        if key in _ANY_TYPE:
            continue
        expected = _lookup(reference, key)
        got = OmegaConf.select(cfg, key, default=None)
        if expected is _MISSING or expected is None or got is None:
            continue
        kind = type(expected)
        if kind is bool and not isinstance(got, bool):
            raise _type_error(key, got, bool)
        if kind is int and (isinstance(got, bool) or not isinstance(got, int)):
            raise _type_error(key, got, int)
        if kind is float and (isinstance(got, bool) or not isinstance(got, (int, float))):
            raise _type_error(key, got, float)
        if kind in (list, dict) and not isinstance(OmegaConf.select(cfg, key), (list, dict, DictConfig, ListConfig)):
            raise PeftbenchError(f"{key}={got!r}: expected a {'list' if kind is list else 'mapping'}")


def _search_path_overrides(overrides: Sequence[str]) -> list[str]:
    """The ``hydra.searchpath`` override of this run (Hydra keeps it apart from the task's overrides)."""
    from hydra.core.hydra_config import HydraConfig

    found = [o for o in overrides if o.lstrip("+").startswith("hydra.searchpath")]
    if HydraConfig.initialized():
        found += [o for o in HydraConfig.get().overrides.hydra if o.lstrip("+").startswith("hydra.searchpath")]
    return found[-1:]


def _type_error(key: str, got: Any, kind: type) -> PeftbenchError:
    return ConfigError(f"{key}={got!r}: expected {_TYPE_NAMES[kind]} (see `python -m peftbench.train --cfg job`)")
