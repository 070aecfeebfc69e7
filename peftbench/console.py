"""What peftbench prints: its own progress lines, and silence for third-party notices a user cannot act on."""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: third-party notices that say nothing about the run (advertising, version deprecations inside libraries)
_DROPPED = (
    "💡 Tip:",  # Lightning advertising litlogger / litmodels
    "`weights_only` was not set",  # Lightning, on every checkpoint it writes
    "The anonymous setting has no effect",  # W&B, about an argument Lightning passes
    "Loading `train_dataloader` to estimate",  # Lightning, before every fit
)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(prefix) or prefix in message[:80] for prefix in _DROPPED)


def quiet_third_party() -> None:
    """Drop third-party notices a user cannot act on (idempotent); real warnings and errors still show."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch", "lightning.fabric", "wandb"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):  # handlers too: records of child loggers reach them, not filters
            if not any(isinstance(f, _DropNotices) for f in target.filters):
                target.addFilter(_DropNotices())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r"The anonymous setting has no effect.*")


def rank_zero() -> bool:
    """Whether this process is global rank 0 (DDP children see LOCAL_RANK / NODE_RANK > 0)."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def say(message: str) -> None:
    """One progress line from peftbench on stderr (rank 0 only)."""
    if rank_zero():
        print(f"peftbench: {message}", file=sys.stderr, flush=True)
