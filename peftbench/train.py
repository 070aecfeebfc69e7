"""Fine-tune a backbone with a PEFT method: ``python -m peftbench.train [group=option ...] [key=value ...]``.

With no arguments it fine-tunes the embedded ``vit_micro`` on ``embedded/digits`` with LoRA, offline.
Every run writes ``<run_dir>/results.json`` (status ``ok`` or ``failed``) and appends a line to the index.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
from omegaconf import DictConfig, OmegaConf, open_dict

from peftbench.accounting import parameter_report
from peftbench.compose import (
    CONFIG_DIR,
    build_parts,
    check_run_values,
    check_value_types,
    choices,
    config_key,
    instantiate_group,
    point_keys,
    record_choices,
)
from peftbench.console import quiet_third_party, rank_zero, say
from peftbench.data.datamodule import VisionDataModule
from peftbench.errors import ConfigError, PeftbenchError, TrainingDiverged, user_error
from peftbench.records.guard import CHECKPOINT, Interrupted, claim, signals_ignored, signals_raise
from peftbench.records.results import RESULTS, append_index, latest_by_key, write_json_atomic
from peftbench.records.task_file import TASK_FILE, save_task
from peftbench.training.callbacks import EvalHistory, LastCheckpoint, MethodHooks
from peftbench.training.loggers import abort as abort_logging
from peftbench.training.loggers import finish
from peftbench.training.loggers import start as start_logging
from peftbench.training.module import PEFTModule


def overrides() -> list[str]:
    """The command-line overrides of this run (empty outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def build(cfg: DictConfig, method_state: dict | None = None):
    """Task, data module, and the Lightning module around :func:`peftbench.compose.build_parts` (seeded)."""
    check_run_values(cfg)
    L.seed_everything(cfg.seed, workers=True)  # also for Lightning's workers; build_parts seeds the same way
    parts = build_parts(cfg)
    datamodule = VisionDataModule(parts.task, protocol=cfg.protocol, seed=cfg.seed, **cfg.data)
    module = PEFTModule(
        model=parts.model,
        method=parts.method,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        num_classes=parts.task.num_classes,
        scorer=parts.scorer,
        scoring=OmegaConf.to_container(cfg.scoring),
        method_state=method_state,
        label_smoothing=cfg.label_smoothing,
        seed=cfg.seed,
        compile=cfg.get("compile", False),
        compile_backend=cfg.get("compile_backend", "inductor"),
    )
    return parts.task, datamodule, module, parts.pretrained_backbone


def _load_plain(path: Path, what: str = "", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; an unreadable file raises one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - truncated, empty, text, or a pickle that needs code
        raise PeftbenchError(
            f"{what}{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]}); it is damaged "
            "or truncated: delete it to start that run again"
        ) from None


def _trainer_overrides(cfg: DictConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.protocol == "paper":
        out["check_val_every_n_epoch"] = int(cfg.paper_eval_every)
    elif cfg.protocol == "final":
        out["limit_val_batches"] = 0
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        gpu = spread_device(HydraConfig.get().job.num, cfg.trainer, torch.cuda.device_count())
        if gpu is not None:
            out["devices"] = [gpu]
    return out


def spread_device(job_num: int, trainer_cfg: Any, visible_gpus: int) -> int | None:
    """The GPU that job ``job_num`` of a multirun uses when several are visible: ``job_num mod visible_gpus``, so
    the runs of a parallel launcher (``hydra/launcher=gpu_shared``: N processes) spread over the GPUs. Only for
    one-device trainers on a GPU accelerator (DDP trainers and the CPU keep their settings); None: no change."""
    devices, accelerator = trainer_cfg.get("devices"), str(trainer_cfg.get("accelerator"))
    if visible_gpus < 2 or devices != 1 or accelerator not in ("gpu", "cuda", "auto"):
        return None
    return job_num % visible_gpus


def run(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> dict[str, Any]:
    """Train and evaluate one configuration; return the results record (metrics, parameters, timings).

    With ``cfg.resume`` the run continues from ``checkpoints/last.ckpt`` with the saved selection; a run interrupted
    before its first checkpoint (``resuming``: the folder holds its record) starts again from its selection.
    """
    check_value_types(cfg, overrides())
    ckpt_path, method_state = None, None
    if cfg.resume:
        ckpt_path = run_dir / CHECKPOINT
        if not ckpt_path.exists():
            if not resuming:
                raise PeftbenchError(f"resume=true but {ckpt_path} does not exist; pass run_dir=<the interrupted run>")
            ckpt_path = None  # interrupted before the first epoch ended: train from the start
        state_file = run_dir / "method_state.pt"
        method_state = _load_plain(state_file, "resume: ") if state_file.exists() else None
        if ckpt_path is not None:
            _load_plain(ckpt_path, "resume: ", mmap=True)  # a truncated checkpoint fails here, in one line
    task, datamodule, module, pretrained_backbone = build(cfg, method_state)
    history = EvalHistory()
    # MethodHooks first: the method's epoch-end records are in the state that LastCheckpoint's checkpoint re-saves
    checkpoints = LastCheckpoint(run_dir / "checkpoints", cfg.get("checkpoint_every", "auto"))
    callbacks = [MethodHooks(run_dir / "method_state.pt"), checkpoints, history]
    callbacks += [instantiate_group(c, "callbacks") for c in (cfg.get("callbacks") or {}).values()]
    logger = instantiate_group(cfg.logger, "logger", save_dir=run_dir, name=run_name(cfg), tags=run_tags(cfg))
    trainer = instantiate_group(
        cfg.trainer, "trainer", logger=logger, callbacks=callbacks, default_root_dir=str(run_dir),
        enable_checkpointing=False, **_trainer_overrides(cfg),
    )
    if trainer.max_epochs is None or trainer.max_epochs < 1 or trainer.limit_train_batches == 0:
        raise ConfigError(
            f"trainer.max_epochs={trainer.max_epochs} (limit_train_batches={trainer.limit_train_batches}): "
            "a run must train at least one step"
        )
    warn_schedule(cfg, trainer.max_epochs)
    if trainer.is_global_zero:
        start_logging(trainer.logger, OmegaConf.to_container(cfg, resolve=True))
    try:
        return _fit_and_evaluate(cfg, run_dir, trainer, module, datamodule, ckpt_path, history, checkpoints,
                                 pretrained_backbone)
    except BaseException:
        if trainer.is_global_zero:
            with signals_ignored():
                abort_logging(trainer.logger)  # a failed or interrupted run still shows its config and metrics
        raise


def _fit_and_evaluate(
    cfg, run_dir, trainer, module, datamodule, ckpt_path, history, checkpoints, pretrained_backbone
) -> dict:
    """``trainer.fit``, the reported metrics, the final test, the task file and the record of :func:`run`."""
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_seconds = time.perf_counter() - start - module.scoring_seconds
    check_trained(trainer, module)
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
        checkpoint = run_dir / CHECKPOINT
        storage["checkpoint_bytes"] = checkpoint.stat().st_size if checkpoint.exists() else 0
        storage["checkpoint_kept"] = bool(cfg.get("keep_checkpoint", False))
        storage["checkpoint_writes"] = checkpoints.writes
        storage["checkpoint_bytes_written"] = checkpoints.bytes_written
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
        "device": str(trainer.strategy.root_device),
        "data_resident": sorted(datamodule.on_device),
        "precision": str(trainer.precision),
        "global_zero": trainer.is_global_zero,
    }


#: overrides that say where a run writes or how it logs, not what it is (left out of run names)
_NAME_NOISE = ("paths.", "logger", "group", "run_dir", "resume", "keep_checkpoint", "skip_done", "hydra",
               "trainer.enable_progress_bar", "callbacks", "data.num_workers")


def run_name(cfg: DictConfig) -> str:
    """``<method>-<dataset>-s<seed>`` plus the run's value overrides (a sweep's searched values), e.g.
    ``lora-vtab/cifar-s0-method.scale=10``: the W&B run name."""
    picked = choices(cfg)
    name = f"{picked.get('method', 'method')}-{picked.get('dataset', 'dataset')}-s{cfg.seed}"
    extra = []
    for ov in overrides():
        key = ov.split("=", 1)[0].lstrip("+~")
        if "=" in ov and "." in key or key in ("protocol", "label_smoothing"):
            if not key.startswith(_NAME_NOISE) and key != "seed":
                extra.append(ov.lstrip("+~"))
    return "-".join([name, *extra])[:128]


def run_tags(cfg: DictConfig) -> list[str]:
    """W&B tags: the logger config's own, the protocol, and the table and scale of a table run (its group)."""
    tags = [str(t) for t in (OmegaConf.select(cfg, "logger.tags") or [])]
    tags.append(f"protocol:{cfg.protocol}")
    return list(dict.fromkeys(tags))


def warn_schedule(cfg: DictConfig, max_epochs: int) -> None:
    """Warn when the warm-up is not shorter than the run (the learning rate would never decay)."""
    warmup = OmegaConf.select(cfg, "scheduler.warmup_epochs")
    if isinstance(warmup, (int, float)) and warmup >= max_epochs:
        say(
            f"warning: the warm-up ({warmup:g} epochs, scheduler.warmup_epochs) is not shorter than the run "
            f"({max_epochs} epochs): the learning rate never decays; lower scheduler.warmup_epochs"
        )


def check_trained(trainer: L.Trainer, module: PEFTModule) -> None:
    """After fit: at least one optimisation step was taken and every trainable tensor is finite."""
    if trainer.global_step == 0:
        raise PeftbenchError("the run took no training step (empty training split or zero epochs): nothing was trained")
    for name, p in module.model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise TrainingDiverged(f"trainable tensor {name} holds NaN or infinite values after training: it diverged "
                                   "(lower optimizer.lr or the method's scale)")


def execute(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run ``cfg`` in ``run_dir`` and always leave a results.json plus an index line behind.

    The folder is claimed first (:func:`peftbench.records.guard.claim`): one process at a time, never over a finished
    run.
    results.json says ``running`` from the start (with the key and overrides), then ``ok``, ``failed`` or
    ``interrupted`` (SIGTERM / SIGINT: :class:`~peftbench.records.guard.Interrupted` is re-raised for the exit code).
    A resume of a finished run returns its record without running anything.
    """
    record_choices(cfg)
    key = config_key(cfg)
    picked = choices(cfg)
    keys = point_keys(cfg)
    rank0 = rank_zero()
    with claim(run_dir, key, bool(cfg.resume)) if rank0 else contextlib.nullcontext(None) as previous:
        if previous is not None and previous.get("status") == "ok":  # resume of a finished run: nothing to do
            return previous
        record: dict[str, Any] = {
            "key": key,
            **keys,
            "group": cfg.get("group"),
            "run_dir": str(run_dir.resolve()),
            "method": picked.get("method", OmegaConf.select(cfg, "method._target_")),
            "dataset": picked.get("dataset", OmegaConf.select(cfg, "dataset.name")),
            "backbone": OmegaConf.select(cfg, "backbone.name"),
            "scorer": picked.get("scorer"),
            "seed": cfg.seed,
            "protocol": cfg.protocol,
            "protocol_label": "max test accuracy over epochs (papers' habit)" if cfg.protocol == "paper"
            else cfg.protocol,
            "overrides": overrides(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if rank0:
            write_json_atomic(run_dir / RESULTS, {**record, "status": "running", "pid": os.getpid()})
        try:
            with signals_raise():
                outcome = run(cfg, run_dir, resuming=previous is not None)
            if not outcome.pop("global_zero"):
                return outcome  # under DDP only rank 0 reports
            record.update(outcome, status="ok")
        except Interrupted as sig:
            if rank0:
                record.update(status="interrupted", error=f"interrupted by {sig}", signal=str(sig))
                _finish(cfg, run_dir, record)
            raise
        except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - every failure is recorded
            if not rank0:
                raise
            cause = user_error(err)
            record.update(status="failed", error=f"{type(cause or err).__name__}: {cause or err}")
            if cause is None:
                record["traceback"] = traceback.format_exc()
            _finish(cfg, run_dir, record)
            raise
        _finish(cfg, run_dir, record)
        if rank0 and not cfg.get("keep_checkpoint", False):  # a finished run keeps its task file, not the checkpoint
            shutil.rmtree(run_dir / CHECKPOINT.parent, ignore_errors=True)
        return record


def finished_run(cfg: DictConfig) -> dict[str, Any] | None:
    """The index record of an ``ok`` run with the same key as ``cfg``, if there is one (what ``skip_done`` skips)."""
    record = latest_by_key(Path(cfg.paths.index_file)).get(config_key(cfg))
    return record if record and record.get("status") == "ok" else None


def _finish(cfg: DictConfig, run_dir: Path, record: dict[str, Any]) -> None:
    """Write the final record to results.json and the index (signals held off while writing)."""
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with signals_ignored():
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
    quiet_third_party()
    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.skip_done and not cfg.resume and (done := finished_run(cfg)) is not None:
        print(f"peftbench: skipped (already ok: {done['run_dir']}) {' '.join(overrides())}")
        return
    run_dir = Path(hydra_cfg.runtime.output_dir)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)  # the real folder (in a multirun: the sweep's job folder)
    try:
        record = execute(cfg, run_dir)
    except Interrupted as sig:  # recorded by execute; a sweep stops too
        print(
            f"peftbench: interrupted by {sig}: {run_dir / RESULTS} says 'interrupted'; continue with the same "
            f"overrides plus resume=true run_dir={run_dir}",
            file=sys.stderr,
        )
        sys.exit(sig.exit_code)
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
