"""``vit_micro``: peftbench's embedded backbone, a timm model once ``peftbench`` is imported.

    import peftbench, timm
    model = timm.create_model("vit_micro", pretrained=True)  # the packaged weights, offline (no head: features)
    model = timm.create_model("vit_micro", pretrained=True, num_classes=10)  # + a fresh 10-way head

A 6-block, width-192, 12-head ViT at 32x32 input (patch 8), pre-trained by ``python -m peftbench.pretrain`` on
synthetic IFS fractals; the weights ship in ``peftbench/assets/vit_micro.safetensors`` (float16, no head; recipe and
SHA-256 in ``vit_micro.json``). :data:`ARGS` is the one place the architecture is written down: the backbone
config (``conf/backbone/vit_micro.yaml``), pre-training and every export read it from this registration.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

NAME = "vit_micro"
#: the tag of the packaged pre-trained weights (``vit_micro.fractal``, the default tag of ``vit_micro``)
TAG = "fractal"
#: file name of the packaged weights in ``peftbench/assets``
ASSET = "vit_micro.safetensors"
#: the architecture: timm ``VisionTransformer`` keyword arguments (without ``num_classes``)
ARGS: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=12, mlp_ratio=4.0)


def asset_path() -> str:
    """Path of the packaged weights (the file may be absent in a checkout that has not run pre-training)."""
    return str(resources.files("peftbench") / "assets" / ASSET)


default_cfgs = generate_default_cfgs({
    f"{NAME}.{TAG}": {
        "file": asset_path(),  # local file: timm never goes to the network for it
        "num_classes": 0,  # the packaged weights hold no classifier
        "input_size": (3, ARGS["img_size"], ARGS["img_size"]),
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "mean": IMAGENET_DEFAULT_MEAN,  # pre-training normalised with ImageNet statistics
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    },
})


@register_model
def vit_micro(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Micro/8 at 32x32 (6 blocks, width 192, 12 heads); keyword arguments override :data:`ARGS`."""
    return build_model_with_cfg(
        VisionTransformer, NAME, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(ARGS, **kwargs)
    )
