"""FGVC in VPT's json format: id remap, VPT's resize / crop, trainval concatenation, image folders, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf
from PIL import Image

from peftbench.data.fgvc import FGVC_TASKS, FGVCTask, resize_side
from peftbench.errors import DataError
from tests.datagen import make_fgvc_folder

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "fgvc"
IDS = {"train": [10, 3, 42, 10, 3], "val": [3, 42], "test": [7, 10, 42]}  # 7 only in test


@pytest.fixture()
def cub(tmp_path: Path) -> tuple[FGVCTask, dict]:
    anno = make_fgvc_folder(tmp_path / "CUB_200_2011", IDS)
    return FGVCTask("cub", tmp_path / "CUB_200_2011", num_classes=4, num_workers=1), anno


def _pil_reference(path: Path, size: int, crop: bool) -> torch.Tensor:
    """torchvision's Resize(int(256/224*size)) [+ CenterCrop(size)] on the PIL image, as VPT does."""
    img = TF.resize(Image.open(path).convert("RGB"), resize_side(size), interpolation=TF.InterpolationMode.BILINEAR)
    if crop:
        img = TF.center_crop(img, size)
    return TF.pil_to_tensor(img)


def test_id_remap_is_contiguous_sorted_union(cub):
    task, _ = cub
    assert task.class_ids == [3, 7, 10, 42] and task.id_to_label == {3: 0, 7: 1, 10: 2, 42: 3}
    assert task.load_split("train", 16).labels.tolist() == [2, 0, 3, 2, 0]
    assert task.load_split("test", 16).labels.tolist() == [1, 2, 3]
    assert task.describe()["class_ids"] == [3, 7, 10, 42]


def test_train_decode_is_ragged_resize_and_eval_is_center_crop(cub):
    task, anno = cub
    train = task.load_split("train", 28, for_training=True)
    assert isinstance(train.images, list)
    for img, rel in zip(train.images, anno["train"], strict=True):
        ref = _pil_reference(task.root / "images" / rel, 28, crop=False)
        assert min(img.shape[1:]) == resize_side(28) == 32 and torch.equal(img, ref)
    test = task.load_split("test", 28)
    assert test.images.shape == (3, 3, 28, 28)
    for img, rel in zip(test.images, anno["test"], strict=True):
        assert torch.equal(img, _pil_reference(task.root / "images" / rel, 28, crop=True))


def test_train_augment_crops_and_flips(cub):
    task, _ = cub
    img = task.load_split("train", 28, for_training=True).images[4]  # (3, 32, W)
    aug = task.train_augment(28)
    torch.manual_seed(0)
    outs = [aug(img) for _ in range(20)]
    assert all(o.shape == (3, 28, 28) and o.dtype == torch.uint8 for o in outs)
    windows = {
        (flip, t, left)
        for o in outs
        for flip in (False, True)
        for t in range(img.shape[1] - 27)
        for left in range(img.shape[2] - 27)
        if torch.equal(o.flip(-1) if flip else o, img[:, t : t + 28, left : left + 28])
    }
    assert windows, "an augmented image is not a (flipped) crop of the decoded image"
    assert len({o.sum().item() for o in outs}) > 1  # random


def test_trainval_is_train_then_val(cub):
    task, _ = cub
    tv = task.load_role("trainval", 16)
    assert isinstance(tv.images, list) and len(tv) == 7
    assert tv.labels.tolist() == [2, 0, 3, 2, 0, 0, 3]
    val = task.load_role("val", 16)
    assert val.images.shape == (2, 3, 16, 16)  # val is evaluated: center crop


def test_images_at_root_or_under_Images(tmp_path):
    make_fgvc_folder(tmp_path / "cars", IDS, subdir="")
    assert len(FGVCTask("cars", tmp_path / "cars", 4, cache=False).load_split("val", 8)) == 2
    make_fgvc_folder(tmp_path / "dogs", IDS, subdir="Images")
    assert len(FGVCTask("dogs", tmp_path / "dogs", 4, cache=False).load_split("val", 8)) == 2


def test_errors_name_the_file(cub, tmp_path):
    task, _ = cub
    with pytest.raises(DataError, match="hold 4 classes, num_classes is 5"):
        FGVCTask("cub", task.root, 5).load_split("train", 8)
    (task.root / "val.json").write_text("{not json")
    with pytest.raises(DataError, match=r"val\.json is not valid UTF-8 json"):
        FGVCTask("cub", task.root, 4).load_split("train", 8)
    (task.root / "val.json").unlink()
    with pytest.raises(DataError, match=r"val\.json not found"):
        FGVCTask("cub", task.root, 4).load_split("train", 8)
    (tmp_path / "bad").mkdir()
    for split in ("train", "val", "test"):
        (tmp_path / "bad" / f"{split}.json").write_text(json.dumps({"missing.jpg": 1}))
    with pytest.raises(DataError, match=r"FGVC image not found .*missing\.jpg"):
        FGVCTask("bad", tmp_path / "bad", 1).load_split("train", 8)


def test_configs():
    for name, (folder, k) in FGVC_TASKS.items():
        cfg = OmegaConf.create({"paths": {"data_dir": "/d"}, "ds": OmegaConf.load(CONF / f"{name}.yaml")})
        ds = OmegaConf.to_container(cfg, resolve=True)["ds"]
        assert ds == {
            "_target_": "peftbench.data.fgvc.FGVCTask",
            "name": name,
            "root": f"/d/fgvc/{folder}",
            "num_classes": k,
            "group": "fgvc",
        }
