"""The LightningModule: scores and prepares the backbone once at the start of fit, then trains a classifier.

It knows no method by name: a :class:`~peftbench.methods.base.Method` (and optionally a scorer) is applied in
``configure_model``, which Lightning calls before the strategy moves/wraps the model and before
``configure_optimizers``, so parameters a method adds are both in the optimizer and in DDP.

A training step never waits for the device: the loss is accumulated there (Lightning's epoch mean of
``train/loss``), and the check that stops a diverged run reads a device-side record of the first non-finite loss
every :attr:`PEFTModule.check_every_n_steps` steps and at the last step of every epoch (before the epoch's
checkpoint is written). Evaluation runs under ``torch.inference_mode`` and counts correct predictions on the device.
"""

from __future__ import annotations

import inspect
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
from peftbench.training.weight_decay import parameter_groups


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
        seed: the seed of the per-step model randomness (dropout, drop-path).
        compile: ``torch.compile`` the training forward after the method is applied (evaluation stays eager).
        compile_backend: torch.compile's backend (``inductor``; ``eager`` runs the graph capture alone).
    """

    #: the divergence check reads the device every this many steps (and at the last step of every epoch)
    check_every_n_steps = 50

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
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        self.model, self.method, self.scorer = model, method, scorer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scoring = dict(scoring or {"n_samples": 512, "batch_size": 32})
        self.method_state = method_state
        self.label_smoothing, self.seed = label_smoothing, seed
        self.compile_enabled, self.compile_backend = bool(compile), compile_backend  # not nn.Module.compile
        self.compiled_model: Callable[[torch.Tensor], torch.Tensor] | None = None  # set in configure_model
        self.diverged: dict[str, torch.Tensor] | None = None  # device-side record of the first non-finite loss
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
        if self.compile_enabled:  # kept out of the module tree: the state dict and checkpoints keep their keys
            self.__dict__["compiled_model"] = torch.compile(self.model, backend=self.compile_backend)
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

    def evaluate(self, role: str = "test") -> float:
        """Top-1 accuracy of the current model on the data module's split ``role`` (eval mode, the run's precision,
        ``torch.inference_mode``, train/eval mode restored). Under DDP every rank evaluates the whole split (the
        numbers agree). Correct predictions are counted on the device: one host read at the end."""
        datamodule = self.trainer.datamodule
        was_training = self.training
        self.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        total = 0
        with torch.inference_mode(), self.trainer.precision_plugin.forward_context():
            for batch in datamodule._eval_loader(role):
                images, labels = datamodule.on_after_batch_transfer([t.to(self.device) for t in batch], 0)
                correct += (self(images).argmax(-1) == labels).sum()
                total += len(labels)
        self.train(was_training)
        return int(correct) / max(1, total)

    # --- steps -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training step's forward: the compiled model with ``compile=true``, else the model."""
        return (self.model if self.compiled_model is None else self.compiled_model)(x)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The model's randomness in a step (dropout, drop-path) depends only on (seed, epoch, step, rank), so a
        # resumed run continues exactly as an uninterrupted one (data order and augmentation: EpochSampler).
        torch.manual_seed(hash((self.seed, self.current_epoch, batch_idx, self.global_rank)) % 2**63)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.train_forward(images), labels, label_smoothing=self.label_smoothing)
        self.record_divergence(loss.detach())
        last = batch_idx + 1 >= self.trainer.num_training_batches
        if last or (batch_idx + 1) % self.check_every_n_steps == 0:
            self.check_divergence()  # the only host read of a step, every check_every_n_steps steps
        # accumulated on the device by Lightning (on_epoch): no host read per step
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def record_divergence(self, loss: torch.Tensor) -> None:
        """Remember, on the device, the first non-finite loss and its step (no host synchronisation)."""
        if self.diverged is None or self.diverged["loss"].device != loss.device:
            self.diverged = {"loss": torch.zeros((), device=loss.device),
                             "step": torch.full((), -1, dtype=torch.long, device=loss.device)}
        d = self.diverged
        first = (d["step"] < 0) & ~torch.isfinite(loss)
        d["loss"] = torch.where(first, loss.float(), d["loss"])
        d["step"] = torch.where(first, self.global_step, d["step"])  # a Python scalar: passed by value, no copy

    def check_divergence(self) -> None:
        """Raise :class:`TrainingDiverged` if a loss so far was NaN or infinite (one host read)."""
        d = self.diverged
        if d is None:
            return
        first = int(d["step"])
        if first >= 0:
            raise TrainingDiverged(
                f"loss is {float(d['loss'])} at epoch {self.current_epoch}, step {first}; "
                "lower optimizer.lr or method's scale, or check the data"
            )

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
        (:func:`peftbench.training.weight_decay.parameter_groups`)."""
        return parameter_groups(self.model)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameter_groups(), **fused_option(self.optimizer_factory,
                                                                                          self.device))
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


def fused_option(factory: Callable[..., torch.optim.Optimizer], device: torch.device) -> dict[str, bool]:
    """``{"fused": True}`` when ``factory`` (a partial of a torch optimizer) accepts ``fused`` and ``device`` is CUDA
    (one kernel per step for all parameters), else ``{}``: torch's default (foreach on CUDA, the per-tensor loop on
    the CPU, whose numbers the CPU tests pin). An explicit ``fused`` in the optimizer config wins."""
    target = getattr(factory, "func", factory)
    if device.type != "cuda" or "fused" in (getattr(factory, "keywords", None) or {}):
        return {}
    try:
        accepts = "fused" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    return {"fused": True} if accepts else {}
