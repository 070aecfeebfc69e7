"""LightningDataModule over decoded uint8 splits: cheap indexing on the host (or a split resident on the device,
:mod:`peftbench.data.resident`), normalisation on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from peftbench.data.base import NORMALIZE, SplitArrays, Task
from peftbench.data.resident import ResidentLoader, split_bytes, to_device
from peftbench.errors import ConfigError, DataError

#: protocol -> (training role, role evaluated during training or None, whether test is evaluated at the end)
PROTOCOLS = {
    "tune": ("train", "val"),  # fit on train800, select on val200 (test reported at the end, never selected on)
    "final": ("trainval", None),  # fit on train800val200, report last-epoch test accuracy
    "paper": ("trainval", "test"),  # the papers' habit: test every N epochs, report the maximum (labelled)
}


class ArrayDataset(Dataset):
    """Indexes a :class:`SplitArrays`; applies an optional per-sample uint8 augmentation."""

    def __init__(self, split: SplitArrays, augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.split, self.augment = split, augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, sample_seed = item if isinstance(item, tuple) else (item, None)
        img = self.split.images[i]  # (3, H, W) uint8
        if not isinstance(img, torch.Tensor):
            img = torch.from_numpy(img)
        if self.augment is not None:
            if sample_seed is None:
                img = self.augment(img)
            else:  # augmentation depends only on (seed, epoch, index): same in workers, ranks and resumed runs
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed)
                    img = self.augment(img)
        return img, self.split.labels[i]

    def __getitems__(self, items: list) -> list | tuple[torch.Tensor, torch.Tensor]:
        """Batched fetch (DataLoader calls it with a batch's indices): one gather instead of B item copies."""
        images = self.split.images
        if self.augment is not None or not isinstance(images, torch.Tensor):
            return [self[item] for item in items]
        index = torch.tensor([item[0] if isinstance(item, tuple) else item for item in items])
        return Batch((images[index], self.split.labels[index]))  # (B, 3, H, W) uint8, (B,) int64


class Batch(tuple):
    """A batch that is already collated (from :meth:`ArrayDataset.__getitems__`)."""


def collate(samples):
    """Pass pre-collated batches through; collate per-sample lists as PyTorch does."""
    return tuple(samples) if isinstance(samples, Batch) else default_collate(samples)


class EpochSampler(Sampler[tuple[int, int]]):
    """A shuffling sampler whose order depends only on (seed, epoch): resuming at an epoch boundary replays it.

    Yields ``(index, sample_seed)`` pairs; :class:`ArrayDataset` seeds the sample's augmentation with the
    second. Under DDP it hands each rank an equal, disjoint share of the permutation (padded by wrapping around).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        rank, world = self._world()
        per_rank = -(-self.n // world)
        order = torch.cat([order, order[: per_rank * world - self.n]])
        base = (self.seed * 100_003 + self.epoch) * 1_000_003
        return iter((i, base + i) for i in order[rank::world].tolist())

    def __len__(self) -> int:
        return -(-self.n // self._world()[1])


class VisionDataModule(L.LightningDataModule):
    """Serves a :class:`Task` under a protocol (tune / final / paper).

    Args:
        task: the dataset (``conf/dataset``).
        protocol: which splits train and evaluate (see ``PROTOCOLS``).
        image_size: model input size (defaults to the backbone's).
        batch_size: training batch size; eval_batch_size: evaluation batch size.
        normalize: imagenet / inception / none.
        num_workers: DataLoader workers (0 is fine: items are already decoded).
        seed: shuffling seed.
        resident: keep splits on the training device and draw batches there (:mod:`peftbench.data.resident`):
            ``auto`` on a CUDA device for every split that fits ``resident_max_share`` of the device's free memory
            (the others, and every split on the CPU, use the loader); ``true`` always (also on the CPU: the same
            batches as the loader, bit for bit); ``false`` never.
        resident_max_share: the share of the device's free memory (when the data module decides) that resident
            splits may take together under ``auto``.
    """

    def __init__(
        self,
        task: Task,
        protocol: str = "tune",
        image_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        normalize: str = "imagenet",
        num_workers: int = 0,
        seed: int = 0,
        resident: bool | str = "auto",
        resident_max_share: float = 0.5,
    ) -> None:
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol={protocol!r} is unknown; choose one of {sorted(PROTOCOLS)}")
        if normalize not in NORMALIZE:
            raise ConfigError(f"data.normalize={normalize!r} is unknown; choose one of {sorted(NORMALIZE)}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key}={value!r}: give a positive integer")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r}: give an integer >= 0")
        if resident not in ("auto", True, False):
            raise ConfigError(f"data.resident={resident!r}: choose auto, true or false")
        share = resident_max_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"data.resident_max_share={share!r}: give a number in (0, 1]")
        self.resident, self.resident_max_share = resident, float(share)
        self.task, self.protocol, self.image_size = task, protocol, int(image_size)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        mean, std = NORMALIZE[normalize]
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self._norm_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean / std per device
        self.splits: dict[str, SplitArrays] = {}
        self.on_device: dict[str, SplitArrays] = {}  # role -> the split on the training device (resident)
        self.refused: set[str] = set()  # roles that stay on the host (did not fit the share)

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    def split(self, role: str) -> SplitArrays:
        """The decoded split for ``role`` (loaded once, then kept); an empty split raises DataError."""
        if role not in self.splits:
            split = self.task.load_role(role, self.image_size)
            if len(split) == 0:
                name = self.task.split_names.get(role, role)
                raise DataError(
                    f"dataset {self.task.name!r}: split {name!r} ({role} under protocol={self.protocol}) has no "
                    "images; fix its split file (or choose another protocol)"
                )
            self.splits[role] = split
        return self.splits[role]

    @property
    def train_role(self) -> str:
        return PROTOCOLS[self.protocol][0]

    @property
    def monitor_role(self) -> str | None:
        return PROTOCOLS[self.protocol][1]

    def prepare_data(self) -> None:
        """Decode (and cache) every split the protocol needs once, on one process, before DDP ranks set up."""
        self.setup(None)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.split(self.train_role)
            if self.monitor_role:
                self.split(self.monitor_role)
        if stage in (None, "test"):
            self.split("test")

    # --- where batches come from -------------------------------------------------------------------------------
    def device(self) -> torch.device:
        """The training device (the attached trainer's; the CPU without one)."""
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def resident_split(self, role: str) -> SplitArrays | None:
        """The split of ``role`` held on the training device, or None when ``data.resident`` keeps it on the host.

        Decided once per role: ``auto`` holds a split on a CUDA device when the resident splits together stay
        within ``resident_max_share`` of the device's free memory; ``true`` holds every split (any device).
        """
        if role in self.on_device:
            return self.on_device[role]
        device = self.device()
        if self.resident is False or role in self.refused or (self.resident == "auto" and device.type != "cuda"):
            return None
        split = self.split(role)
        if self.resident == "auto":
            need = split_bytes(split) + sum(split_bytes(s) for s in self.on_device.values())
            free = torch.cuda.mem_get_info(device)[0]
            if need > self.resident_max_share * free:
                self.refused.add(role)
                rank_zero_info(
                    f"peftbench: split {role} ({need / 2**20:.0f} MB with the other resident splits) exceeds "
                    f"data.resident_max_share={self.resident_max_share} of {free / 2**30:.1f} GB free on {device}: "
                    "it is served by the loader"
                )
                return None
        self.on_device[role] = to_device(split, device)
        return self.on_device[role]

    def _eval_loader(self, role: str) -> DataLoader | ResidentLoader:
        resident = self.resident_split(role)
        if resident is not None:
            return ResidentLoader(resident, self.eval_batch_size, None, ArrayDataset)
        return DataLoader(
            ArrayDataset(self.split(role)), batch_size=self.eval_batch_size, num_workers=self.num_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader | ResidentLoader:
        split = self.split(self.train_role)
        augment = self.task.train_augment(self.image_size)
        sampler = EpochSampler(len(split), self.seed)
        resident = self.resident_split(self.train_role)
        if resident is not None:  # the same sampler and per-sample seeds: the same batches, drawn on the device
            return ResidentLoader(resident, self.batch_size, sampler, ArrayDataset, augment)
        return DataLoader(
            ArrayDataset(split, augment),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.monitor_role) if self.monitor_role else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on any device -> normalised float32 (B, 3, H, W) on that device."""
        if images.device not in self._norm_on:  # copied once per device, not once per batch
            self._norm_on[images.device] = (self.mean.to(images.device), self.std.to(images.device))
        mean, std = self._norm_on[images.device]
        return (images.float() - mean) / std

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        return self.normalize(images), labels

    def scoring_batches(self, n_samples: int, batch_size: int, device: torch.device | str = "cpu") -> Iterator:
        """The first ``n_samples`` training images in file order, normalised, in batches (for scorers).

        Follows the authors' code for SPT: no shuffling, no augmentation, from the training split.
        """
        split = self.split(self.train_role)
        n = min(n_samples, len(split))
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            images = torch.stack([ArrayDataset(split)[int(i)][0] for i in idx]).to(device)
            yield self.normalize(images), split.labels[idx].to(device)
