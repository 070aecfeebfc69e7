"""Score a backbone and (optionally) select: ``python -m peftbench.score scorer=<name> [overrides] out=<file.pt>``.

Composes the same config as :mod:`peftbench.train` (so ``backbone=``, ``dataset=``, ``scoring.n_samples=``,
``method=`` ... apply), runs the scorer on the scoring batches (the first ``scoring.n_samples`` training images
in file order) and writes ``{"scores", "state", "summary", "overrides"}`` to ``out`` with ``torch.save``:
``state`` is the configured method's selection when it needs scores (else None). Load it with
``torch.load(out, weights_only=True)``. ``out=`` defaults to ``scores.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from peftbench.errors import PeftbenchError, user_error
from peftbench.scorers.base import Counted, check_scores
from peftbench.train import build, compose_config


def split_out(argv: list[str], default: str = "scores.pt") -> tuple[list[str], Path]:
    """Remove ``out=<file>`` (or ``+out=<file>``) from ``argv``; return (the other overrides, the file)."""
    out, rest = default, []
    for arg in argv:
        if arg.startswith(("out=", "+out=")):
            out = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, Path(out)


def score(overrides: list[str]) -> dict[str, Any]:
    """Compose, build, score and select; return the record :func:`main` saves."""
    cfg = compose_config(overrides)
    if not cfg.get("scorer"):
        raise PeftbenchError("no scorer configured: pass scorer=<name> (see conf/scorer/)")
    _, datamodule, module, _ = build(cfg)
    datamodule.setup("fit")
    n = sys.maxsize if cfg.scoring.n_samples is None else cfg.scoring.n_samples  # null: every image
    seen = Counted(datamodule.scoring_batches(n, cfg.scoring.batch_size))
    scores = module.scorer(module.model, seen)
    check_scores(scores, seen, module.scorer)
    state = module.method.select(module.model, scores) if getattr(module.method, "needs_scores", False) else None
    summary = module.method.describe(state) if state is not None else {}
    return {"scores": scores, "state": state, "summary": summary, "overrides": list(overrides)}


def main(argv: list[str] | None = None) -> int:
    overrides, out = split_out(list(sys.argv[1:] if argv is None else argv))
    try:
        record = score(overrides)
    except Exception as err:  # one line for user errors, a traceback for bugs
        if (known := user_error(err)) is not None:
            print(f"error: {known}", file=sys.stderr)
            return 2
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, out)
    selection = f"; selection: {record['summary']}" if record["summary"] else ""
    print(f"wrote {len(record['scores'])} scores to {out}{selection}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
