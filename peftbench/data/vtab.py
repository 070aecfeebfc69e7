"""VTAB-1k in the folder format every PEFT repo uses (NOAH, SPT, FacT, ...).

``<root>/{train800,val200,train800val200,test}.txt``, each line ``images/<split>/<000123>.jpg <int label>`` with
paths relative to ``<root>``. Images are resized to ``image_size x image_size`` (bicubic, no crop) and never
augmented, as in the SPT/NOAH/FacT code.
"""

from __future__ import annotations

from pathlib import Path

from peftbench.data.base import SplitArrays, Task, check_relative
from peftbench.data.decode import ImageTransform, decode_files, file_sha256, resolve_cache_root
from peftbench.errors import ConfigError, DataError

NATURAL, SPECIALIZED, STRUCTURED = "natural", "specialized", "structured"
GROUPS = (NATURAL, SPECIALIZED, STRUCTURED)

# --- the VTAB-1k registry: every other listing of the 19 tasks derives from these three tables ------------------
# (conf/dataset/{vtab,tfds}/*.yaml read class counts and groups through the ``vtab_classes`` / ``vtab_group``
# resolvers, alias files are a defaults line to their canonical file, table columns and sweep task lists come from
# here; tests/test_data_vtab.py checks the configs against it.)

#: The 19 VTAB-1k tasks: folder name -> (num_classes, group), in the papers' table order.
VTAB_TASKS: dict[str, tuple[int, str]] = {
    "cifar": (100, NATURAL),
    "caltech101": (102, NATURAL),
    "dtd": (47, NATURAL),
    "oxford_flowers102": (102, NATURAL),
    "oxford_iiit_pet": (37, NATURAL),
    "svhn": (10, NATURAL),
    "sun397": (397, NATURAL),
    "patch_camelyon": (2, SPECIALIZED),
    "eurosat": (10, SPECIALIZED),
    "resisc45": (45, SPECIALIZED),
    "diabetic_retinopathy": (5, SPECIALIZED),
    "clevr_count": (8, STRUCTURED),
    "clevr_dist": (6, STRUCTURED),
    "dmlab": (6, STRUCTURED),
    "kitti": (4, STRUCTURED),
    "dsprites_loc": (16, STRUCTURED),
    "dsprites_ori": (16, STRUCTURED),
    "smallnorb_azi": (18, STRUCTURED),
    "smallnorb_ele": (9, STRUCTURED),
}

#: Other spellings found in public repos and configs -> the canonical name above.
VTAB_ALIASES: dict[str, str] = {
    "cifar100": "cifar",
    "caltech": "caltech101",
    "flowers102": "oxford_flowers102",
    "oxford_flowers": "oxford_flowers102",
    "oxford_pet": "oxford_iiit_pet",
    "pets": "oxford_iiit_pet",
    "svhn_cropped": "svhn",
    "camelyon": "patch_camelyon",
    "pcam": "patch_camelyon",
    "resisc": "resisc45",
    "retinopathy": "diabetic_retinopathy",
    "clevr_distance": "clevr_dist",
    "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
}

#: The column key of each task in the papers' tables and in conf/table specs (an alias or the folder name).
VTAB_COLUMNS: dict[str, str] = {
    "cifar": "cifar100",
    "caltech101": "caltech101",
    "dtd": "dtd",
    "oxford_flowers102": "flowers102",
    "oxford_iiit_pet": "pets",
    "svhn": "svhn",
    "sun397": "sun397",
    "patch_camelyon": "camelyon",
    "eurosat": "eurosat",
    "resisc45": "resisc45",
    "diabetic_retinopathy": "retinopathy",
    "clevr_count": "clevr_count",
    "clevr_dist": "clevr_distance",
    "dmlab": "dmlab",
    "kitti": "kitti",
    "dsprites_loc": "dsprites_location",
    "dsprites_ori": "dsprites_orientation",
    "smallnorb_azi": "smallnorb_azimuth",
    "smallnorb_ele": "smallnorb_elevation",
}

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


def vtab_groups() -> dict[str, list[str]]:
    """Group -> the column keys of its tasks, in table order (natural 7, specialized 4, structured 8)."""
    return {g: [VTAB_COLUMNS[t] for t, (_, group) in VTAB_TASKS.items() if group == g] for g in GROUPS}


SUITES = ("vtab", "tfds", "mini")


def suite_tasks(suite: str = "vtab") -> str:
    """The dataset options of a task suite as one Hydra sweep value (``${suite_tasks:${suite}}`` in conf/sweep):
    ``vtab`` / ``tfds`` the 19 VTAB-1k tasks (``vtab/cifar100,vtab/caltech101,...``), ``mini`` the embedded
    vtab-mini."""
    if suite == "mini":
        from peftbench.data.embedded import VTAB_MINI

        return ",".join(f"embedded/{t}" for t in VTAB_MINI)
    if suite not in SUITES:
        raise ConfigError(f"suite={suite!r}: choose one of {', '.join(SUITES)}")
    return ",".join(f"{suite}/{VTAB_COLUMNS[t]}" for t in VTAB_TASKS)


def vtab_classes(name: str) -> int:
    """Number of classes of VTAB task ``name`` (canonical or alias)."""
    return VTAB_TASKS[canonical_vtab_name(name)][0]


def vtab_group(name: str) -> str:
    """Group (natural / specialized / structured) of VTAB task ``name`` (canonical or alias)."""
    return VTAB_TASKS[canonical_vtab_name(name)][1]


def canonical_vtab_name(name: str) -> str:
    """The canonical VTAB-1k task name for ``name`` or one of its aliases; unknown names raise DataError."""
    name = VTAB_ALIASES.get(name, name)
    if name not in VTAB_TASKS:
        raise DataError(f"unknown VTAB-1k task {name!r}: use one of {', '.join(VTAB_TASKS)}")
    return name


def read_list_file(path: Path, num_classes: int, kind: str = "VTAB split file") -> tuple[list[str], list[int]]:
    """Parse ``<relative path> <int label>`` lines (the path may contain spaces); blank lines are skipped.

    A missing file, a malformed line or a label outside ``[0, num_classes)`` raises DataError naming the file and line.
    """
    if not path.is_file():
        raise DataError(f"{kind} {path} not found: prepare the data with scripts/prepare_vtab.py or fix paths.data_dir")
    rels, labels = [], []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{kind} {path} line {lineno}: not UTF-8 (byte {raw[err.start:err.start + 1]!r} at column "
                f"{err.start + 1}); save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        try:
            rel, label = parts[0], int(parts[1])
        except (IndexError, ValueError):
            raise DataError(f"{kind} {path} line {lineno}: expected '<image path> <int label>', got {line!r}") from None
        check_relative(rel, f"{kind} {path} line {lineno}")
        if not 0 <= label < num_classes:
            raise DataError(
                f"{kind} {path} line {lineno}: label {label} outside [0, {num_classes}): fix the file or num_classes"
            )
        rels.append(rel)
        labels.append(label)
    return rels, labels


def resolve_vtab_root(root: Path, name: str) -> Path:
    """``root``, or a sibling folder spelled with one of the task's aliases (``cifar100`` for ``cifar``)."""
    if root.is_dir():
        return root
    for alias, canonical in VTAB_ALIASES.items():
        if canonical == name and (root.parent / alias).is_dir():
            return root.parent / alias
    return root


class VTABTask(Task):
    """One VTAB-1k task stored as a folder of images and split files.

    Args:
        name: task name (a VTAB-1k name or alias, e.g. ``cifar`` or ``cifar100``; any other name is a task of one's
            own in the same folder format, with its ``num_classes`` and ``group`` given).
        root: the task folder (``<data_dir>/vtab-1k/<name>``; a sibling spelled with an alias is accepted).
        num_classes: number of classes; labels outside ``[0, num_classes)`` raise DataError.
        group: ``natural`` / ``specialized`` / ``structured`` (defaults to the table's group).
        cache_dir: root for decoded-split caches (default ``<root>/.peftbench_cache``).
        num_workers: decode threads (default min(4, CPU count)).
        cache: False disables the on-disk cache.
    """

    def __init__(
        self,
        name: str,
        root: str | Path,
        num_classes: int,
        group: str | None = None,
        cache_dir: str | Path | None = None,
        num_workers: int | None = None,
        cache: bool = True,
    ) -> None:
        if VTAB_ALIASES.get(name, name) in VTAB_TASKS:
            canonical = canonical_vtab_name(name)
            super().__init__(canonical, num_classes, group or VTAB_TASKS[canonical][1])
        else:  # a task of one's own in the same folder format (docs: add a dataset)
            super().__init__(name, num_classes, group)
        self.root = Path(root)
        self.cache_dir, self.num_workers, self.cache = cache_dir, num_workers, cache

    def transform(self, image_size: int) -> ImageTransform:
        """Resize to ``image_size x image_size``, bicubic, no crop (SPT/NOAH/FacT preprocessing)."""
        return ImageTransform(image_size, square=True, interpolation="bicubic")

    def load_split(self, split: str, image_size: int, for_training: bool = False) -> SplitArrays:
        """Decode ``<root>/<split>.txt`` (train800, val200, train800val200 or test); cached beside the split."""
        root = resolve_vtab_root(self.root, self.name)
        split_file = root / f"{split}.txt"
        rels, labels = read_list_file(split_file, self.num_classes)
        transform = self.transform(image_size)
        entry = None
        if self.cache:
            entry = resolve_cache_root(root, self.name, self.cache_dir) / f"{split}-{transform.tag}"
        key = f"vtab:{self.name}:{split}:{file_sha256(split_file)}"
        return decode_files([root / r for r in rels], labels, transform, entry, key, self.num_workers)

    def describe(self) -> dict:
        """Name, classes, group and folder."""
        return {**super().describe(), "family": "vtab-1k", "root": str(self.root)}
