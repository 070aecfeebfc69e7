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

from peftbench.console import say
from peftbench.errors import PeftbenchError, TrainingDiverged
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
        if self.scorer is not None and self.method_state is None:
            n = self.scoring["n_samples"]
            say(f"scoring the pre-trained model with {type(self.scorer).__name__} on "
                f"{'every' if n is None else f'the first {n}'} training images ...")
        broadcast = None
        if trainer is not None and trainer.world_size > 1:
            broadcast = lambda state: trainer.strategy.broadcast(state, src=0)  # noqa: E731
        self.method_state = prepare_model(
            self.model, self.method, self.scorer, self.scoring_batches(), self.method_state, broadcast
        )
        self.scoring_seconds = time.perf_counter() - start
        if self.scorer is not None:
            say(f"scored and selected in {self.scoring_seconds:.1f}s: {self.method.name}")
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

    @torch.no_grad()
    def evaluate(self, role: str = "test") -> float:
        """Top-1 accuracy of the current model on the data module's split ``role`` (eval mode, the run's precision,
        train/eval mode restored). Under DDP every rank evaluates the whole split (the numbers agree)."""
        datamodule = self.trainer.datamodule
        was_training = self.training
        self.eval()
        correct = total = 0
        with self.trainer.precision_plugin.forward_context():
            for batch in datamodule._eval_loader(role):
                images, labels = datamodule.on_after_batch_transfer([t.to(self.device) for t in batch], 0)
                correct += int((self(images).argmax(-1) == labels).sum())
                total += len(labels)
        self.train(was_training)
        return correct / max(1, total)

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
        self.val_acc.update(self.finite_logits(images, "evaluation"), labels)
        self.log("val/acc", self.val_acc, prog_bar=True, on_step=False, on_epoch=True)

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        self.test_acc.update(self.finite_logits(images, "test"), labels)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def finite_logits(self, images: torch.Tensor, what: str) -> torch.Tensor:
        """Logits (B, classes) of ``images``; a non-finite logit fails the run (an accuracy of NaNs is no result)."""
        logits = self(images)
        if not torch.isfinite(logits).all():
            raise TrainingDiverged(
                f"non-finite logits in {what} after epoch {self.current_epoch}: the model diverged "
                "(lower optimizer.lr or the method's scale)"
            )
        return logits

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
        restarts = self.method.schedule_restarts(self.method_state, self.trainer.max_epochs)
        extra = {}
        if restarts:  # a method that trains in cycles: the schedule restarts, each cycle with its own warm-up
            extra = {"restarts": [e * per_epoch for e in restarts], "restart_warmup": self.method.restart_warmup}
        scheduler = self.scheduler_factory(optimizer, total_steps=total, steps_per_epoch=per_epoch, **extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpointing -----------------------------------------------------------------------------
    # The resumable checkpoint holds what training changes: the trainable tensors (with the optimizer and schedule
    # states Lightning adds), never the frozen backbone, which a resume rebuilds from the pre-trained weights and
    # the saved selection (method_state.pt). ViT-B/16 LoRA: ~4 MB instead of ~345 MB.
    strict_loading = False  # the checkpoint's state dict is the trainable part only

    def trainable_keys(self) -> set[str]:
        """State-dict keys of the trainable parameters (``model.…``)."""
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self.trainable_keys() - set(checkpoint.get("state_dict", {})))
        if missing:
            raise PeftbenchError(
                f"the checkpoint lacks trained tensors of this run ({missing[:3]}): it belongs to another run or "
                "method; resume with the run's own overrides"
            )
