"""How much HiFi's head choice depends on information richness I_h: ``python scripts/hifi_teleport.py [key=value ...]``.

Scores the heads once (``scorer=hifi``: I_h and the correlation R per layer, on the configured scoring data; default:
the packaged pre-trained vit_micro on embedded/digits, the ``scoring:`` block of conf/train.yaml), then runs
PageRank three ways and compares the top-k heads of every layer (``method=hifi``'s k, ``layer_wise``):

* ``uniform``: Eq. 10 as written (teleport (1-d)/H; I_h only sets the start vector P(0));
* ``uniform_flat_start``: the same with P(0) uniform instead of I_h (differs only through early stopping);
* ``information``: I_h / sum(I_h) as the teleport vector (personalised PageRank).

Prints JSON: the number of layers, k, the number of (layer, head) choices, and for each variant the choices that
differ from ``uniform`` (a head chosen by one and not the other counts once). Extra arguments are train-config
overrides, e.g. ``scoring.n_samples=300``.
"""

from __future__ import annotations

import json
import sys

import torch

from peftbench.backbones import anatomy
from peftbench.compose import compose_config
from peftbench.methods.hifi import top_heads
from peftbench.scorers.hifi import pagerank
from peftbench.train import build


def measure(overrides: list[str]) -> dict:
    """Score once and count the head choices that change between the PageRank variants."""
    cfg = compose_config(["scorer=hifi", "method=hifi", "logger=none", *overrides])
    _, datamodule, module, _ = build(cfg)
    datamodule.setup("fit")
    n = cfg.scoring.n_samples
    batches = datamodule.scoring_batches(sys.maxsize if n is None else n, cfg.scoring.batch_size)
    scorer, method = module.scorer, module.method
    stats = scorer.statistics(module.model, batches)  # {block index: (I (H,), R (H, H))}
    views = {b.index: b for b in anatomy.blocks(module.model) if b.attn is not None}
    chosen: dict[str, dict[str, list[int]]] = {"uniform": {}, "uniform_flat_start": {}, "information": {}}
    for i, (info, corr) in stats.items():
        k = method.heads_for(views[i].num_heads)
        runs = {
            "uniform": pagerank(info, corr, scorer.d, scorer.eps, scorer.max_iter, "uniform"),
            "uniform_flat_start": pagerank(torch.ones_like(info), corr, scorer.d, scorer.eps, scorer.max_iter),
            "information": pagerank(info, corr, scorer.d, scorer.eps, scorer.max_iter, "information"),
        }
        for name, (p, _) in runs.items():
            chosen[name][views[i].path] = top_heads(p, k)
    base = chosen["uniform"]
    differ = {
        name: sum(len(set(heads[path]) - set(base[path])) for path in base)
        for name, heads in chosen.items()
        if name != "uniform"
    }
    return {
        "backbone": cfg.backbone.name,
        "n_samples": min(sys.maxsize if n is None else n, len(datamodule.split(datamodule.train_role))),
        "layers": len(base),
        "k": method.k,
        "choices": sum(len(h) for h in base.values()),
        "differ_from_uniform": differ,
        "heads": chosen,
    }


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(measure(list(sys.argv[1:] if argv is None else argv)), indent=2))


if __name__ == "__main__":
    main()
