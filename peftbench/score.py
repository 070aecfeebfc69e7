"""Score a backbone and (optionally) select: ``python -m peftbench.score [overrides] out=<file.pt>``.

Composes ``conf/score.yaml``: the training config (so ``method=`` with the scorer it brings, ``scorer=``,
``backbone=``, ``dataset=``, ``scoring.n_samples=`` ... apply) plus ``out``; runs the scorer on the scoring batches
(the first ``scoring.n_samples`` training images in file order) and writes ``{"scores", "state", "summary",
"overrides"}`` to ``out`` with ``torch.save``: ``state`` is the configured method's selection when it needs scores
(else None). Load it with ``torch.load(out, weights_only=True)``. ``out=`` defaults to ``scores.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from peftbench.compose import build_parts, compose_config
from peftbench.console import quiet_third_party
from peftbench.data.datamodule import VisionDataModule
from peftbench.errors import PeftbenchError, user_error
from peftbench.scorers.base import Counted, check_scores


def score(overrides: list[str]) -> dict[str, Any]:
    """Compose ``conf/score.yaml`` with ``overrides``, build, score and select; return the record :func:`main` saves
    (to the config's ``out``)."""
    cfg = compose_config(overrides, config_name="score")
    if not cfg.get("scorer"):
        raise PeftbenchError("no scorer configured: pass scorer=<name> (see conf/scorer/), or a method that scores")
    parts = build_parts(cfg)
    datamodule = VisionDataModule(parts.task, protocol=cfg.protocol, seed=cfg.seed, **cfg.data)
    n = sys.maxsize if cfg.scoring.n_samples is None else cfg.scoring.n_samples  # null: every image
    seen = Counted(datamodule.scoring_batches(n, cfg.scoring.batch_size))
    scores = parts.scorer(parts.model, seen)
    check_scores(scores, seen, parts.scorer)
    state = parts.method.select(parts.model, scores) if parts.method.needs_scores else None
    summary = parts.method.describe(state) if state is not None else {}
    return {"scores": scores, "state": state, "summary": summary, "overrides": list(overrides), "out": cfg.out}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: the overrides compose ``conf/score.yaml`` (``out=`` is one of its keys)."""
    quiet_third_party()
    try:
        record = score(list(sys.argv[1:] if argv is None else argv))
    except Exception as err:  # one line for user errors, a traceback for bugs
        from hydra.errors import HydraException

        known = user_error(err) or (str(err).strip().splitlines()[0] if isinstance(err, HydraException) else None)
        if known is None:
            raise
        print(f"peftbench: error: {known}", file=sys.stderr)
        return 1
    out = Path(record.pop("out"))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, out)
    selection = f"; selection: {record['summary']}" if record["summary"] else ""
    print(f"wrote {len(record['scores'])} scores to {out}{selection}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
