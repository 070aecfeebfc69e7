"""Splits held on the device: batches drawn by index there, augmented there, no loader and no worker processes.

A VTAB-1k split at 224x224 is ~150 MB of uint8 and an FGVC one a few GB: on a GPU it fits many times over, so
copying it once and gathering each batch on the device removes the host loader, the per-batch host-to-device copy
and the worker processes from the training step. :class:`ResidentLoader` is the drop-in replacement for the
DataLoader of :mod:`peftbench.data.datamodule`:

- the same order: it iterates the same :class:`~peftbench.data.datamodule.EpochSampler` (order from (seed, epoch),
  each DDP rank its share), exposed as ``.sampler`` so Lightning calls its ``set_epoch``;
- the same augmentation: the same per-sample seeds through the same :class:`~peftbench.data.datamodule.ArrayDataset`
  (the random parameters come from the host RNG seeded per sample; crop and flip are exact on any device);
- the same batches: uint8 ``(B, 3, H, W)`` plus int64 labels, normalised on the device by the data module as before.

On the CPU (``data.resident=true``) the batches are bit-identical to the loader's (tests/test_resident.py). Ragged
splits (FGVC's training split before RandomCrop: a list of ``(3, H_i, W_i)`` tensors) stay a list, one tensor per
image on the device; each batch is augmented per sample (the crop makes them equal-sized) and stacked. No padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from peftbench.data.base import SplitArrays


def split_bytes(split: SplitArrays) -> int:
    """Bytes the split's images and labels take (uint8 images: one byte per value)."""
    images = split.images
    if isinstance(images, (torch.Tensor, np.ndarray)):
        n = images.nbytes
    else:
        n = sum(img.nbytes for img in images)
    return int(n + split.labels.nbytes)


def to_device(split: SplitArrays, device: torch.device) -> SplitArrays:
    """A copy of ``split`` on ``device`` (the same tensors when they are there already, e.g. on the CPU)."""
    images = split.images
    if isinstance(images, (torch.Tensor, np.ndarray)):
        moved: torch.Tensor | list[torch.Tensor] = torch.as_tensor(images).to(device)
    else:
        moved = [torch.as_tensor(img).to(device) for img in images]
    return SplitArrays(moved, split.labels.to(device))


class ResidentLoader:
    """Batches of a split that lives on ``split``'s device.

    Args:
        split: the decoded split, already on the device (:func:`to_device`).
        batch_size: images per batch (the last batch may be smaller, as the loader's with ``drop_last=False``).
        sampler: training: the :class:`~peftbench.data.datamodule.EpochSampler` (``(index, sample_seed)`` pairs);
            None: evaluation, in file order.
        dataset_factory: builds the indexing dataset from (split, augment): ``ArrayDataset`` (passed in to share
            one implementation of the per-sample augmentation with the loader path).
        augment: per-sample uint8 augmentation or None.
    """

    def __init__(
        self,
        split: SplitArrays,
        batch_size: int,
        sampler: Sequence | None,
        dataset_factory: Callable,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.split, self.batch_size, self.sampler, self.augment = split, batch_size, sampler, augment
        self.dataset = dataset_factory(split, augment)
        self.device = split.labels.device
        self.batch_sampler = None  # Lightning inspects a loader's samplers (``sampler`` gets ``set_epoch``)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.split)
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels, bs = self.split.images, self.split.labels, self.batch_size
        if self.sampler is None:  # evaluation: consecutive slices (views), no gather
            for start in range(0, len(labels), bs):
                if isinstance(images, torch.Tensor):
                    yield images[start : start + bs], labels[start : start + bs]
                else:
                    yield torch.stack(images[start : start + bs]), labels[start : start + bs]
            return
        items = list(self.sampler)  # this epoch's (index, sample_seed) pairs: one host pass per epoch
        if self.augment is None and isinstance(images, torch.Tensor):
            order = torch.tensor([i for i, _ in items], device=self.device)  # one copy per epoch, not per batch
            for start in range(0, len(order), bs):
                index = order[start : start + bs]
                yield images[index], labels[index]  # (B, 3, H, W) uint8, (B,) int64: one gather each
            return
        for start in range(0, len(items), bs):  # per-sample augmentation, seeded per sample as in the loader
            samples = [self.dataset[item] for item in items[start : start + bs]]
            yield torch.stack([img for img, _ in samples]), torch.stack([label for _, label in samples])
