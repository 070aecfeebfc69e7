"""Learning-rate schedules, stepped per optimisation step."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 10,
    warmup_start_factor: float = 0.0,
    min_factor: float = 0.0,
    restarts: Sequence[int] = (),
    restart_warmup: float | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_epochs`` epochs, then cosine decay to ``min_factor`` x lr at ``total_steps``.

    The factor at step t is ``warmup_start_factor + (1 - warmup_start_factor) * (t + 1) / warmup_steps`` during
    warm-up (so the first step already has a non-zero lr), then ``min + (1 - min) * (1 + cos(pi * p)) / 2``.

    ``restarts``: steps at which the whole schedule starts again (methods that train in cycles, e.g. TINA). Each
    segment [restart_k, restart_k+1) runs warm-up + cosine scaled to its own length; its warm-up is the fraction
    ``restart_warmup`` of the segment (TINA: 0.2, the paper's 20 of every 100 epochs) or, when None, the fit's own
    warm-up share (10 of 100 epochs -> 10% of every segment). The factor is a pure function of the step, so a
    resumed run continues exactly.
    """
    total_steps = max(1, total_steps)
    starts = [0] + sorted(s for s in set(restarts) if 0 < s < total_steps)
    ends = starts[1:] + [total_steps]
    share = warmup_epochs * steps_per_epoch / total_steps if restart_warmup is None else float(restart_warmup)

    def segment(length: int, warmup: int):
        total = max(length, warmup + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return warmup_start_factor + (1 - warmup_start_factor) * (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

        return factor

    if len(starts) == 1:  # one schedule over the whole fit
        whole = segment(total_steps, int(round(warmup_epochs * steps_per_epoch)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, whole)
    segments = [segment(e - s, int(round(share * (e - s)))) for s, e in zip(starts, ends)]

    def cyclic(step: int) -> float:
        k = bisect.bisect_right(starts, step) - 1
        return segments[k](step - starts[k])

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cyclic)
