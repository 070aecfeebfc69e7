"""Print the parameter accounting of a configuration as JSON, without training and without the network.

``python -m peftbench.params method=lora backbone=vit_b16_in21k dataset=vtab/cifar100``

Weights: the configured local ones (a packaged asset such as vit_micro's, or ``backbone.checkpoint=<file>``);
otherwise random weights, since nothing is downloaded. Counts of methods that select without data do not depend on
them. Methods that score first (SPT, CDRA-SPT, GPS, Child-Tuning, HiFi) score the configured data when it is on
disk, otherwise synthetic batches: their counts then illustrate the allocation rather than reproduce a task's.
The JSON says which weights and data were used.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from omegaconf import DictConfig, open_dict

from peftbench.accounting import parameter_report
from peftbench.backbones.build import weights_file
from peftbench.compose import build_parts, choices, compose_config, instantiate_group
from peftbench.console import quiet_third_party
from peftbench.data.base import NORMALIZE
from peftbench.data.datamodule import VisionDataModule
from peftbench.errors import DataError, user_error
from peftbench.methods.base import prepare_model


def _local_weights(cfg: DictConfig) -> str | None:
    """The local weight file the backbone config names (``checkpoint``, or packaged weights such as vit_micro's) when
    it is there, else None."""
    bb = cfg.backbone
    path = weights_file(bb.get("timm_name"), bb.get("checkpoint"), bb.get("asset"))
    if path is None or not path.is_file():
        return None
    return str(bb.checkpoint) if bb.get("checkpoint") is not None else path.name


def _synthetic_batches(n: int, batch_size: int, size: int, num_classes: int, normalize: str, seed: int):
    """Seeded random images (B, 3, size, size), normalised as the data module would, with labels cycling."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZE[normalize])
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        images = torch.rand(b, 3, size, size, generator=gen)  # [0, 1] pixels
        yield (images - mean) / std, torch.arange(start, start + b) % num_classes


def parameter_accounting(cfg: DictConfig) -> dict:
    """Build backbone + method from ``cfg``, apply the method, and return the accounting."""
    needs_data = bool(cfg.get("scorer")) or instantiate_group(cfg.method, "method").needs_scores
    local = _local_weights(cfg)
    if not (needs_data and local):
        with open_dict(cfg):
            cfg.backbone.pretrained = False  # counts of data-free methods do not depend on weights; no download
    parts = build_parts(cfg)  # seeded as a training run: the same fresh head, so the same scores
    task, model, method, scorer = parts.task, parts.model, parts.method, parts.scorer
    batches, data = None, None
    if needs_data:
        n = 64 if cfg.scoring.n_samples is None else cfg.scoring.n_samples
        datamodule = VisionDataModule(task, protocol=cfg.protocol, seed=cfg.seed, **cfg.data)
        try:
            datamodule.split(datamodule.train_role)
            n = sys.maxsize if cfg.scoring.n_samples is None else n  # null: every image
            batches = lambda: datamodule.scoring_batches(n, cfg.scoring.batch_size)  # noqa: E731
            data = f"{task.name} ({datamodule.train_role} split on disk)"
        except DataError:
            size, classes = int(cfg.data.image_size), task.num_classes
            batches = lambda: _synthetic_batches(  # noqa: E731
                n, cfg.scoring.batch_size, size, classes, cfg.data.normalize, cfg.seed
            )
            data = f"synthetic: {n} random images (the dataset is not on disk)"
    state = prepare_model(model, method, scorer, batches)
    picked = choices(cfg)
    if not needs_data:
        weights = "random (counts do not depend on them)"
    else:
        weights = f"local: {local}" if local else "random (no local weights; nothing is downloaded)"
    return {
        "method": picked.get("method", cfg.method.get("_target_")),
        "backbone": cfg.backbone.name,
        "dataset": picked.get("dataset", task.name),
        "num_classes": task.num_classes,
        "weights": weights,
        **({"scoring_data": data} if data else {}),
        **parameter_report(model, parts.pretrained_backbone),
        "selection": method.describe(state),
    }


def main(argv: list[str] | None = None) -> int:
    """Compose the config from ``argv`` overrides (no run directory is created) and print JSON."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # never the network, whatever the backbone config says
    quiet_third_party()
    try:
        report = parameter_accounting(compose_config(sys.argv[1:] if argv is None else argv))
    except Exception as err:  # one line for what the user can fix, a traceback for a bug
        from hydra.errors import HydraException

        known = user_error(err) or (str(err).strip().splitlines()[0] if isinstance(err, HydraException) else None)
        if known is None:
            raise
        print(f"peftbench: error: {known}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
