"""TFDS VTAB tasks: task_adaptation's slices and derived labels, decoding from (mocked) array-record sources."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch

from peftbench.data.tfds_task import (
    VTAB_TFDS,
    BinnedLabel,
    ClevrClosestDistance,
    ClevrCount,
    KittiClosestVehicle,
    Slice,
    TFDSTask,
    VTABReader,
)
from peftbench.data.vtab import VTAB_TASKS
from peftbench.errors import DataError


def _clevr(depths: list[float]) -> dict:
    coords = np.array([[5, 5, d] for d in depths], np.float32).reshape(-1, 3)
    return {"objects": {"size": np.zeros(len(depths), np.int64), "pixel_coords": coords}}


def _kitti(types: list[int], depths: list[float]) -> dict:
    return {"objects": {"type": np.array(types), "location": np.array([[0.0, 1.0, z] for z in depths], np.float32)}}


def test_table_covers_the_19_tasks():
    assert set(VTAB_TFDS) == set(VTAB_TASKS)
    assert VTAB_TFDS["clevr_count"].test == Slice("validation")  # CLEVR's test split has no labels


@pytest.mark.parametrize("task", list(VTAB_TFDS))
def test_every_builder_version_constructs_with_the_installed_tfds(task, tmp_path):
    """The pinned name/config:version must exist in this TFDS (oxford_iiit_pet 3.x does not: 4.x; kitti 3.1.0)."""
    tfds.builder(VTAB_TFDS[task].builder, data_dir=str(tmp_path))  # offline: constructs, downloads nothing


def test_kitti_is_pinned_as_task_adaptation_pins_it():
    assert VTAB_TFDS["kitti"].builder == "kitti:3.1.0"


def test_clevr_labels():
    count = ClevrCount()
    assert [count(_clevr([9.0] * k)) for k in (3, 5, 10)] == [0, 2, 7]
    dist = ClevrClosestDistance()  # bins (0, 8], (8, 8.5], (8.5, 9], (9, 9.5], (9.5, 10], (10, 100]
    cases = {7.9: 0, 8.0: 0, 8.2: 1, 8.5: 1, 8.7: 2, 9.2: 3, 9.7: 4, 10.0: 4, 10.5: 5, 60.0: 5}
    for depth, label in cases.items():
        assert dist(_clevr([depth, 50.0, depth + 3])) == label, depth


def test_kitti_closest_vehicle_distance():
    f = KittiClosestVehicle()
    assert f(_kitti([3, 4, 7], [2.0, 3.0, 4.0])) == 3  # pedestrians, cyclists, misc only: "no vehicle"
    assert f(_kitti([], [])) == 3
    assert f(_kitti([0, 3], [5.0, 1.0])) == 0  # the close pedestrian does not count
    assert f(_kitti([1, 2], [30.0, 8.0])) == 0  # 8.0 is not above the 8 m threshold
    assert f(_kitti([2, 0], [8.1, 50.0])) == 1
    assert f(_kitti([0], [20.5])) == 2


def test_dsprites_and_smallnorb_labels():
    loc, ori = VTAB_TFDS["dsprites_loc"].label, VTAB_TFDS["dsprites_ori"].label
    assert [loc({"label_x_position": v}) for v in (0, 1, 2, 17, 31)] == [0, 0, 1, 8, 15]
    assert [ori({"label_orientation": v}) for v in (0, 2, 3, 5, 39)] == [0, 0, 1, 2, 15]  # bins of 2.5
    assert BinnedLabel("x", 40, 16)({"x": 37}) == 14
    assert VTAB_TFDS["smallnorb_azi"].label({"label_azimuth": 17, "label_elevation": 2}) == 17
    assert VTAB_TFDS["smallnorb_ele"].label({"label_azimuth": 17, "label_elevation": 2}) == 2


def test_slices_follow_task_adaptation_counts():
    n = 50_000  # cifar100 train: val = train[45000:45200]
    assert VTAB_TFDS["cifar"].val200.indices(n) == range(45000, 45200)
    assert VTAB_TFDS["cifar"].train800.indices(n) == range(0, 800)
    assert VTAB_TFDS["eurosat"].val200.indices(27_000) == range(16_200, 16_400)
    assert VTAB_TFDS["eurosat"].test.indices(27_000) == range(21_600, 27_000)
    dsprites_test = VTAB_TFDS["dsprites_loc"].test.indices(737_280)
    assert (dsprites_test.start, len(dsprites_test)) == (663_552, 73_728)
    assert VTAB_TFDS["smallnorb_ele"].val200 == Slice("test", limit=200)
    assert VTAB_TFDS["smallnorb_ele"].test.indices(24_300) == range(12_150, 24_300)
    assert VTAB_TFDS["svhn"].val200.indices(73_257).start == 65_931  # floor(0.9 * 73257)
    assert VTAB_TFDS["dtd"].val200 == Slice("validation", limit=200)


def _crafted(examples_by_split: dict[str, list[dict]]):
    def as_data_source(self, split, **kwargs):
        return examples_by_split[split]

    return tfds.testing.mock_data(as_data_source_fn=as_data_source)


def test_rows_and_labels_from_crafted_sources():
    rng = np.random.default_rng(0)
    train = [{"image": rng.integers(0, 255, (7, 9, 3), np.uint8), "label": i % 100} for i in range(30)]
    test = [{"image": np.full((5, 5, 3), i, np.uint8), "label": 99 - i} for i in range(4)]
    with _crafted({"train": train, "test": test}):
        task = TFDSTask("cifar100", num_workers=1)
        assert task.load_split("train800", 8).labels.tolist() == list(range(30))
        assert task.load_split("val200", 8).labels.tolist() == [27, 28, 29]  # train[90%:][:200]
        tv = task.load_role("trainval", 8)
        assert tv.labels.tolist() == list(range(30)) + [27, 28, 29]
        out = task.load_split("test", 6)
    assert out.labels.tolist() == [99, 98, 97, 96]
    assert torch.equal(out.images[3], torch.full((3, 6, 6), 3, dtype=torch.uint8))


def test_clevr_task_from_crafted_sources():
    def scene(k: int, depth: float) -> dict:
        return {"image": np.zeros((6, 8, 3), np.uint8), **_clevr([depth] * k)}

    train = [scene(3 + i % 8, 8.0 + 0.5 * (i % 5)) for i in range(20)]
    validation = [scene(4, 9.7), scene(10, 7.0)]
    with _crafted({"train": train, "validation": validation}):
        count = TFDSTask("clevr_count", cache=False).load_split("train800", 4)
        dist = TFDSTask("clevr_dist", cache=False).load_split("test", 4)
    assert count.labels.tolist() == [i % 8 for i in range(20)]
    assert dist.labels.tolist() == [4, 0]
    with _crafted({"train": [scene(12, 9.0)] * 3}):
        with pytest.raises(DataError, match=r"train\[0\]: derived clevr_count label 9 outside \[0, 8\)"):
            TFDSTask("clevr_count").load_split("train800", 4)


@pytest.mark.parametrize("name", ["cifar", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "kitti", "sun397"])
def test_mock_data_decodes_every_split(name):
    with tfds.testing.mock_data(num_examples=10):
        task = TFDSTask(name, num_workers=1)
        splits = {s: task.load_split(s, 12) for s in ("train800", "val200", "train800val200", "test")}
    assert len(splits["train800"]) == 10
    assert len(splits["train800val200"]) == len(splits["train800"]) + len(splits["val200"])
    for split in splits.values():
        assert split.images.shape[1:] == (3, 12, 12) and split.images.dtype == torch.uint8
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < task.num_classes


def test_mock_images_become_rgb():
    with tfds.testing.mock_data(num_examples=3):
        image, label = VTABReader("dsprites_loc").example(("train", 0))
        assert image.shape == (64, 64, 3) and set(np.unique(image)) <= {0, 255}
        norb, _ = VTABReader("smallnorb_ele").example(("test", 1))
        assert norb.shape == (96, 96, 3) and np.array_equal(norb[..., 0], norb[..., 2])


def test_unprepared_dataset_raises_data_error(tmp_path):
    with pytest.raises(DataError, match=r"TFDS dataset dtd:3\.\*\.\* split train not readable") as err:
        TFDSTask("dtd", tfds_data_dir=tmp_path).load_split("train800", 8)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing downloaded
    with pytest.raises(DataError, match="num_classes=10 but VTAB defines 100"):
        TFDSTask("cifar", num_classes=10)


def test_prepared_data_is_cached_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    stamp = {"files": "cifar100-test.array_record:100:1"}
    monkeypatch.setattr(VTABReader, "fingerprint", lambda self: (tmp_path, stamp["files"]))
    with tfds.testing.mock_data(num_examples=5):
        first = TFDSTask("cifar", num_workers=1).load_split("test", 8)
        assert (tmp_path / ".peftbench_cache" / "cifar-test-sq8-bicubic" / "meta.json").is_file()

        def boom(self, row):
            raise AssertionError("cached load read TFDS")

        with monkeypatch.context() as m:
            m.setattr(VTABReader, "example", boom)
            second = TFDSTask("cifar", num_workers=1).load_split("test", 8)
            assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
            stamp["files"] = "cifar100-test.array_record:100:2"
            with pytest.raises(AssertionError, match="cached load read TFDS"):
                TFDSTask("cifar", num_workers=1).load_split("test", 8)
