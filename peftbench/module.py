"""The LightningModule: scores and prepares the backbone once at the start of fit, then trains a classifier.

It knows no method by name: a :class:`~peftbench.methods.base.Method` (and optionally a scorer) is applied in
``configure_model``, which Lightning calls before the strategy moves/wraps the model and before
``configure_optimizers``, so parameters a method adds are both in the optimizer and in DDP.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from peftbench.errors import TrainingDiverged
from peftbench.methods.base import Method, State, prepare_model
from peftbench.weight_decay import parameter_groups


class PEFTModule(L.LightningModule):
    """Fine-tunes ``model`` with ``method`` (and ``scorer``) under AdamW + a per-step schedule.

    Args:
        model: timm backbone with a fresh head.
        method: the PEFT method.
        optimizer: partial optimizer factory taking ``params`` (param groups).
        scheduler: partial schedule factory taking (optimizer, total_steps, steps_per_epoch), or None.
        num_classes: number of classes (metrics).
        scorer: optional pure scorer (model, batches) -> scores.
        scoring: ``{"n_samples": int | None, "batch_size": int}`` for the scorer's data (None: every image).
        method_state: a saved selection to re-apply (resume) instead of scoring.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None,
        num_classes: int,
        scorer: Callable | None = None,
        scoring: dict | None = None,
        method_state: State | None = None,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model, self.method, self.scorer = model, method, scorer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scoring = dict(scoring or {"n_samples": 512, "batch_size": 32})
        self.method_state = method_state
        self.label_smoothing, self.seed = label_smoothing, seed
        self.prepared = False
        self.scoring_seconds = 0.0
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    # --- method hook -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Score (once), select and apply the method; under DDP every rank adopts rank 0's selection."""
        if self.prepared:
            return
        start = time.perf_counter()
        trainer = self._trainer
        broadcast = None
        if trainer is not None and trainer.world_size > 1:
            broadcast = lambda state: trainer.strategy.broadcast(state, src=0)  # noqa: E731
        self.method_state = prepare_model(
            self.model, self.method, self.scorer, self.scoring_batches(), self.method_state, broadcast
        )
        self.scoring_seconds = time.perf_counter() - start
        self.prepared = True

    def scoring_batches(self) -> Callable[[], Iterable] | None:
        """Factory of the scorers' batches: the first ``scoring.n_samples`` training images in file order (null:
        all of them, one full pass), no augmentation, normalised, on this module's device (None without a data
        module)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "scoring_batches"):
            return None
        n, batch_size = self.scoring["n_samples"], self.scoring["batch_size"]
        n = sys.maxsize if n is None else n  # the data module stops at the split's end
        return lambda: datamodule.scoring_batches(n, batch_size, self.device)

    # --- steps -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The model's randomness in a step (dropout, drop-path) depends only on (seed, epoch, step, rank), so a
        # resumed run continues exactly as an uninterrupted one (data order and augmentation: EpochSampler).
        torch.manual_seed(hash((self.seed, self.current_epoch, batch_idx, self.global_rank)) % 2**63)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "lower optimizer.lr or method's scale, or check the data"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        self.val_acc.update(self(images), labels)
        self.log("val/acc", self.val_acc, prog_bar=True, on_step=False, on_epoch=True)

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        self.test_acc.update(self(images), labels)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    # --- optimisation ------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Trainable parameters split by role: weight-matrix entries decayed, the rest (biases, norms, tokens) not
        (:func:`peftbench.weight_decay.parameter_groups`)."""
        return parameter_groups(self.model)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs))
        restarts_of = getattr(self.method, "schedule_restarts", None)  # optional part of the Method interface
        restarts = restarts_of(self.method_state, self.trainer.max_epochs) if restarts_of else []
        extra = {"restarts": [epoch * per_epoch for epoch in restarts]} if restarts else {}
        scheduler = self.scheduler_factory(optimizer, total_steps=total, steps_per_epoch=per_epoch, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpointing -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["peftbench_method_state"] = self.method_state
