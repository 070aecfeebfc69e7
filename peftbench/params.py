"""Print the parameter accounting of a configuration as JSON, without training.

``python -m peftbench.params method=lora backbone=vit_b16_in21k dataset=vtab/cifar100``

For methods that select without data, the backbone is built with random weights (counts do not depend on
them, and nothing is downloaded); methods that need a scorer get the configured weights and data.
"""

from __future__ import annotations

import json
import sys

import torch
from omegaconf import DictConfig, open_dict

from peftbench.accounting import backbone_size, parameter_report
from peftbench.compose import build_task, choices, compose_config, instantiate_group
from peftbench.data.datamodule import VisionDataModule
from peftbench.methods.base import prepare_model


def parameter_accounting(cfg: DictConfig) -> dict:
    """Build backbone + method from ``cfg``, apply the method, and return the accounting."""
    torch.manual_seed(cfg.seed)  # the fresh head (and so a scorer's gradients) as in a training run
    method = instantiate_group(cfg.method, "method")
    scorer = instantiate_group(cfg.scorer, "scorer") if cfg.get("scorer") else None
    needs_data = method.needs_scores or scorer is not None
    if not needs_data:
        with open_dict(cfg):
            cfg.backbone.pretrained = False
    task = build_task(cfg.dataset)
    model = instantiate_group(cfg.backbone, "backbone", num_classes=task.num_classes)
    pretrained = backbone_size(model)
    batches = None
    if needs_data:
        datamodule = VisionDataModule(task, protocol=cfg.protocol, seed=cfg.seed, **cfg.data)
        n = sys.maxsize if cfg.scoring.n_samples is None else cfg.scoring.n_samples  # null: every image
        batches = lambda: datamodule.scoring_batches(n, cfg.scoring.batch_size)  # noqa: E731
    state = prepare_model(model, method, scorer, batches)
    picked = choices(cfg)
    return {
        "method": picked.get("method", cfg.method.get("_target_")),
        "backbone": cfg.backbone.name,
        "dataset": picked.get("dataset", task.name),
        "num_classes": task.num_classes,
        "weights": "configured" if needs_data else "random (counts do not depend on them)",
        **parameter_report(model, pretrained),
        "selection": method.describe(state),
    }


def main(argv: list[str] | None = None) -> None:
    """Compose the config from ``argv`` overrides (no run directory is created) and print JSON."""
    print(json.dumps(parameter_accounting(compose_config(sys.argv[1:] if argv is None else argv)), indent=2))


if __name__ == "__main__":
    main()
