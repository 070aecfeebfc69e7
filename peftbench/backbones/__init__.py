"""Backbones: timm models by name, with pre-trained weights from the hub, a local checkpoint, or the package.

Importing this package registers ``vit_micro`` (the embedded backbone) as a timm model.
"""

from peftbench.backbones import vit_micro  # noqa: F401 - registers timm's "vit_micro"
from peftbench.backbones.build import build_backbone

__all__ = ["build_backbone"]
