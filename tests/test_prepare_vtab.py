"""scripts/prepare_vtab.py under TFDS mock data: the folders it writes load with VTABTask as the TFDS task does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
import torch

from peftbench.data.tfds_task import TFDSTask
from peftbench.data.vtab import VTABTask

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_vtab.py"


@pytest.fixture(scope="module")
def prepare():
    spec = importlib.util.spec_from_file_location("prepare_vtab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_then_load(prepare, tmp_path, capsys):
    with tfds.testing.mock_data(num_examples=12):
        status = prepare.main(["--tasks", "cifar100,dsprites_loc,smallnorb_ele", "--out", str(tmp_path)])
        assert status == 0, capsys.readouterr().err
        # task_adaptation's slices at n=12: cifar val200 = train[10:210]; dsprites val200 = train[9:209] (it runs on
        # into test at this size, as task_adaptation's would), test = train[9+1:]; smallnorb val200 = test[:200],
        # test = test[6:]
        expected = {"cifar": (12, 2, 12), "dsprites_loc": (12, 3, 2), "smallnorb_ele": (12, 12, 6)}
        for task, (n_train, n_val, n_test) in expected.items():
            folder = tmp_path / "vtab-1k" / task
            k = TFDSTask(task).num_classes
            vtab = VTABTask(task, folder, num_classes=k, cache=False)
            sizes = [len(vtab.load_split(s, 8)) for s in ("train800", "val200", "train800val200", "test")]
            assert sizes == [n_train, n_val, n_train + n_val, n_test]
            tv = (folder / "train800val200.txt").read_text()
            assert tv == (folder / "train800.txt").read_text() + (folder / "val200.txt").read_text()
            labels = vtab.load_split("test", 8).labels
            assert torch.equal(labels, TFDSTask(task, cache=False).load_split("test", 8).labels)
            assert 0 <= int(labels.min()) and int(labels.max()) < k
    assert "cifar:" in capsys.readouterr().out


def test_png_round_trip_is_pixel_exact(prepare, tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        assert prepare.main(["--tasks", "smallnorb_azi", "--out", str(tmp_path), "--image-format", "png"]) == 0
        folder = tmp_path / "vtab-1k" / "smallnorb_azi"
        assert (folder / "images" / "test" / "000000.png").is_file()
        assert (folder / "images" / "train800val200" / "000004.png").is_file()  # val200 follows train800's 4
        from_folder = VTABTask("smallnorb_azi", folder, 18, cache=False).load_split("val200", 10)
        from_tfds = TFDSTask("smallnorb_azi", cache=False).load_split("val200", 10)
    assert torch.equal(from_folder.images, from_tfds.images) and torch.equal(from_folder.labels, from_tfds.labels)


def test_unknown_task_is_one_error_line(prepare, tmp_path, capsys):
    assert prepare.main(["--tasks", "imagenet", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown VTAB-1k task 'imagenet'" in err


def test_the_distributed_layout_train800val200_folder(prepare, tmp_path):
    """As the commonly distributed VTAB-1k release: train800 and val200 images share images/train800val200/."""
    with tfds.testing.mock_data(num_examples=5):
        assert prepare.main(["--tasks", "dtd", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "vtab-1k" / "dtd"
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["test", "train800val200"]
    train = (folder / "train800.txt").read_text().splitlines()
    val = (folder / "val200.txt").read_text().splitlines()
    assert [line.split()[0] for line in train + val] == [
        f"images/train800val200/{i:06d}.jpg" for i in range(len(train) + len(val))
    ]


def test_one_failing_task_does_not_stop_the_others(prepare, tmp_path, capsys, monkeypatch):
    real = prepare.prepare_builder

    def flaky(builder, data_dir):
        if builder.startswith("oxford_iiit_pet"):
            raise AssertionError(f'Failed to construct dataset "{builder}"')
        return real(builder, data_dir)

    monkeypatch.setattr(prepare, "prepare_builder", flaky)
    with tfds.testing.mock_data(num_examples=3):
        status = prepare.main(["--tasks", "oxford_iiit_pet,svhn,dtd", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1 and "1 of 3 task(s) failed" in err and "oxford_iiit_pet: DataError" in err
    assert all((tmp_path / "vtab-1k" / task / "test.txt").is_file() for task in ("svhn", "dtd"))
