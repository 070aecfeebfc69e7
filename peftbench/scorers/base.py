"""What every scorer shares: a guard that keeps the model pristine, and the names of scored matrices.

A scorer is pure: model + data -> scores. :class:`Pristine` snapshots each module's train/eval flag and each
parameter's ``requires_grad`` and ``.grad`` on entry and restores them on exit (also on error), so a scorer may
switch modes or enable gradients freely inside it.

Scored matrices are named ``<linear path>.weight`` (e.g. ``blocks.3.mlp.fc1.weight``), except the q/k/v row
slices of timm's fused qkv: ``blocks.3.attn.qkv.weight:q`` (its rows from :meth:`BlockView.rows`). The patch
embedding, when scored, is ``patch_embed.proj.weight`` as a (C, 3*P*P) matrix (:func:`patch_key`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from types import TracebackType

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import PeftbenchError


class Pristine:
    """Context manager restoring modes, ``requires_grad`` and ``.grad`` of ``model`` on exit.

    Weights are not copied (a scorer must not write them; tests check bit-identity of the state dict).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.params = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        return self.model

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for m, training in self.modes:
            m.training = training
        for p, requires_grad, grad in self.params:
            p.requires_grad_(requires_grad)
            p.grad = grad


class Counted:
    """The scoring batches (x, y), counted as the scorer consumes them; refuses to start without a single batch."""

    def __init__(self, batches: Iterable) -> None:
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise PeftbenchError(
                "the scorer gets no data: scoring.n_samples must be >= 1 and the training split non-empty"
            )
        self.batches, self.n_batches, self.n_samples = itertools.chain([first], it), 0, 0

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            self.n_batches += 1
            self.n_samples += len(batch[1])
            yield batch


def check_scores(scores: dict, seen: Counted, scorer: object) -> None:
    """Refuse scores that cannot select anything: non-finite values, or every score zero."""
    name = type(scorer).__name__
    tensors = {k: v for k, v in scores.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise PeftbenchError(f"scorer {name} gave non-finite scores for {key!r}: the model or data is broken")
    if tensors and all(not bool(v.any()) for v in tensors.values()):
        raise PeftbenchError(
            f"scorer {name} gave all-zero scores on {seen.n_samples} samples: nothing can be selected "
            "(no learning signal: check the data, labels and scoring settings)"
        )


def matrix_key(block: anatomy.BlockView, target: str) -> str:
    """Name of the scored matrix of ``target`` in ``block`` (q/k/v: a row slice of the fused qkv weight)."""
    key = f"{block.linear_path(target)}.weight"
    return f"{key}:{target}" if block.rows(target) is not None else key


def patch_key(model: nn.Module) -> str | None:
    """Name of the scored patch-embedding matrix (its conv weight viewed as (C, 3*P*P)), None without one."""
    path = anatomy.patch_embedding_path(model)
    return None if path is None else f"{path}.weight"


def scored_candidates(
    model: nn.Module, scores: dict[str, torch.Tensor], targets
) -> tuple[dict[str, tuple[anatomy.BlockView, str]], list[str]]:
    """The scored candidates: ({matrix key: (block, target)} of ``targets`` in block order, [1-D parameter names])."""
    matrices = {matrix_key(b, t): (b, t) for b, t in anatomy.iter_linear_targets(model, targets)}
    matrices = {k: v for k, v in matrices.items() if k in scores}
    params = dict(model.named_parameters())
    vectors = [k for k in scores if k not in matrices and k in params and params[k].ndim == 1]
    return matrices, vectors


def top_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries of ``flat`` (N,); ties broken by position (deterministic)."""
    k = min(k, flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k == 0:
        return mask
    threshold = torch.topk(flat, k, sorted=False).values.min()
    mask = flat > threshold
    ties = (flat == threshold).nonzero().flatten()[: k - int(mask.sum())]  # first ties in flat order
    mask[ties] = True
    return mask
