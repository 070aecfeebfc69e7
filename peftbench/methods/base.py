"""The method interface: how every PEFT method plugs into peftbench.

A method owns selection and mutation of the backbone, in two steps driven by :func:`prepare_model`:

1. ``select(model, scores) -> state``: decide what to tune from the pre-trained model and, for methods that
   need one, the scorer's output. ``state`` is plain data (tensors, numbers, strings, lists, dicts) so it can
   be broadcast under DDP and saved beside a run; resuming a run re-applies the saved state instead of
   scoring again.
2. ``apply(model, state)``: freeze, unfreeze and wrap modules. Afterwards ``requires_grad`` marks exactly
   the trainable set; the classifier head is always trainable (:func:`prepare_model` sees to it).

Methods that change only existing weights (reparameterisable) implement merge/unmerge through their layers'
``merge()``/``unmerge()``; :func:`merge` and :func:`unmerge` here walk the model for them.

Methods that act during training (warm-up then deactivate heads, iterative pruning) implement the training hooks
below; one generic callback (:class:`peftbench.training.callbacks.MethodHooks`) calls them and owns everything
Lightning:

- ``on_epoch_start(model, state, ctx) -> new state | None``: decide what changes before epoch ``ctx.epoch``
  (score, choose); leave the model as found. ``None``: nothing changes.
- ``update(model, old, new) -> ParamMap | None``: bring the model from ``old`` to ``new`` (called on every rank
  with rank 0's ``new`` under DDP). ``None``: no parameter was replaced or removed; otherwise the callback
  rebuilds the optimizer (carrying AdamW state through the returned mapping) and re-wraps DDP.
- ``first_reportable_epoch(state)``: the reported maximum over epochs starts here (TINA: its last cycle).
- ``on_epoch_end(model, state, ctx)`` / ``on_fit_end(model, state, ctx) -> new state | None``: records only.

The callback also re-saves ``method_state.pt`` with every checkpoint (a resumed run re-applies it) and books the
hooks' time as scoring time. Method files import no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.scorers.base import Counted, check_scores

State = dict[str, Any]
#: new parameter -> (the parameter it replaces, dim along which entries were kept or None for "same shape",
#: kept indices or None): how optimizer state follows parameters a method replaced
ParamMap = dict[nn.Parameter, tuple[nn.Parameter, int | None, torch.Tensor | None]]


def _no_log(message: str) -> None:
    """Default logger of a :class:`TrainingContext`: drop the message."""


@dataclass
class TrainingContext:
    """What a method's training hooks may use; built by the training loop (methods import no Lightning).

    Attributes:
        epoch: the epoch about to start (``on_epoch_start``) or just finished (``on_epoch_end``, ``on_fit_end``).
        max_epochs: the fit's length in epochs.
        batches: zero-argument factory of the scoring batches (the first ``scoring.n_samples`` training images, no
            augmentation, normalised, on the model's device), or None without data.
        evaluate: top-1 accuracy of the current model on a split role (``"test"``), or None without data.
        metrics: the last logged metrics (e.g. ``"val/acc"``) as floats.
        info, warn: log one line (on rank 0 under DDP).
    """

    epoch: int
    max_epochs: int
    batches: Callable[[], Iterable] | None = None
    evaluate: Callable[[str], float] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    info: Callable[[str], None] = _no_log
    warn: Callable[[str], None] = _no_log


class Method:
    """Base class of all PEFT methods; subclasses override :meth:`select` (optional) and :meth:`apply`."""

    #: Whether the merged model is a plain backbone (the method only changes existing weights).
    reparameterisable: bool = False
    #: Whether the method needs a scorer's output in :meth:`select`.
    needs_scores: bool = False
    #: Warm-up fraction of every learning-rate cycle when :meth:`schedule_restarts` restarts the schedule (None:
    #: the fit's own warm-up share, ``scheduler.warmup_epochs / trainer.max_epochs``).
    restart_warmup: float | None = None

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None) -> State:
        """Decide what to tune; return the selection as plain data. Default: nothing to decide."""
        return {}

    def apply(self, model: nn.Module, state: State) -> None:
        """Mutate ``model`` according to ``state`` and set ``requires_grad`` on the trainable set."""
        raise NotImplementedError

    def schedule_restarts(self, state: State | None, max_epochs: int) -> list[int]:
        """Epochs at which the learning-rate schedule starts again (methods that train in cycles); none by default."""
        return []

    def first_reportable_epoch(self, state: State) -> int:
        """The first epoch whose evaluation may be reported for this run: the maximum over epochs (test under
        ``protocol=paper``, val under ``tune``) is taken from here on. Methods that change the model during training
        exclude the epochs before their final configuration existed. Default 0: every epoch."""
        return 0

    def describe(self, state: State) -> dict[str, Any]:
        """A JSON-friendly summary of the selection for results.json (default: nothing)."""
        return {}

    # --- training hooks (see the module docstring); the defaults do nothing -----------------------------------
    def on_epoch_start(self, model: nn.Module, state: State, ctx: TrainingContext) -> State | None:
        """Decide what changes before epoch ``ctx.epoch``; return the new state, or None when nothing changes."""
        return None

    def update(self, model: nn.Module, old: State, new: State) -> ParamMap | None:
        """Bring ``model`` from ``old`` to ``new``; return the replaced parameters ({new: (old, dim, kept)}, possibly
        empty when parameters only disappeared), or None when no parameter was replaced or removed."""
        return None

    def on_epoch_end(self, model: nn.Module, state: State, ctx: TrainingContext) -> State | None:
        """Record after epoch ``ctx.epoch`` (must not change the model); return the new state or None."""
        return None

    def on_fit_end(self, model: nn.Module, state: State, ctx: TrainingContext) -> State | None:
        """Record at the end of the fit (must not change the model); return the new state or None."""
        return None


def freeze(model: nn.Module) -> None:
    """Make every parameter of ``model`` non-trainable."""
    for p in model.parameters():
        p.requires_grad_(False)


def prepare_model(
    model: nn.Module,
    method: Method,
    scorer: Callable[[nn.Module, Iterable], dict[str, torch.Tensor]] | None = None,
    batches: Callable[[], Iterable] | None = None,
    state: State | None = None,
    broadcast: Callable[[State], State] | None = None,
) -> State:
    """Score (when needed), select and apply ``method`` to ``model``; return the selection state.

    Args:
        model: the pre-trained backbone with its fresh classifier head.
        method: the PEFT method.
        scorer: pure function (model, batches) -> scores; required when ``method.needs_scores``.
        batches: zero-argument callable returning the scoring batches (normalised inputs, labels).
        state: a saved selection (resume): applied as is, without scoring.
        broadcast: under DDP, makes every rank adopt rank 0's selection.
    """
    if state is None:
        scores = None
        if method.needs_scores or scorer is not None:
            if scorer is None or batches is None:
                raise ConfigError(f"method {method.name!r} needs a scorer: set scorer=<name> (see conf/scorer/)")
            seen = Counted(batches())
            scores = scorer(model, seen)
            check_scores(scores, seen, scorer)
        state = method.select(model, scores)
        if broadcast is not None:
            state = broadcast(state)
    was_training = model.training
    method.apply(model, state)
    model.train(was_training)  # modules the method added follow the model's current train/eval mode
    for p in anatomy.head(model).parameters():
        p.requires_grad_(True)
    return state


def merge(model: nn.Module) -> None:
    """Fold every tuner layer's delta into its base weight (``merge()`` on each wrapper)."""
    for module in model.modules():
        if module is not model and callable(getattr(module, "merge", None)) and hasattr(module, "base_layer"):
            module.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`."""
    for module in model.modules():
        if module is not model and callable(getattr(module, "unmerge", None)) and hasattr(module, "base_layer"):
            module.unmerge()


def unwrap(model: nn.Module) -> nn.Module:
    """Merge, then replace every wrapper by its ``base_layer``: the result is a plain timm model (in place)."""
    merge(model)
    replaced = True
    while replaced:  # nested wrappers unwrap one level per pass
        replaced = False
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if hasattr(child, "base_layer") and getattr(child, "merged", False):
                    nn.Module.__setattr__(module, child_name, child.base_layer)
                    replaced = True
    return model
