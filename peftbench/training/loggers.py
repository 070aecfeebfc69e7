"""Experiment loggers: W&B (offline by default), CSV, or none."""

from __future__ import annotations

import os
from pathlib import Path


def wandb_logger(
    save_dir: str | Path,
    name: str | None = None,
    project: str = "peftbench",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    offline: bool | None = None,
):
    """A Lightning WandbLogger; offline unless ``offline=False`` or the environment has ``WANDB_MODE=online``."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = os.environ.get("WANDB_MODE", "offline") != "online"
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(
        save_dir=str(save_dir),
        name=name,
        project=project,
        entity=entity,
        group=group,
        tags=list(tags or []),
        offline=offline,
        mode="offline" if offline else "online",
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning passes anonymous=None, which W&B warns about
    return logger


def csv_logger(save_dir: str | Path, name: str | None = None, **_: object):
    """Lightning's CSVLogger writing ``<run_dir>/metrics.csv``-style logs."""
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(save_dir), name="csv", version="")


def no_logger(save_dir: str | Path | None = None, name: str | None = None, **_: object) -> bool:
    """No experiment logger (Lightning takes ``logger=False``)."""
    return False


def start(logger, config: dict) -> None:
    """Record the run's config at its start, so a killed run still shows what it was."""
    if logger:
        logger.log_hyperparams(config)


def abort(logger) -> None:
    """Close the logger's run as failed (W&B: exit code 1), so what it holds reaches disk; never raises."""
    if not logger:
        return
    try:
        logger.finalize("failed")
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish(exit_code=1)
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        pass


def finish(logger, metrics: dict[str, float], config: dict) -> None:
    """Record the run's config and final metrics in the logger and close it (one W&B run per task)."""
    if not logger:
        return
    logger.log_hyperparams(config)
    logger.log_metrics(metrics)
    logger.save()
    logger.finalize("success")
    experiment = getattr(logger, "_experiment", None)
    if experiment is not None and hasattr(experiment, "summary"):  # W&B: summary metrics, then close the run
        experiment.summary.update(metrics)
        experiment.finish()
