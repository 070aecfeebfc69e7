"""Every YAML under conf/ composes, and every option instantiates (no data is read, nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from peftbench.compose import CONFIG_DIR, build_task, compose_config
from peftbench.data.base import Task

CONF = Path(__file__).resolve().parent.parent / "conf"


def options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))


def test_every_group_listed_in_the_issue_exists():
    cfg = compose_config([])
    for key in ("backbone", "dataset", "method", "optimizer", "scheduler", "trainer", "logger", "paths"):
        assert key in cfg, key
    for group in ("backbone", "dataset", "method", "optimizer", "scheduler", "trainer", "logger", "paths",
                  "experiment", "sweep"):
        assert options(group), f"conf/{group} has no options"


@pytest.mark.parametrize("option", options("dataset"))
def test_dataset_options_instantiate(option):
    cfg = compose_config([f"dataset={option}"])
    task = build_task(cfg.dataset)
    assert isinstance(task, Task) and task.num_classes == cfg.dataset.num_classes >= 2
    assert task.group in ("natural", "specialized", "structured", "fgvc", "fewshot", None) or task.group


@pytest.mark.parametrize("option", options("backbone"))
def test_backbone_options_instantiate(option):
    cfg = compose_config([f"backbone={option}", "backbone.pretrained=false"])
    model = instantiate(cfg.backbone, num_classes=7)
    assert model.get_classifier().out_features == 7


@pytest.mark.parametrize("group", ["method", "optimizer", "scheduler"])
def test_method_optimizer_scheduler_options_instantiate(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        assert instantiate(cfg[group]) is not None


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_instantiate(tmp_path, option):
    cfg = compose_config([f"logger={option}"])
    instantiate(cfg.logger, save_dir=tmp_path, name="x")


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_compose(option):
    cfg = compose_config([f"trainer={option}"])
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if option in ("default", "cpu"):
        instantiate(cfg.trainer, logger=False)


@pytest.mark.parametrize("group", ["experiment", "sweep"])
def test_experiment_and_sweep_options_compose(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        assert cfg.trainer.max_epochs >= 1


@pytest.mark.parametrize(
    ("method", "scorer"),
    [("spt_lora", "sensitivity"), ("spt_adapter", "sensitivity"), ("cdra_spt", "sensitivity"),
     ("child_tuning", "sensitivity"), ("gps", "contrastive"), ("hifi", "hifi")],
)
def test_a_method_brings_its_scorer_and_the_command_line_still_wins(method, scorer):
    cfg = compose_config([f"method={method}"])
    assert cfg._choices_["scorer"] == scorer and getattr(instantiate(cfg.method), "needs_scores", False)
    other = "hifi" if scorer != "hifi" else "sensitivity"
    assert compose_config([f"method={method}", f"scorer={other}"])._choices_["scorer"] == other
    assert compose_config([f"method={method}", "~scorer"]).get("scorer") is None


def test_methods_that_need_no_scores_bring_no_scorer():
    for path in sorted((Path(CONFIG_DIR) / "method").glob("*.yaml")):
        cfg = compose_config([f"method={path.stem}"])
        if not getattr(instantiate(cfg.method), "needs_scores", False):
            assert cfg.get("scorer") is None, path.stem


def test_point_keys_leave_out_the_seed_and_then_the_task_but_nothing_else():
    from peftbench.compose import point_keys

    def keys(*overrides: str) -> dict:
        return point_keys(compose_config(["method=spt_lora", *overrides]))

    base = keys("seed=0")
    assert keys("seed=1") == base  # scorer.seed follows ${seed}: still one point
    assert keys("seed=0", "dataset=embedded/texture")["key_variant"] == base["key_variant"]
    assert keys("seed=0", "dataset=embedded/texture")["key_seedless"] != base["key_seedless"]
    assert keys("seed=0", "trainer.max_epochs=2")["key_variant"] != base["key_variant"]
    assert keys("seed=0", "dataset=vtab/dtd")["key_variant"] != base["key_variant"]  # another recipe (100 epochs)
