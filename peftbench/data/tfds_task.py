"""VTAB-1k straight from TFDS array-record data (``tfds.data_source``; no TensorFlow needed at runtime).

The one table :data:`VTAB_TFDS` says, for each of the 19 tasks, which TFDS builder it reads, which slices form
train800 / val200 / test, and how the VTAB label is derived, as google-research/task_adaptation defines them
(``task_adaptation/data/*.py``): train800 = the first 800 of the task's train slice, val200 = the first 200 of its
validation slice, train800val200 = train800 followed by val200. A percentage boundary ``p%`` of a split of n
examples is ``n * p // 100``, as task_adaptation computes its counts. ``scripts/prepare_vtab.py`` writes the
VTAB-1k folder format from the same table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from peftbench.data.base import SplitArrays, Task
from peftbench.data.decode import ImageTransform, build_split, cache_key, load_cached, resolve_cache_root
from peftbench.data.vtab import VTAB_SPLITS, VTAB_TASKS, canonical_vtab_name
from peftbench.errors import DataError


# --------------------------------------------------------------------------------------------- slices
@dataclass(frozen=True)
class Slice:
    """Rows of one TFDS split: from ``sum(n * p // 100 for p in start_pct)`` on, at most ``limit`` of them."""

    split: str
    start_pct: tuple[int, ...] = ()
    limit: int | None = None

    def indices(self, n: int) -> range:
        """The rows of a split with ``n`` examples."""
        start = sum(n * p // 100 for p in self.start_pct)
        stop = n if self.limit is None else min(n, start + self.limit)
        return range(min(start, n), stop)


# --------------------------------------------------------------------------------------------- labels
def _bin(value: float, thresholds: Sequence[float]) -> int:
    """task_adaptation's ``reduce_max(where(thrs - value < 0))``: the last threshold strictly below ``value``."""
    return int(np.sum(np.asarray(thresholds, dtype=np.float64) < value)) - 1


@dataclass(frozen=True)
class PlainLabel:
    """The feature ``key`` as it is (``label``, ``label_azimuth``, ...)."""

    key: str = "label"

    def __call__(self, ex: dict) -> int:
        return int(ex[self.key])


@dataclass(frozen=True)
class BinnedLabel:
    """``floor(ex[key] / (num_original / num_classes))``: dSprites positions/orientations grouped into bins."""

    key: str
    num_original: int
    num_classes: int

    def __call__(self, ex: dict) -> int:
        return int(math.floor(float(ex[self.key]) / (self.num_original / self.num_classes)))


@dataclass(frozen=True)
class ClevrCount:
    """CLEVR count_all: number of objects minus 3 (scenes hold 3..10 objects -> 8 classes)."""

    def __call__(self, ex: dict) -> int:
        return len(ex["objects"]["size"]) - 3


@dataclass(frozen=True)
class ClevrClosestDistance:
    """CLEVR closest_object_distance: the smallest pixel-coordinate depth, binned at 0, 8, 8.5, 9, 9.5, 10, 100."""

    thresholds: tuple[float, ...] = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)

    def __call__(self, ex: dict) -> int:
        depth = np.asarray(ex["objects"]["pixel_coords"], dtype=np.float64).reshape(-1, 3)[:, 2]
        return _bin(float(depth.min()) if depth.size else math.inf, self.thresholds)


@dataclass(frozen=True)
class KittiClosestVehicle:
    """KITTI closest_vehicle_distance: depth z of the closest Car/Van/Truck (type < 3), binned at -100, 8, 20, 999.

    No vehicle counts as depth 1000 (class 3, "no vehicle").
    """

    thresholds: tuple[float, ...] = (-100.0, 8.0, 20.0, 999.0)

    def __call__(self, ex: dict) -> int:
        types = np.asarray(ex["objects"]["type"]).reshape(-1)
        depth = np.asarray(ex["objects"]["location"], dtype=np.float64).reshape(-1, 3)[:, 2]
        n = min(len(types), len(depth))  # equal in real data; TFDS mock data draws their lengths independently
        vehicles = depth[:n][types[:n] < 3]
        return _bin(float(np.min(vehicles, initial=1000.0)), self.thresholds)


# --------------------------------------------------------------------------------------------- the table
TRAIN800 = Slice("train", limit=800)
VAL200_OF_VALIDATION = Slice("validation", limit=200)
TEST = Slice("test")


def _val200_of_train(pct: int) -> Slice:
    return Slice("train", (pct,), 200)


@dataclass(frozen=True)
class VTABSource:
    """Where one VTAB task lives in TFDS and how its label is derived."""

    builder: str  # name[/config]:version as task_adaptation pins it
    label: Callable[[dict], int]
    val200: Slice
    test: Slice = TEST
    train800: Slice = TRAIN800
    binary_image: bool = False  # dSprites stores {0, 1} masks: scaled by 255 as task_adaptation does
    image_key: str = field(default="image")

    def slices(self, split: str) -> list[Slice]:
        """The TFDS slices that make VTAB split ``split`` (train800val200 = train800 + val200)."""
        table = {"train800": [self.train800], "val200": [self.val200], "test": [self.test]}
        table["train800val200"] = [self.train800, self.val200]
        if split not in table:
            raise DataError(f"unknown VTAB split {split!r}: use one of {', '.join(VTAB_SPLITS)}")
        return table[split]


_CLEVR, _DSPRITES, _NORB = "clevr:3.*.*", "dsprites:2.*.*", "smallnorb:2.*.*"
_DSPRITES_TEST = Slice("train", (80, 10))  # dSprites has only a train split: 80% train, 10% val, 10% test

#: VTAB task -> its TFDS source: task_adaptation's builder versions where the installed TFDS still builds them
#: (kitti 3.1.0 as task_adaptation pins it); oxford_iiit_pet 3.x is gone from TFDS, 4.0.0 has the same 37 breeds
#: and splits. tests/test_data_tfds.py checks that every entry constructs with the installed TFDS.
VTAB_TFDS: dict[str, VTABSource] = {
    "cifar": VTABSource("cifar100:3.*.*", PlainLabel(), _val200_of_train(90)),
    "caltech101": VTABSource("caltech101:3.*.*", PlainLabel(), _val200_of_train(90)),
    "dtd": VTABSource("dtd:3.*.*", PlainLabel(), VAL200_OF_VALIDATION),
    "oxford_flowers102": VTABSource("oxford_flowers102:2.*.*", PlainLabel(), VAL200_OF_VALIDATION),
    "oxford_iiit_pet": VTABSource("oxford_iiit_pet:4.*.*", PlainLabel(), _val200_of_train(80)),
    "svhn": VTABSource("svhn_cropped:3.*.*", PlainLabel(), _val200_of_train(90)),
    "sun397": VTABSource("sun397/tfds:4.*.*", PlainLabel(), VAL200_OF_VALIDATION),
    "patch_camelyon": VTABSource("patch_camelyon:2.*.*", PlainLabel(), VAL200_OF_VALIDATION),
    "eurosat": VTABSource("eurosat/rgb:2.*.*", PlainLabel(), _val200_of_train(60), Slice("train", (60, 20))),
    "resisc45": VTABSource("resisc45:3.*.*", PlainLabel(), _val200_of_train(60), Slice("train", (60, 20))),
    "diabetic_retinopathy": VTABSource(
        "diabetic_retinopathy_detection/btgraham-300:3.*.*", PlainLabel(), VAL200_OF_VALIDATION
    ),
    "clevr_count": VTABSource(_CLEVR, ClevrCount(), _val200_of_train(90), Slice("validation")),
    "clevr_dist": VTABSource(_CLEVR, ClevrClosestDistance(), _val200_of_train(90), Slice("validation")),
    "dmlab": VTABSource("dmlab:2.0.1", PlainLabel(), VAL200_OF_VALIDATION),
    "kitti": VTABSource("kitti:3.1.0", KittiClosestVehicle(), VAL200_OF_VALIDATION),
    "dsprites_loc": VTABSource(
        _DSPRITES, BinnedLabel("label_x_position", 32, 16), _val200_of_train(80), _DSPRITES_TEST, binary_image=True
    ),
    "dsprites_ori": VTABSource(
        _DSPRITES, BinnedLabel("label_orientation", 40, 16), _val200_of_train(80), _DSPRITES_TEST, binary_image=True
    ),
    "smallnorb_azi": VTABSource(_NORB, PlainLabel("label_azimuth"), Slice("test", limit=200), Slice("test", (50,))),
    "smallnorb_ele": VTABSource(_NORB, PlainLabel("label_elevation"), Slice("test", limit=200), Slice("test", (50,))),
}


# --------------------------------------------------------------------------------------------- reading
def open_data_source(builder: str, split: str, data_dir: str | Path | None) -> Sequence[dict]:
    """``tfds.data_source(builder, split)`` without downloading; a missing or non-array-record dataset -> DataError."""
    import tensorflow_datasets as tfds

    try:
        data_dir = None if data_dir is None else str(data_dir)
        return tfds.data_source(builder, split=split, data_dir=data_dir, download=False)
    except Exception as err:
        where = data_dir or "the default TFDS data_dir"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"TFDS dataset {builder} split {split} not readable in {where} ({reason}): prepare it in array_record "
            "format, e.g. scripts/prepare_vtab.py --data-dir DIR (needs internet)"
        ) from None


def to_rgb(image: np.ndarray, binary: bool = False) -> np.ndarray:
    """A TFDS image (H, W, 1 or 3) uint8 -> (H, W, 3) uint8; ``binary`` maps the {0, 1} masks to {0, 255}."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if binary:
        image = np.where(image > 0, 255, 0).astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image.astype(np.uint8, copy=False))


class VTABReader:
    """Reads one VTAB task's examples from TFDS: ``rows(split)`` then ``example(row)`` -> (RGB image, VTAB label)."""

    def __init__(self, task: str, data_dir: str | Path | None = None, builder: str | None = None) -> None:
        self.task = canonical_vtab_name(task)
        self.source = VTAB_TFDS[self.task]
        self.builder = builder or self.source.builder
        self.data_dir = data_dir
        self.num_classes = VTAB_TASKS[self.task][0]
        self._sources: dict[str, Sequence[dict]] = {}

    def data(self, tfds_split: str) -> Sequence[dict]:
        """The (cached) data source of one TFDS split."""
        if tfds_split not in self._sources:
            self._sources[tfds_split] = open_data_source(self.builder, tfds_split, self.data_dir)
        return self._sources[tfds_split]

    def rows(self, split: str) -> list[tuple[str, int]]:
        """``(tfds split, index)`` of every example of VTAB split ``split``, in task_adaptation's order."""
        return [(s.split, i) for s in self.source.slices(split) for i in s.indices(len(self.data(s.split)))]

    def example(self, row: tuple[str, int]) -> tuple[np.ndarray, int]:
        """The (H, W, 3) uint8 image and the VTAB label of one row; an out-of-range label raises DataError."""
        split, i = row
        ex = self.data(split)[i]
        label = self.source.label(ex)
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"TFDS {self.builder} {split}[{i}]: derived {self.task} label {label} outside [0, {self.num_classes})"
            )
        return to_rgb(ex[self.source.image_key], self.source.binary_image), label

    def examples(self, split: str) -> Iterator[tuple[np.ndarray, int]]:
        """Every (image, label) of VTAB split ``split``."""
        for row in self.rows(split):
            yield self.example(row)

    def fingerprint(self) -> tuple[Path, str] | None:
        """(TFDS data_dir root, names/sizes/mtimes of the prepared array-record files), or None (no files: mocks)."""
        import tensorflow_datasets as tfds

        builder = tfds.builder(self.builder, data_dir=None if self.data_dir is None else str(self.data_dir))
        folder = Path(builder.data_dir)
        files = sorted(folder.glob("*.array_record*")) if folder.is_dir() else []
        if not files:
            return None
        stats = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return Path(builder.data_dir_root), stats


# --------------------------------------------------------------------------------------------- the task
class TFDSTask(Task):
    """A VTAB-1k task read from TFDS array-record data (splits and labels as task_adaptation defines them).

    Args:
        name: VTAB task name (canonical or alias).
        num_classes: number of classes (must match the table; default: the table's).
        group: natural / specialized / structured (default: the table's).
        tfds_data_dir: TFDS data_dir (default: TFDS's own default, ``~/tensorflow_datasets``).
        builder: override the TFDS ``name[/config]:version`` of the table.
        cache_dir / num_workers / cache: as :class:`peftbench.data.vtab.VTABTask`; decoded splits are cached under
            ``<tfds_data_dir>/.peftbench_cache`` when prepared array-record files exist.
    """

    def __init__(
        self,
        name: str,
        num_classes: int | None = None,
        group: str | None = None,
        tfds_data_dir: str | Path | None = None,
        builder: str | None = None,
        cache_dir: str | Path | None = None,
        num_workers: int | None = None,
        cache: bool = True,
    ) -> None:
        canonical = canonical_vtab_name(name)
        table_classes, table_group = VTAB_TASKS[canonical]
        if num_classes is not None and int(num_classes) != table_classes:
            raise DataError(f"TFDS task {canonical}: num_classes={num_classes} but VTAB defines {table_classes}")
        super().__init__(canonical, table_classes, group or table_group)
        self.tfds_data_dir, self.builder = tfds_data_dir, builder
        self.cache_dir, self.num_workers, self.cache = cache_dir, num_workers, cache
        self._reader: VTABReader | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}  # open data sources stay in their process

    @property
    def reader(self) -> VTABReader:
        """The TFDS reader (opened on first use)."""
        if self._reader is None:
            self._reader = VTABReader(self.name, self.tfds_data_dir, self.builder)
        return self._reader

    def transform(self, image_size: int) -> ImageTransform:
        """Resize to ``image_size x image_size``, bicubic, no crop (as the VTAB folder format)."""
        return ImageTransform(image_size, square=True, interpolation="bicubic")

    def load_split(self, split: str, image_size: int, for_training: bool = False) -> SplitArrays:
        """Decode VTAB split ``split`` (train800, val200, train800val200, test) from TFDS."""
        reader, transform = self.reader, self.transform(image_size)
        rows = reader.rows(split)
        entry, key = None, ""
        fingerprint = reader.fingerprint() if self.cache else None
        if fingerprint is not None:
            data_root, files = fingerprint
            entry = resolve_cache_root(data_root, self.name, self.cache_dir) / f"{self.name}-{split}-{transform.tag}"
            key = cache_key("tfds", reader.builder, self.name, split, len(rows), files, transform.tag)
            cached = load_cached(entry, key)
            if cached is not None:
                return cached

        def decode(row: tuple[str, int]) -> tuple[np.ndarray, int]:
            image, label = reader.example(row)
            return transform.apply(Image.fromarray(image)), label

        return build_split(rows, None, decode, entry, key, transform.fixed_size, self.num_workers)

    def describe(self) -> dict:
        """Name, classes, group and TFDS builder."""
        return {**super().describe(), "family": "vtab-1k-tfds", "builder": self.builder or VTAB_TFDS[self.name].builder}
