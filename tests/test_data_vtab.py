"""VTAB-1k folder format: exact decode, roles, errors, aliases, and the dataset configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from peftbench.data.vtab import GROUPS, VTAB_ALIASES, VTAB_TASKS, VTABTask, canonical_vtab_name
from peftbench.errors import DataError
from tests.datagen import make_vtab_folder, reference

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


@pytest.fixture()
def cifar(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "vtab-1k" / "cifar"
    return root, make_vtab_folder(root, num_classes=5)


def test_pixels_equal_pil_bicubic_resize(cifar):
    root, splits = cifar
    task = VTABTask("cifar", root, num_classes=5, num_workers=1)
    out = task.load_split("test", image_size=16)
    assert isinstance(out.images, torch.Tensor) and out.images.dtype == torch.uint8
    assert out.images.shape == (6, 3, 16, 16)
    for img, (rel, label), y in zip(out.images, splits["test"], out.labels, strict=True):
        assert torch.equal(img, reference(root / rel, 16))
        assert int(y) == label
    assert out.labels.dtype == torch.int64


def test_roles_and_no_augmentation(cifar):
    root, splits = cifar
    task = VTABTask("cifar", root, num_classes=5, cache=False)
    assert len(task.load_role("train", 8)) == 8 and len(task.load_role("val", 8)) == 4
    trainval = task.load_role("trainval", 8)
    assert trainval.labels.tolist() == [y for _, y in splits["train800val200"]]
    assert task.train_augment(8) is None
    assert task.group == "natural"


def test_missing_split_file_names_the_file(cifar):
    root, _ = cifar
    (root / "test.txt").unlink()
    with pytest.raises(DataError, match=r"test\.txt not found") as err:
        VTABTask("cifar", root, num_classes=5).load_split("test", 8)
    assert "\n" not in str(err.value) and "prepare_vtab.py" in str(err.value)


def test_out_of_range_label_names_file_line_and_value(cifar):
    root, _ = cifar
    lines = (root / "val200.txt").read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 7"
    (root / "val200.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"val200\.txt line 3: label 7 outside \[0, 5\)"):
        VTABTask("cifar", root, num_classes=5).load_split("val200", 8)


def test_malformed_line_and_missing_image(cifar):
    root, _ = cifar
    (root / "val200.txt").write_text("images/val200/000000.jpg\n")
    with pytest.raises(DataError, match=r"val200\.txt line 1"):
        VTABTask("cifar", root, num_classes=5).load_split("val200", 8)
    (root / "images/test/000003.jpg").unlink()
    with pytest.raises(DataError, match=r"000003\.jpg not found"):
        VTABTask("cifar", root, num_classes=5).load_split("test", 8)


def test_alias_folder_spelling_is_accepted(tmp_path):
    make_vtab_folder(tmp_path / "vtab-1k" / "cifar100", num_classes=5)
    task = VTABTask("cifar100", tmp_path / "vtab-1k" / "cifar", num_classes=5, cache=False)
    assert task.name == "cifar"
    assert len(task.load_split("train800", 8)) == 8


def test_task_table_matches_reference():
    assert len(VTAB_TASKS) == 19
    groups = [g for _, g in VTAB_TASKS.values()]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    assert VTAB_TASKS["sun397"] == (397, "natural") and VTAB_TASKS["smallnorb_azi"] == (18, "structured")
    assert canonical_vtab_name("oxford_pet") == "oxford_iiit_pet" and canonical_vtab_name("cifar100") == "cifar"
    assert set(VTAB_ALIASES.values()) <= set(VTAB_TASKS)
    with pytest.raises(DataError, match="unknown VTAB-1k task"):
        canonical_vtab_name("imagenet")


def _load(path: Path) -> dict:
    cfg = OmegaConf.create({"paths": {"data_dir": "/data"}, "seed": 3, "ds": OmegaConf.load(path)})
    return OmegaConf.to_container(cfg, resolve=True)["ds"]


TARGETS = {"vtab": "peftbench.data.vtab.VTABTask", "tfds": "peftbench.data.tfds_task.TFDSTask"}


@pytest.mark.parametrize("family,target", TARGETS.items())
def test_vtab_and_tfds_configs(family, target):
    """One registry: canonical files read class counts and groups from it, alias files are a defaults line to their
    canonical file (and compose identically), every table column key is a dataset option."""
    from peftbench.compose import compose_config
    from peftbench.data.vtab import VTAB_COLUMNS

    paths = {p.stem: p for p in (CONF / family).glob("*.yaml")}
    assert set(paths) == set(VTAB_TASKS) | set(VTAB_ALIASES)
    assert set(VTAB_COLUMNS.values()) <= set(paths)
    for alias, canonical in VTAB_ALIASES.items():
        assert OmegaConf.load(paths[alias]) == OmegaConf.create({"defaults": [f"{family}/{canonical}@_here_"]})
        twins = [compose_config([f"dataset={family}/{o}", "paths.data_dir=/data"]).dataset for o in (alias, canonical)]
        assert OmegaConf.to_container(twins[0], resolve=True) == OmegaConf.to_container(twins[1], resolve=True)
    for name in VTAB_TASKS:
        text = paths[name].read_text()
        assert f"${{vtab_classes:{name}}}" in text and f"${{vtab_group:{name}}}" in text  # nothing typed twice
    files = {o: OmegaConf.to_container(compose_config([f"dataset={family}/{o}", "paths.data_dir=/data"]).dataset,
                                       resolve=True) for o in paths}
    for option, cfg in files.items():
        name = canonical_vtab_name(option)
        assert cfg["_target_"] == target and cfg["name"] == name
        assert (cfg["num_classes"], cfg["group"]) == VTAB_TASKS[name]
        if family == "vtab":
            assert cfg["root"] == f"/data/vtab-1k/{name}"
        else:
            assert cfg["tfds_data_dir"] == "/data/tensorflow_datasets"
    assert {g for _, g in VTAB_TASKS.values()} == set(GROUPS)


def test_configs_instantiate_without_touching_disk():
    from hydra.utils import instantiate

    from peftbench.compose import compose_config

    task = instantiate(compose_config(["dataset=vtab/oxford_pet", "paths.data_dir=/data"]).dataset)
    assert isinstance(task, VTABTask) and task.name == "oxford_iiit_pet" and task.num_classes == 37
