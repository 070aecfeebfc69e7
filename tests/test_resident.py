"""Data resident on the device: the same batches as the loader (bit for bit on the CPU), the same runs, the fallback."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from peftbench.compose import compose_config
from peftbench.data.base import SplitArrays
from peftbench.data.datamodule import EpochSampler, VisionDataModule
from peftbench.data.resident import ResidentLoader, split_bytes
from peftbench.errors import ConfigError
from peftbench.train import execute
from tests.helpers import TINY, BlobTask


class RaggedBlobs(BlobTask):
    """BlobTask whose training splits are ragged (3, H_i, W_i) lists, randomly cropped and flipped per sample
    (FGVC's shape of data: Resize(r) decoded once, RandomCrop(size) + flip per sample)."""

    def load_split(self, split: str, image_size: int, for_training: bool = False) -> SplitArrays:
        data = super().load_split(split, image_size + 6)
        if not for_training:
            return SplitArrays(data.images[:, :, 3 : 3 + image_size, 3 : 3 + image_size].contiguous(), data.labels)
        widths = [image_size + 1 + (i % 5) for i in range(len(data))]
        return SplitArrays([img[:, : image_size + 2, :w].clone() for img, w in zip(data.images, widths)], data.labels)

    def train_augment(self, image_size: int):
        return v2.Compose([v2.RandomCrop(image_size), v2.RandomHorizontalFlip(0.5)])


def _module(task, resident, **kw) -> VisionDataModule:
    dm = VisionDataModule(task, protocol="tune", image_size=16, batch_size=6, eval_batch_size=7, resident=resident,
                          seed=3, **kw)
    dm.setup()
    return dm


def _batches(loader, epochs=(0, 1)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
        out += [tuple(b) for b in loader]
    return out


@pytest.mark.parametrize("task", [BlobTask(n_train=20), RaggedBlobs(n_train=20)], ids=["tensor", "ragged+augment"])
def test_resident_batches_are_the_loaders_bit_for_bit(task):
    """Same order (seed, epoch), same per-sample augmentation seeds, same eval batches; two epochs differ."""
    loader, resident = _module(task, False), _module(task, True)
    a, b = loader.train_dataloader(), resident.train_dataloader()
    assert isinstance(b, ResidentLoader) and not isinstance(a, ResidentLoader)
    assert len(a) == len(b) == 4  # 20 images at batch 6: the last batch is short, as the loader's
    got, want = _batches(b), _batches(a)
    assert len(got) == len(want) == 8
    for (xg, yg), (xw, yw) in zip(got, want):
        assert xg.dtype == torch.uint8 and xg.shape == xw.shape and torch.equal(xg, xw) and torch.equal(yg, yw)
    assert not torch.equal(got[0][0], got[4][0])  # epoch 1 is another permutation
    for role in ("val", "test"):
        ev_w, ev_g = list(loader._eval_loader(role)), list(resident._eval_loader(role))
        assert len(ev_w) == len(ev_g)
        assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(ev_g, ev_w))


def test_each_ddp_rank_gets_its_share(monkeypatch):
    """Under DDP each rank draws its share of the permutation, as the loader does (wrapping around to pad)."""
    task = BlobTask(n_train=21)
    for rank in (0, 1):
        monkeypatch.setattr(EpochSampler, "_world", lambda self, r=rank: (r, 2))
        a, b = _module(task, False).train_dataloader(), _module(task, True).train_dataloader()
        got, want = _batches(b, (0,)), _batches(a, (0,))
        assert len(b) == 2 and sum(len(y) for _, y in got) == 11
        assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want))


def test_auto_is_the_loader_on_cpu_and_respects_the_share(monkeypatch):
    """auto: the loader on the CPU; on a CUDA device, resident while the splits fit the share of free memory."""
    task = BlobTask(n_train=20)
    dm = _module(task, "auto")
    assert dm.resident_split("train") is None and not isinstance(dm.train_dataloader(), ResidentLoader)

    import peftbench.data.datamodule as datamodule

    train_bytes = split_bytes(dm.split("train"))
    monkeypatch.setattr(VisionDataModule, "device", lambda self: torch.device("cuda", 0))
    monkeypatch.setattr(datamodule, "to_device", lambda split, device: split)  # no CUDA here: stay put
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * train_bytes, 8 * train_bytes))
    small = _module(task, "auto", resident_max_share=0.3)  # 0.3 x 4 x train < train + val: only train fits
    assert small.resident_split("train") is not None
    assert small.resident_split("val") is None and "val" in small.refused
    assert isinstance(small.train_dataloader(), ResidentLoader)
    assert not isinstance(small._eval_loader("val"), ResidentLoader)
    off = _module(task, False)
    assert off.resident_split("train") is None


@pytest.mark.parametrize("bad", [{"resident": "maybe"}, {"resident_max_share": 0}, {"resident_max_share": 1.5}])
def test_resident_settings_are_checked(bad):
    with pytest.raises(ConfigError, match="data.resident"):
        VisionDataModule(BlobTask(), **bad)


def _run(tmp_path, name, *extra):
    cfg = compose_config([*TINY, f"paths.output_dir={tmp_path}/o", "keep_checkpoint=true", "trainer.max_epochs=2",
                          *extra])
    record = execute(cfg, tmp_path / name)
    state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return record, state


def test_a_run_on_resident_data_is_the_loaders_run(tmp_path):
    """data.resident=true on the CPU: the same history, accuracies and trained tensors as the loader's run."""
    loader, s_loader = _run(tmp_path, "loader", "data.resident=false")
    resident, s_resident = _run(tmp_path, "resident", "data.resident=true")
    auto, _ = _run(tmp_path, "auto")
    assert loader["data_resident"] == auto["data_resident"] == []  # auto on the CPU: the loader
    assert resident["data_resident"] == ["test", "train", "val"]
    assert resident["history"] == loader["history"] and resident["metrics"] == loader["metrics"]
    assert s_resident.keys() == s_loader.keys()
    assert all(torch.equal(s_resident[k], s_loader[k]) for k in s_loader)
