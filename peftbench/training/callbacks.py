"""Lightning callbacks peftbench always installs (checkpoints, the method's training hooks, evaluation history), and
the bench's step timer."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from peftbench.methods.base import ParamMap, TrainingContext

if TYPE_CHECKING:
    from peftbench.training.module import PEFTModule


class LastCheckpoint(L.Callback):
    """Saves ``<dir>/last.ckpt`` at the end of every ``every_n_epochs``-th training epoch and of the last one
    (atomically: write, then rename).

    ``every_n_epochs="auto"``: every ``max(1, max_epochs // 10)`` epochs, so a run writes about ten checkpoints
    (a 100-epoch VTAB-1k run: every 10 epochs; runs of under 20 epochs: every epoch) and an interrupted run loses
    at most a tenth of its epochs on resume. A resume replays the epochs after the checkpoint exactly (data order,
    augmentation and model randomness depend only on (seed, epoch, step)). ``writes`` and ``bytes_written`` count
    what this callback wrote (results.json ``storage``).
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int | str = 1) -> None:
        if every_n_epochs != "auto" and (
            isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1
        ):
            raise ValueError(f"checkpoint_every={every_n_epochs!r}: give auto or an integer >= 1 (epochs)")
        self.dirpath, self.every_n_epochs = Path(dirpath), every_n_epochs
        self.writes = self.bytes_written = 0

    @property
    def path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def interval(self, max_epochs: int | None) -> int:
        """Epochs between two checkpoints of a run of ``max_epochs`` epochs."""
        if self.every_n_epochs == "auto":
            return max(1, (max_epochs or 1) // 10)
        return int(self.every_n_epochs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done % self.interval(trainer.max_epochs) and done != trainer.max_epochs:
            return
        tmp = self.dirpath / f".last.{os.getpid()}.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # all ranks call it; rank 0 writes; with optimizer state
        if trainer.is_global_zero:
            self.writes += 1
            self.bytes_written += tmp.stat().st_size
            os.replace(tmp, self.path)


class MethodHooks(L.Callback):
    """Runs the method's training hooks and owns their Lightning side (see :mod:`peftbench.methods.base`).

    - fit start: writes the method's selection to ``state_path`` (rank 0) unless it exists (a resumed run re-applies
      that file instead of scoring again);
    - epoch start: ``method.on_epoch_start``; a new state is broadcast from rank 0 under DDP and applied on every
      rank with ``method.update``; when parameters were replaced, DDP is re-wrapped and the optimizer rebuilt with
      the AdamW state of the surviving parameters (and the scheduler's state) carried over;
    - epoch end / fit end: ``method.on_epoch_end`` / ``method.on_fit_end`` (records);
    - every checkpoint: re-saves ``state_path`` so it matches the checkpoint's shapes (install this callback BEFORE
      the one that saves checkpoints at epoch end, so the epoch's records are in the saved state).

    Acting at an epoch START keeps every checkpoint (saved at epoch ends) consistent with the method state. The
    time spent in the hooks is added to ``pl_module.scoring_seconds`` (results.json ``timings.scoring_s``).
    """

    def __init__(self, state_path: str | Path) -> None:
        self.path = Path(state_path)

    @staticmethod
    def context(trainer: L.Trainer, pl_module: PEFTModule) -> TrainingContext:
        """The hooks' view of the run: epoch, scoring batches, an evaluation function, the last metrics."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        return TrainingContext(
            epoch=trainer.current_epoch,
            max_epochs=trainer.max_epochs,
            batches=pl_module.scoring_batches(),
            evaluate=pl_module.evaluate if trainer.datamodule is not None else None,
            metrics=metrics,
            info=rank_zero_info,
            warn=rank_zero_warn,
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: PEFTModule) -> None:
        if trainer.is_global_zero and not self.path.exists():
            torch.save(pl_module.method_state, self.path)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: PEFTModule) -> None:
        start = time.perf_counter()
        method, old = pl_module.method, pl_module.method_state
        new = method.on_epoch_start(pl_module.model, old, self.context(trainer, pl_module))
        if new is not None:
            if trainer.world_size > 1:
                new = trainer.strategy.broadcast(new, src=0)  # every rank applies rank 0's decision
            mapping = method.update(pl_module.model, old, new)
            pl_module.method_state = new
            if mapping is not None:
                if trainer.world_size > 1:
                    rewrap_ddp(trainer)
                rebuild_optimizer(trainer, mapping)
        pl_module.scoring_seconds += time.perf_counter() - start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: PEFTModule) -> None:
        self._record(trainer, pl_module, pl_module.method.on_epoch_end, trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: PEFTModule) -> None:
        # trainer.current_epoch counts the finished epochs here: the last epoch is one less
        self._record(trainer, pl_module, pl_module.method.on_fit_end, trainer.current_epoch - 1)

    def _record(self, trainer: L.Trainer, pl_module: PEFTModule, hook, epoch: int) -> None:
        start = time.perf_counter()
        ctx = self.context(trainer, pl_module)
        ctx.epoch = epoch
        new = hook(pl_module.model, pl_module.method_state, ctx)
        if new is not None:
            pl_module.method_state = new
        pl_module.scoring_seconds += time.perf_counter() - start

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: PEFTModule, checkpoint: dict) -> None:
        """Keep ``state_path`` (what a resumed run re-applies) in step with the checkpoint's shapes."""
        if trainer.is_global_zero and self.path.exists():
            torch.save(pl_module.method_state, self.path)


def rewrap_ddp(trainer: L.Trainer) -> None:
    """Re-create the DistributedDataParallel wrapper after parameters were replaced (its buckets hold the old ones)."""
    strategy = trainer.strategy
    strategy.model = strategy.lightning_module  # drop the old wrapper
    strategy.configure_ddp()


def rebuild_optimizer(trainer: L.Trainer, mapping: ParamMap) -> None:
    """Re-run ``configure_optimizers`` for the current trainable parameters; carry optimizer and scheduler state."""
    old_opt = trainer.strategy.optimizers[0]
    old_scheds = [c.scheduler for c in trainer.strategy.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)  # sets strategy.optimizers (+ Lightning wrappers) and schedulers
    new_opt = trainer.strategy.optimizers[0]
    for old_s, config in zip(old_scheds, trainer.strategy.lr_scheduler_configs, strict=True):
        config.scheduler.load_state_dict(old_s.state_dict())
    carry_optimizer_state(old_opt, new_opt, mapping)  # after the scheduler, so group lr is the old one


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer, mapping: ParamMap) -> None:
    """Copy ``old``'s per-parameter state (exp_avg, exp_avg_sq, step) and group settings (lr, ...) into ``new``.

    Replaced parameters (keys of ``mapping``) get the kept slices of their predecessor's state; untouched ones their
    own state; parameters that disappeared take their state with them.
    """
    for g_old, g_new in zip(old.param_groups, new.param_groups, strict=True):
        g_new.update({k: v for k, v in g_old.items() if k != "params"})
        for p in g_new["params"]:
            src, dim, idx = mapping.get(p, (p, None, None))
            state = old.state.get(src)
            if not state:
                continue
            copied = {}
            for key, value in state.items():
                if dim is not None and torch.is_tensor(value) and value.shape == src.shape:
                    value = value.index_select(dim, idx.to(value.device))
                copied[key] = value.clone() if torch.is_tensor(value) else value
            new.state[p] = copied


class EvalHistory(L.Callback):
    """Records the monitored accuracy after every evaluation epoch (for best-epoch / max reporting)."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None:
            self.history.append((trainer.current_epoch, float(acc)))

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]


class StepTimer(L.Callback):
    """Training steps per second, data fetching included (from each epoch's start to its last step's end), over
    the epochs after the first ``skip_epochs``; written as JSON to ``path`` at the end of fit (``make bench``)."""

    def __init__(self, path: str | Path, skip_epochs: int = 1) -> None:
        self.path, self.skip = Path(path), skip_epochs
        self.seconds, self.steps, self.epoch_start = 0.0, 0, 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self.epoch_start, self.last_end = time.perf_counter(), None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch >= self.skip:
            if batch_idx + 1 >= trainer.num_training_batches:
                self._sync(pl_module)
            self.steps += 1
            self.last_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.skip and self.last_end is not None:  # validation (before this) not counted
            self.seconds += self.last_end - self.epoch_start

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            rate = self.steps / self.seconds if self.seconds > 0 else None
            self.path.write_text(json.dumps({"steps": self.steps, "seconds": self.seconds, "steps_per_s": rate}))
