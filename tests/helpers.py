"""Test-only building blocks: a tiny learnable task, a tiny backbone config, and a digest callback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch

from peftbench.data.base import SplitArrays, Task
from peftbench.methods.base import Method


class BlobTask(Task):
    """A tiny synthetic task: class c = a bright square at one of ``num_classes`` positions, on noise.

    Splits follow VTAB names with sizes train800=n_train, val200=n_val, test=n_test. Deterministic in seed.
    """

    def __init__(self, name: str = "blobs", num_classes: int = 4, n_train: int = 64, n_val: int = 32,
                 n_test: int = 48, seed: int = 0, group: str = "structured") -> None:
        super().__init__(name, num_classes, group)
        self.sizes = {"train800": n_train, "val200": n_val, "test": n_test}
        self.seed = seed

    def load_split(self, split: str, image_size: int, for_training: bool = False) -> SplitArrays:
        if split == "train800val200":
            a, b = self.load_split("train800", image_size), self.load_split("val200", image_size)
            return SplitArrays(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]))
        n = self.sizes[split]
        g = torch.Generator().manual_seed(self.seed * 10 + ["train800", "val200", "test"].index(split))
        labels = torch.randint(0, self.num_classes, (n,), generator=g)
        images = torch.randint(0, 80, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
        cell = image_size // 2
        for i, c in enumerate(labels.tolist()):
            r, q = divmod(c % 4, 2)
            images[i, c % 3, r * cell : (r + 1) * cell, q * cell : (q + 1) * cell] = 230
        return SplitArrays(images, labels)


class DigestCallback(L.Callback):
    """Writes, per rank, the trainable parameter names and a SHA-256 of all weights at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = sorted(n for n, p in pl_module.model.named_parameters() if p.requires_grad)
        h = hashlib.sha256()
        for name, tensor in sorted(pl_module.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"trainable": names, "weights_sha256": h.hexdigest()})
        )


#: the tests' own config groups (dataset=blobs, method=one_block, scorer=counting, table=tiny)
TEST_CONF = str(Path(__file__).resolve().parent / "conf")

#: overrides for a tiny, fast configuration (random-weight micro ViT, synthetic task, CSV-free)
TINY = [
    f"hydra.searchpath=[file://{TEST_CONF}]",
    "dataset=blobs",
    "backbone=vit_micro",
    "backbone.pretrained=false",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "data.batch_size=16",
]


class CountingScorer:
    """A pure test scorer: per-block mean |activation|-free score = norm of fc1 weights; records each call."""

    def __init__(self, marker: str | None = None) -> None:
        self.marker = marker

    def __call__(self, model: torch.nn.Module, batches) -> dict[str, torch.Tensor]:
        from peftbench.backbones import anatomy

        n = sum(1 for _ in batches)
        if self.marker:
            with open(self.marker, "a") as f:
                f.write("scored\n")
        return {"blocks": torch.stack([b.linear("fc1").weight.norm() for b in anatomy.blocks(model)]), "n": n}


class OneBlockMethod(Method):
    """Test method: trains the MLP of ONE block, chosen from the scores plus a rank-dependent offset.

    Without the broadcast in ``prepare_model`` DDP ranks would pick different blocks; with it they agree.
    """

    needs_scores = True
    reparameterisable = True
    name = "one_block"

    def select(self, model: torch.nn.Module, scores: dict) -> dict:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        pick = (int(scores["blocks"].argmax()) + rank) % len(scores["blocks"])
        return {"block": torch.tensor(pick)}

    def apply(self, model: torch.nn.Module, state: dict) -> None:
        from peftbench.backbones import anatomy
        from peftbench.methods.base import freeze

        freeze(model)
        for p in anatomy.blocks(model)[int(state["block"])].mlp.parameters():
            p.requires_grad_(True)

    def describe(self, state: dict) -> dict:
        return {"block": int(state["block"])}


class CrashAfterEpoch(L.Callback):
    """Raises after training epoch ``epoch`` has been checkpointed (simulates an interrupted run)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


#: with TINY, for methods that score first: one epoch, a small scoring set
SCORED_TINY = ["trainer.max_epochs=1", "scoring.n_samples=32", "scoring.batch_size=16"]


def train_cli(*args: str) -> tuple[int, str, str]:
    """``python -m peftbench.train <args>`` in this process: (exit code, stdout, stderr).

    For tests of what the command line does where the process boundary itself is not under test (a fresh
    interpreter costs seconds per call)."""
    import contextlib
    import io
    import sys

    from peftbench.train import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    # Hydra would point Python's logging at the redirected streams for good: leave logging alone in-process
    sys.argv = ["peftbench.train", "hydra/job_logging=none", "hydra/hydra_logging=none", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


class PoisonFrozenWeight(L.Callback):
    """After the very last training step, fills a FROZEN weight with NaN: only evaluation can notice."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        last_epoch = trainer.current_epoch == trainer.max_epochs - 1
        if last_epoch and batch_idx == trainer.num_training_batches - 1:
            weight = next(p for p in pl_module.model.parameters() if not p.requires_grad and p.ndim == 1)
            with torch.no_grad():
                weight.fill_(float("nan"))


class SignalAtEpoch(L.Callback):
    """Sends ``signum`` to this very process at the end of training epoch ``epoch`` (after its checkpoint)."""

    def __init__(self, epoch: int, signum: int = 15) -> None:
        self.epoch, self.signum = epoch, signum

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import os

        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


class SaveFullState(L.Callback):
    """Writes the LightningModule's whole state dict (frozen backbone included) at the end of fit to ``path``.

    The resumable checkpoint holds the trainable tensors only; tests that check that frozen weights stayed
    bit-identical read this file instead."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}, self.path)


def full_state_overrides(path: Path) -> list[str]:
    """Overrides that install :class:`SaveFullState` writing to ``path``."""
    return [f"+callbacks.full_state={{_target_: tests.helpers.SaveFullState, path: '{path}'}}"]
