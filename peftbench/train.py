"""Fine-tune a backbone with a PEFT method: ``python -m peftbench.train [group=option ...] [key=value ...]``.

With no arguments it fine-tunes the embedded ``vit_micro`` on ``embedded/digits`` with LoRA, offline.
Every run writes ``<run_dir>/results.json`` (status ``ok`` or ``failed``) and appends a line to the index.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from peftbench.accounting import backbone_size, parameter_report
from peftbench.callbacks import EvalHistory, LastCheckpoint, MethodHooks
from peftbench.data.base import Task
from peftbench.data.datamodule import VisionDataModule
from peftbench.errors import PeftbenchError, user_error
from peftbench.export import TASK_FILE, save_task
from peftbench.loggers import finish
from peftbench.module import PEFTModule
from peftbench.results import RESULTS, append_index, latest_by_key, run_key, write_json_atomic

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` outside a Hydra app (tests, tools).

    The group choices are kept under ``_choices_`` so results can name the options.
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    picked = {k: v for k, v in cfg.hydra.runtime.choices.items() if v and not k.startswith("hydra")}
    with open_dict(cfg):
        del cfg["hydra"]
        cfg["_choices_"] = picked
    return cfg


def choices(cfg: DictConfig) -> dict[str, str]:
    """Group -> chosen option (``method`` -> ``lora``), from Hydra when running under it, else from the config."""
    if HydraConfig.initialized():
        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v and not k.startswith("hydra")}
    return {k: str(v) for k, v in (cfg.get("_choices_") or {}).items()}


def overrides() -> list[str]:
    """The command-line overrides of this run (empty outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def build_task(dataset_cfg: DictConfig) -> Task:
    """Instantiate the dataset config's task; its ``recipe`` block (epochs, warm-up, lr) is for other groups."""
    spec = OmegaConf.to_container(dataset_cfg, resolve=True)
    spec.pop("recipe", None)
    return instantiate(spec)


def build(cfg: DictConfig, method_state: dict | None = None):
    """Instantiate task, data module, backbone, method, scorer and the Lightning module from ``cfg`` (seeded)."""
    L.seed_everything(cfg.seed, workers=True)
    task = build_task(cfg.dataset)
    datamodule = VisionDataModule(task, protocol=cfg.protocol, seed=cfg.seed, **cfg.data)
    model = instantiate(cfg.backbone, num_classes=task.num_classes)
    pretrained_backbone = backbone_size(model)
    module = PEFTModule(
        model=model,
        method=instantiate(cfg.method),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_classes=task.num_classes,
        scorer=instantiate(cfg.scorer) if cfg.get("scorer") else None,
        scoring=OmegaConf.to_container(cfg.scoring),
        method_state=method_state,
        label_smoothing=cfg.label_smoothing,
        seed=cfg.seed,
    )
    return task, datamodule, module, pretrained_backbone


def _trainer_overrides(cfg: DictConfig) -> dict[str, Any]:
    if cfg.protocol == "paper":
        return {"check_val_every_n_epoch": int(cfg.paper_eval_every)}
    if cfg.protocol == "final":
        return {"limit_val_batches": 0}
    return {}


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and evaluate one configuration; return the results record (metrics, parameters, timings)."""
    ckpt_path, method_state = None, None
    if cfg.resume:
        ckpt_path = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt_path.exists():
            raise PeftbenchError(f"resume=true but {ckpt_path} does not exist; pass run_dir=<the interrupted run>")
        state_file = run_dir / "method_state.pt"
        method_state = torch.load(state_file, weights_only=True) if state_file.exists() else None
    task, datamodule, module, pretrained_backbone = build(cfg, method_state)
    history = EvalHistory()
    # MethodHooks first: the method's epoch-end records are in the state that LastCheckpoint's checkpoint re-saves
    callbacks = [MethodHooks(run_dir / "method_state.pt"), LastCheckpoint(run_dir / "checkpoints"), history]
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    logger = instantiate(cfg.logger, save_dir=run_dir, name=run_dir.name)
    trainer = instantiate(
        cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir),
        enable_checkpointing=False, **_trainer_overrides(cfg),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_seconds = time.perf_counter() - start - module.scoring_seconds
    metrics: dict[str, Any] = {}
    window: dict[str, Any] = {}
    if history.history:  # tune: val200 each epoch; paper: test every N epochs
        # the max only over epochs the method declares reportable (TINA: its last cycle; Heart-LoRA: from the
        # deactivation on), so the number belongs to the final model's configuration and parameter count
        first = module.method.first_reportable_epoch(module.method_state)
        valid = [h for h in history.history if h[0] >= first]
        window = {"first_epoch": first, "evaluations": len(valid), "of": len(history.history)}
        best_epoch, best = max(valid, key=lambda h: (h[1], -h[0])) if valid else (None, None)
        if cfg.protocol == "paper":
            metrics.update(test_acc=best, test_acc_last=history.history[-1][1], best_epoch=best_epoch)
        else:
            metrics.update(val_acc=history.history[-1][1], val_acc_max=best, best_epoch=best_epoch)
        metrics = {k: v for k, v in metrics.items() if v is not None}  # no reportable epoch: no maximum
    start = time.perf_counter()
    if cfg.protocol in ("tune", "final"):  # the last epoch's model; `paper` already has its (max) number
        (test,) = trainer.test(module, datamodule=datamodule, verbose=False)
        metrics["test_acc"] = test["test/acc"]
    eval_seconds = time.perf_counter() - start
    params = parameter_report(module.model, pretrained_backbone)
    storage = {}
    if trainer.is_global_zero:
        storage["task_file_bytes"] = save_task(module.model, module.method_state, cfg, run_dir / TASK_FILE)
    if trainer.is_global_zero:
        config = {**OmegaConf.to_container(cfg, resolve=True), "params": params, "protocol": cfg.protocol}
        finish(trainer.logger, {f"final/{k}": v for k, v in metrics.items()}, config)
    return {
        "params": params,
        "storage": storage,
        "metrics": metrics,
        "history": history.history,
        "reporting_window": window,
        "selection": module.method.describe(module.method_state),
        "timings": {"scoring_s": module.scoring_seconds, "training_s": train_seconds, "evaluation_s": eval_seconds},
        "epochs": trainer.current_epoch,
        "global_zero": trainer.is_global_zero,
    }


def execute(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run ``cfg`` and always leave a results.json (``ok`` or ``failed``) plus an index line behind."""
    run_dir.mkdir(parents=True, exist_ok=True)
    picked = choices(cfg)
    record: dict[str, Any] = {
        "key": config_key(cfg),
        "group": cfg.get("group"),
        "run_dir": str(run_dir.resolve()),
        "method": picked.get("method", OmegaConf.select(cfg, "method._target_")),
        "dataset": picked.get("dataset", OmegaConf.select(cfg, "dataset.name")),
        "backbone": OmegaConf.select(cfg, "backbone.name"),
        "scorer": picked.get("scorer"),
        "seed": cfg.seed,
        "protocol": cfg.protocol,
        "protocol_label": "max test accuracy over epochs (papers' habit)" if cfg.protocol == "paper" else cfg.protocol,
        "overrides": overrides(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        outcome = run(cfg, run_dir)
        if not outcome.pop("global_zero"):
            return outcome  # under DDP only rank 0 reports
        record.update(outcome, status="ok")
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure is recorded
        if int(os.environ.get("LOCAL_RANK", 0)) != 0:
            raise
        cause = user_error(err)
        record.update(status="failed", error=f"{type(cause or err).__name__}: {cause or err}")
        if cause is None:
            record["traceback"] = traceback.format_exc()
        _finish(cfg, run_dir, record)
        raise
    _finish(cfg, run_dir, record)
    return record


def config_key(cfg: DictConfig) -> str:
    """The run key of ``cfg`` (see :func:`peftbench.results.run_key`)."""
    return run_key(OmegaConf.to_container(cfg, resolve=True))


def finished_run(cfg: DictConfig) -> dict[str, Any] | None:
    """The index record of an ``ok`` run with the same key as ``cfg``, if there is one (what ``skip_done`` skips)."""
    record = latest_by_key(Path(cfg.paths.index_file)).get(config_key(cfg))
    return record if record and record.get("status") == "ok" else None


def _finish(cfg: DictConfig, run_dir: Path, record: dict[str, Any]) -> None:
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(run_dir / RESULTS, record)
    append_index(Path(cfg.paths.index_file), {k: v for k, v in record.items() if k not in ("history", "traceback")})


def summary(record: dict[str, Any]) -> str:
    """A few human lines about a finished run."""
    m, p = record["metrics"], record["params"]
    accs = " | ".join(f"{k} {v:.4f}" for k, v in m.items() if k in ("val_acc", "test_acc"))
    if record["protocol"] == "paper":
        accs += " (max over epochs: the papers' protocol)"
    return (
        f"peftbench: {record['method']} on {record['dataset']} ({record['backbone']}), protocol {record['protocol']}\n"
        f"  {accs}\n"
        f"  trainable: {p['trainable_backbone']:,} backbone + {p['trainable_head']:,} head"
        f" / {p['pretrained_backbone']:,} pre-trained ({p['tuned_percent']:.3f}%)\n"
        f"  time: {record['timings']['training_s']:.1f}s training, {record['timings']['evaluation_s']:.1f}s test\n"
        f"  run dir: {record['run_dir']}"
    )


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point.

    In a multirun (sweep) a failed run is recorded (results.json + index, status ``failed``) and the sweep goes on;
    with ``skip_done=true`` a run whose key is already ``ok`` in the index is skipped, so an interrupted sweep
    finishes on re-run without redoing finished runs.
    """
    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.skip_done and not cfg.resume and (done := finished_run(cfg)) is not None:
        print(f"peftbench: skipped (already ok: {done['run_dir']}) {' '.join(overrides())}")
        return
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        record = execute(cfg, run_dir)
    except Exception as err:
        cause = user_error(err)
        if sweeping:  # recorded by execute; the other runs of the sweep go on
            print(f"peftbench: error (run recorded as failed, sweep continues): {cause or repr(err)}", file=sys.stderr)
            return
        if cause is None:
            raise
        print(f"peftbench: error: {cause}", file=sys.stderr)
        sys.exit(1)
    if record.get("status") == "ok":
        print(summary(record))


if __name__ == "__main__":
    main()
