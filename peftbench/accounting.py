"""Parameter accounting shared by training, ``peftbench.params`` and results.json."""

from __future__ import annotations

from torch import nn

from peftbench.backbones import anatomy


def backbone_size(model: nn.Module) -> int:
    """Parameters of the pre-trained backbone without its classifier head (call before a method is applied)."""
    head_ids = {id(p) for p in anatomy.head(model).parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in head_ids)


def parameter_report(model: nn.Module, pretrained_backbone: int) -> dict[str, float | int]:
    """Trainable parameters in the backbone and the head, totals, and the tuned fraction (SPT's "Tuned / Total").

    ``tuned_percent`` = 100 * trainable_backbone / pretrained_backbone; the head is not counted, as in the papers.
    """
    head_ids = {id(p) for p in anatomy.head(model).parameters()}
    trainable_backbone = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head_ids)
    return {
        "trainable_backbone": trainable_backbone,
        "trainable_head": sum(p.numel() for p in anatomy.head(model).parameters() if p.requires_grad),
        "pretrained_backbone": pretrained_backbone,
        "total": sum(p.numel() for p in model.parameters()),
        "tuned_percent": round(100.0 * trainable_backbone / max(1, pretrained_backbone), 4),
    }


def paper_fraction(params: dict) -> tuple[float | None, float | None]:
    """(Tuned / Total in %, trainable parameters in M) as the papers' tables count them: backbone AND head.

    The papers' LINEAR row (0.04% on VTAB-1k: the head alone) shows the head is included; ``tuned_percent`` in
    results.json is the backbone-only fraction. ``params`` is a results.json ``params`` block.
    """
    if params.get("trainable_backbone") is None or not params.get("pretrained_backbone"):
        return params.get("tuned_percent"), None
    trainable = params["trainable_backbone"] + params.get("trainable_head", 0)
    return 100.0 * trainable / params["pretrained_backbone"], trainable / 1e6
