"""FGVC (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) in VPT's json format.

``<root>/{train,val,test}.json`` each map ``relative_image_path -> class_id``. Class ids are remapped to a contiguous
range in sorted order over the union of the three files (VPT remaps per file, which silently misaligns labels
when a split lacks a class; the union is the same whenever every split has every class).
Preprocessing follows VPT's ``get_transforms``: train = Resize(r) (shorter side, bilinear) + RandomCrop(size) +
horizontal flip; eval = Resize(r) + CenterCrop(size), with r = int(256 / 224 * size) (VPT's 256/512/438 for
224/448/384). Only the resize is decoded once; the random crop and flip run per sample on uint8 tensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torchvision.transforms import v2

from peftbench.data.base import SplitArrays, Task, check_relative
from peftbench.data.decode import ImageTransform, decode_files, file_sha256, resolve_cache_root
from peftbench.errors import DataError

#: Config name -> (folder under ``<data_dir>/fgvc``, num_classes), folder names as VPT's data release.
FGVC_TASKS: dict[str, tuple[str, int]] = {
    "cub": ("CUB_200_2011", 200),
    "nabirds": ("nabirds", 555),
    "flowers": ("OxfordFlowers", 102),
    "dogs": ("StanfordDogs", 120),
    "cars": ("StanfordCars", 196),
}

FGVC_FILES = ("train", "val", "test")
IMAGE_SUBDIRS = ("", "images", "Images")  # VPT: Cars/Flowers at the root, CUB/NABirds in images/, Dogs in Images/


def resize_side(image_size: int) -> int:
    """The pre-crop resize for ``image_size``: int(256/224 * size) (256 for 224, 512 for 448, 438 for 384)."""
    return int(256 / 224 * image_size)


class FGVCTask(Task):
    """One FGVC dataset in VPT's json format.

    Args:
        name: dataset name (``cub``, ``nabirds``, ``flowers``, ``dogs``, ``cars`` or any other).
        root: folder holding ``train.json``, ``val.json``, ``test.json`` and the images.
        num_classes: expected number of classes (checked against the json files).
        group: result group (``fgvc``).
        cache_dir / num_workers / cache: as :class:`peftbench.data.vtab.VTABTask`.
    """

    split_names: ClassVar[dict[str, str]] = {"train": "train", "val": "val", "trainval": "trainval", "test": "test"}

    def __init__(
        self,
        name: str,
        root: str | Path,
        num_classes: int,
        group: str | None = "fgvc",
        cache_dir: str | Path | None = None,
        num_workers: int | None = None,
        cache: bool = True,
    ) -> None:
        super().__init__(name, num_classes, group)
        self.root = Path(root)
        self.cache_dir, self.num_workers, self.cache = cache_dir, num_workers, cache
        self._annotations: dict[str, dict[str, object]] | None = None
        self._class_ids: list | None = None

    # ------------------------------------------------------------------------------------------- annotations
    def _read(self) -> dict[str, dict[str, object]]:
        if self._annotations is None:
            annotations = {}
            for split in FGVC_FILES:
                path = self.root / f"{split}.json"
                if not path.is_file():
                    raise DataError(
                        f"FGVC split file {path} not found: download VPT's FGVC splits or fix paths.data_dir"
                    )
                try:
                    data = json.loads(path.read_bytes().decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise DataError(f"FGVC split file {path} is not valid UTF-8 json ({err})") from None
                if not isinstance(data, dict):
                    raise DataError(f"FGVC split file {path}: expected an object {{image path: class id}}")
                for rel, cid in data.items():
                    check_relative(rel, f"FGVC split file {path}")
                    if isinstance(cid, bool) or not isinstance(cid, int):
                        raise DataError(
                            f"FGVC split file {path}: class id of {rel!r} is {cid!r}; class ids are integers"
                        )
                annotations[split] = data
            ids = {v for data in annotations.values() for v in data.values()}
            try:
                class_ids = sorted(ids)
            except TypeError:
                raise DataError(f"FGVC class ids in {self.root}/*.json mix types: use integers") from None
            if len(class_ids) != self.num_classes:
                raise DataError(
                    f"FGVC folder {self.root}: the json files hold {len(class_ids)} classes, "
                    f"num_classes is {self.num_classes}: fix num_classes or the files"
                )
            self._annotations, self._class_ids = annotations, class_ids
        return self._annotations

    @property
    def class_ids(self) -> list:
        """Original class ids in sorted order; ``class_ids[i]`` is contiguous label ``i``."""
        self._read()
        assert self._class_ids is not None
        return self._class_ids

    @property
    def id_to_label(self) -> dict:
        """Original class id -> contiguous label."""
        return {c: i for i, c in enumerate(self.class_ids)}

    def _image_dir(self, first: str) -> Path:
        for sub in IMAGE_SUBDIRS:
            if (self.root / sub / first).is_file():
                return self.root / sub
        tried = ", ".join(str(self.root / sub / first) for sub in IMAGE_SUBDIRS)
        raise DataError(f"FGVC image not found (tried {tried}): check the image folder under {self.root}")

    # ------------------------------------------------------------------------------------------- splits
    def transform(self, image_size: int, for_training: bool) -> ImageTransform:
        """Train: shorter side to int(256/224*size) (ragged); eval: the same + CenterCrop(size). Bilinear (VPT)."""
        crop = None if for_training else image_size
        return ImageTransform(resize_side(image_size), square=False, crop=crop, interpolation="bilinear")

    def load_split(self, split: str, image_size: int, for_training: bool = False) -> SplitArrays:
        """Decode ``train``, ``val``, ``test`` or ``trainval`` (= train followed by val)."""
        if split == "trainval":
            parts = [self.load_split(s, image_size, for_training) for s in ("train", "val")]
            return _concat(parts)
        if split not in FGVC_FILES:
            raise DataError(f"FGVC task {self.name}: unknown split {split!r} (use train, val, trainval or test)")
        data = self._read()[split]
        id_to_label = self.id_to_label
        rels = list(data)
        labels = [id_to_label[data[r]] for r in rels]
        image_dir = self._image_dir(rels[0]) if rels else self.root
        transform = self.transform(image_size, for_training)
        entry = None
        if self.cache:
            entry = resolve_cache_root(self.root, self.name, self.cache_dir) / f"{split}-{transform.tag}"
        digest = "".join(file_sha256(self.root / f"{s}.json") for s in FGVC_FILES)  # the remap depends on all three
        key = f"fgvc:{self.name}:{split}:{digest}"
        return decode_files([image_dir / r for r in rels], labels, transform, entry, key, self.num_workers)

    def train_augment(self, image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """RandomCrop(size) + RandomHorizontalFlip(0.5) on a uint8 (3, H, W) tensor (shorter side >= size)."""
        return v2.Compose([v2.RandomCrop(image_size), v2.RandomHorizontalFlip(0.5)])

    def describe(self) -> dict:
        """Name, classes, group, folder and the class-id remap."""
        info = {**super().describe(), "family": "fgvc", "root": str(self.root)}
        if self._class_ids is not None:
            info["class_ids"] = list(self._class_ids)
        return info


def _concat(parts: list[SplitArrays]) -> SplitArrays:
    """Concatenate splits: ragged lists are joined (no copy), same-size tensors are stacked."""
    labels = torch.cat([p.labels for p in parts])
    if all(isinstance(p.images, torch.Tensor) for p in parts):
        return SplitArrays(torch.cat([p.images for p in parts]), labels)  # type: ignore[misc]
    images: list[torch.Tensor] = []
    for p in parts:
        images.extend(p.images)  # a (N, 3, H, W) tensor iterates as N (3, H, W) views
    return SplitArrays(images, labels)
