"""The task interface every dataset family implements (VTAB-1k folders, FGVC json, few-shot, TFDS, embedded).

A :class:`Task` turns a split name into a :class:`SplitArrays`: images decoded ONCE to uint8 ``(3, H, W)``
tensors at their final (eval) or pre-crop (train-augmented) size, plus int64 labels. Random augmentation, if
any, runs per sample on those uint8 tensors (:meth:`Task.train_augment`); normalisation to float happens on
the device, in the data module. Nothing re-decodes a JPEG after the first epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import ClassVar

import torch

from peftbench.errors import DataError


def check_relative(relative: str, where: str) -> str:
    """An image path from a split file, which must stay inside the dataset folder: an absolute path or one with a
    ``..`` part raises one DataError line naming ``where`` (the split file and line). Returns ``relative``."""
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    absolute = PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute()
    if not relative or absolute or ".." in parts:
        raise DataError(f"{where}: image path {relative!r} leaves the dataset folder; give a path inside it")
    return relative


#: data.normalize -> (mean, std) per channel, on [0, 1] pixels; images are normalised on the device
NORMALIZE = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

#: Roles a protocol asks for -> default split names (VTAB-1k naming). Tasks override ``split_names``.
ROLES = ("train", "val", "trainval", "test")


@dataclass
class SplitArrays:
    """A decoded split.

    ``images`` is either a uint8 tensor (N, 3, H, W) (all the same size) or a list of N uint8 tensors
    (3, H_i, W_i) (ragged, e.g. FGVC's aspect-preserving Resize(256) before RandomCrop(224)).
    """

    images: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> SplitArrays:
        """The rows ``index`` of this split (used by few-shot sampling)."""
        if isinstance(self.images, torch.Tensor):
            images = self.images[index]
        else:
            images = [self.images[int(i)] for i in index]
        return SplitArrays(images, self.labels[index])


class Task:
    """A classification task with named splits.

    Subclasses set ``name``, ``num_classes``, ``group`` and implement :meth:`load_split`.
    """

    split_names: ClassVar[dict[str, str]] = {
        "train": "train800",
        "val": "val200",
        "trainval": "train800val200",
        "test": "test",
    }

    def __init__(self, name: str, num_classes: int, group: str | None = None) -> None:
        self.name, self.num_classes, self.group = name, int(num_classes), group

    def load_split(self, split: str, image_size: int, for_training: bool = False) -> SplitArrays:
        """Decode split ``split`` to uint8 arrays for a model with input ``image_size`` (cached where supported).

        ``for_training`` selects the pre-augmentation decode (e.g. FGVC: Resize(256/224*size), ragged) instead
        of the evaluation decode (e.g. FGVC: Resize + CenterCrop; VTAB: the same either way).
        """
        raise NotImplementedError

    def load_role(self, role: str, image_size: int) -> SplitArrays:
        """The split that plays ``role`` (train / val / trainval / test) for this task."""
        return self.load_split(self.split_names[role], image_size, for_training=role in ("train", "trainval"))

    def train_augment(self, image_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Per-sample random augmentation on a uint8 (3, H, W) tensor for training, or None (VTAB: none)."""
        return None

    def describe(self) -> dict:
        """What results.json records about the task."""
        return {"name": self.name, "num_classes": self.num_classes, "group": self.group}
