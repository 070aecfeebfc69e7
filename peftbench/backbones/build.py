"""Build a timm backbone with pre-trained weights and a fresh classifier head.

Weights come from (in order): ``checkpoint=<file>`` (.npz as in the original ViT release, .safetensors,
.pth/.pt loaded with ``weights_only=True``), a packaged ``asset`` (older configs), a local file the timm model's
pretrained config names (``vit_micro``: the package's own weights), or the timm hub (``pretrained=true``, needs
internet on first use). A local file is read by :func:`peftbench.backbones.checkpoint.load_checkpoint` and the head
re-initialised, as for any checkpoint. ``pretrained=false`` gives the same architecture with random weights.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import timm
from timm.models import get_pretrained_cfg
from torch import nn

from peftbench.backbones import anatomy
from peftbench.backbones.checkpoint import load_checkpoint
from peftbench.errors import WeightsError, check_range

#: the timm factory entry that builds a custom ``arch``: its own defaults are ``VisionTransformer``'s, so
#: ``timm.create_model(CUSTOM_VIT, **arch)`` builds exactly ``VisionTransformer(**arch)``
CUSTOM_VIT = "vit_base_patch16_224"


def build_backbone(
    name: str,
    num_classes: int,
    timm_name: str | None = None,
    arch: dict[str, Any] | None = None,
    pretrained: bool = True,
    checkpoint: str | None = None,
    asset: str | None = None,
    checkpoint_format: str | None = None,
    image_size: int = 224,
    drop_path_rate: float = 0.0,
    **timm_kwargs: Any,
) -> nn.Module:
    """Create backbone ``name`` with a freshly initialised ``num_classes``-way head.

    Args:
        name: peftbench's name for the backbone (used in messages and results).
        num_classes: classes of the downstream task; the classifier head is re-initialised.
        timm_name: timm model name incl. pretrained tag (``vit_base_patch16_224.orig_in21k``, ``vit_micro``); or
            None with ``arch``.
        arch: keyword arguments of timm's ``VisionTransformer`` for a custom architecture (built through timm's
            factory as :data:`CUSTOM_VIT` with these arguments, so exports record them as timm's ``model_args``).
        pretrained: load pre-trained weights (from ``checkpoint``, ``asset``, the timm config's local file or the
            hub, in that order).
        checkpoint: path to a local weight file; overrides the hub.
        asset: file name of weights shipped inside ``peftbench/assets`` (configs before ``vit_micro`` was a timm
            model name).
        checkpoint_format: converter for foreign checkpoints (``mocov3``), None for timm-native keys.
        image_size: input resolution the model is built for.
        drop_path_rate: stochastic depth rate.
    """
    check_range("backbone.drop_path_rate", drop_path_rate, 0.0, 1.0, high_open=True)
    check_range("backbone.image_size", image_size, 1, integer=True)
    if timm_name is None and arch is None:
        raise WeightsError(f"backbone {name!r}: set either timm_name or arch in conf/backbone/{name}.yaml")
    path = weights_file(timm_name, checkpoint, asset) if pretrained else None  # None: the hub (or random weights)
    if pretrained and path is None and arch is not None:
        raise WeightsError(f"backbone {name!r}: a custom arch has no pre-trained weights on the hub; pass "
                           "backbone.checkpoint=<file> or backbone.pretrained=false")
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **timm_kwargs)
    if arch is not None:
        timm_name, kwargs = CUSTOM_VIT, {**dict(arch), **kwargs}
    else:
        if image_size is not None:
            kwargs["img_size"] = image_size
        if "convnext" in timm_name:
            kwargs.pop("img_size", None)
    if path is not None and checkpoint is None and not path.is_file():
        raise WeightsError(f"packaged weights {path} are missing; run `make pretrain` to rebuild them, or use "
                           "backbone.pretrained=false")
    use_hub = pretrained and path is None
    try:
        model = timm.create_model(timm_name, pretrained=use_hub, **kwargs)
    except Exception as err:  # hub offline, unknown tag, ...
        if use_hub:
            raise WeightsError(
                f"backbone {name!r}: could not get pre-trained weights for {timm_name!r} from the hub "
                f"({type(err).__name__}); offline, download them elsewhere and pass "
                f"backbone.checkpoint=<file>, or use backbone.pretrained=false"
            ) from err
        raise
    if path is not None:
        load_checkpoint(model, path, fmt=checkpoint_format, name=name)
        anatomy.reset_head(model, num_classes)
    anatomy.check_structure(model, name)
    return model


def weights_file(timm_name: str | None, checkpoint: str | None = None, asset: str | None = None) -> Path | None:
    """The local file pre-trained weights are read from (it may not exist): ``checkpoint``, a packaged ``asset``, or
    the file the timm model's pretrained config names (``vit_micro``: the package's own weights); None when timm
    would download them (or ``timm_name`` is None)."""
    if checkpoint is not None:
        return Path(os.path.expanduser(str(checkpoint)))
    if asset is not None:
        return Path(str(resources.files("peftbench") / "assets" / asset))
    if timm_name is None:
        return None
    try:
        cfg = get_pretrained_cfg(timm_name)
    except RuntimeError:  # an unknown tag: timm.create_model names it in its own error
        return None
    if cfg is None or not cfg.file or cfg.url or cfg.hf_hub_id:
        return None
    return Path(cfg.file)
