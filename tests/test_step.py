"""A training step without waste: no host read per step, the divergence guard, fused AdamW, compile, inference-mode
evaluation, rare checkpoints that still resume exactly, and one GPU per job of a multirun."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from peftbench.compose import compose_config
from peftbench.errors import ConfigError, TrainingDiverged
from peftbench.train import build, execute, spread_device
from peftbench.training.callbacks import LastCheckpoint
from peftbench.training.module import PEFTModule, fused_option
from tests.helpers import TINY


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    cfg = compose_config([*TINY, f"paths.output_dir={tmp_path}/o", "keep_checkpoint=true", *extra])
    return execute(cfg, tmp_path / name)


def _state(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


# --- host synchronisation --------------------------------------------------------------------------------------
class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``bool()``, ``int()``: aten._local_scalar_dense),
    except inside torch.optim, whose step counters live on the host even when the parameters are on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frame = sys._getframe(1)  # up to the function that read the value (past torch's dispatch wrappers)
            while frame is not None and ("/torch/_dynamo/" in frame.f_code.co_filename
                                         or frame.f_code.co_filename.endswith("torch/_compile.py")):
                frame = frame.f_back
            self.count += frame is None or "/torch/optim/" not in frame.f_code.co_filename
        return func(*args, **(kwargs or {}))


READS = HostReads()


class PerStep(L.Callback):
    """Records the host reads made inside each training step (``on_train_batch_start`` .. ``_end``)."""

    seen: list[int] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = READS.count

    def on_train_batch_end(self, *args) -> None:
        PerStep.seen.append(READS.count - self.start)


def test_a_training_step_reads_nothing_back_except_every_nth(tmp_path, monkeypatch):
    """Loss logging and the divergence guard stay on the device: a host read only at every check_every_n_steps-th
    step and at the last step of each epoch (before: one per step, the guard's ``if not torch.isfinite(loss)``)."""
    monkeypatch.setattr(PEFTModule, "check_every_n_steps", 3)
    monkeypatch.setattr(sys.modules[__name__], "READS", HostReads())
    PerStep.seen = []
    with READS:
        record = _run(tmp_path, "run", "trainer.max_epochs=2", "trainer.enable_progress_bar=true",
                      f"+callbacks.steps._target_={__name__}.PerStep")
    assert record["status"] == "ok"
    assert PerStep.seen == [0, 0, 1, 1] * 2  # 64 images at batch 16: steps 3 (check) and 4 (epoch end) read


def test_the_guard_reports_the_first_non_finite_loss_when_it_checks():
    """Recorded on the device step by step, read at a check: the first bad loss and its step, not a later one."""
    module = PEFTModule(torch.nn.Linear(2, 2), method=None, optimizer=None, scheduler=None, num_classes=2)
    for loss in (1.0, 2.0):
        module.record_divergence(torch.tensor(loss))
    module.check_divergence()  # all finite: nothing
    steps = iter([7, 8, 9])
    type(module).global_step = property(lambda self: next(steps))
    try:
        for loss in (float("inf"), float("nan"), 3.0):
            module.record_divergence(torch.tensor(loss))
        with pytest.raises(TrainingDiverged, match=r"loss is inf at epoch 0, step 7;"):
            module.check_divergence()
    finally:
        del type(module).global_step


def test_divergence_is_caught_before_the_epochs_checkpoint(tmp_path, monkeypatch):
    """With the check far apart, a NaN loss still stops the run at its epoch's last step: no checkpoint of NaNs."""
    monkeypatch.setattr(PEFTModule, "check_every_n_steps", 1000)
    with pytest.raises(TrainingDiverged, match="loss is (nan|inf) at epoch 0"):
        _run(tmp_path, "nan", "optimizer.lr=1e30", "scheduler=constant", "method=full")
    assert not (tmp_path / "nan" / "checkpoints" / "last.ckpt").exists()


# --- optimizer, compile, evaluation ----------------------------------------------------------------------------
def test_fused_optimizer_on_cuda_only():
    """fused=True where the optimizer has it and the device is CUDA; the CPU keeps torch's default (its numbers)."""
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert fused_option(adamw, torch.device("cuda", 0)) == {"fused": True}
    assert fused_option(functools.partial(torch.optim.SGD, lr=0.1), torch.device("cuda")) == {"fused": True}
    assert fused_option(adamw, torch.device("cpu")) == {}
    assert fused_option(functools.partial(torch.optim.AdamW, fused=False), torch.device("cuda")) == {}
    assert fused_option(functools.partial(lambda params, lr: None, lr=1), torch.device("cuda")) == {}
    _, _, module, _ = build(compose_config(TINY))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False)
    module.trainer = trainer
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults["fused"]


class Losses(L.Callback):
    """Collects every training step's loss."""

    seen: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Losses.seen.append(outputs["loss"].detach().clone())


def _losses(tmp_path: Path, name: str, *extra: str) -> tuple[list[torch.Tensor], dict]:
    Losses.seen = []
    record = _run(tmp_path, name, "trainer.max_epochs=2", f"+callbacks.losses._target_={__name__}.Losses", *extra)
    return list(Losses.seen), record


def test_compile_is_wired_and_keeps_the_losses_and_keys(tmp_path):
    """compile=true (graph capture with the eager backend: fast) gives the same losses bit for bit, and the
    checkpoint keeps the model's own keys (no ``_orig_mod``)."""
    plain, a = _losses(tmp_path, "plain")
    compiled, b = _losses(tmp_path, "compiled", "compile=true", "compile_backend=eager")
    assert len(plain) == len(compiled) == 8
    assert all(torch.equal(x, y) for x, y in zip(plain, compiled))
    assert a["history"] == b["history"] and a["metrics"] == b["metrics"]
    assert _state(tmp_path, "plain").keys() == _state(tmp_path, "compiled").keys()
    with pytest.raises(ConfigError, match="compile="):
        _run(tmp_path, "bad", "compile=yes")


@pytest.mark.slow
def test_inductor_compiled_training_matches_eager(tmp_path, monkeypatch):
    """compile=true with inductor (~45 s of C++ compilation on 2 CPU cores): the same losses up to float rounding.
    fallback_random: inductor's own RNG would draw other drop-path masks (equal in law, not in value)."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    plain, _ = _losses(tmp_path, "plain")
    compiled, _ = _losses(tmp_path, "inductor", "compile=true")
    torch.testing.assert_close(torch.stack(compiled), torch.stack(plain), rtol=1e-4, atol=1e-5)


def test_evaluate_runs_under_inference_mode_and_agrees_with_the_test_loop(tmp_path):
    """module.evaluate (the methods' hooks): inference_mode, counted on the device, equal to trainer.test's accuracy."""
    cfg = compose_config([*TINY, "trainer.max_epochs=1"])
    _, datamodule, module, _ = build(cfg)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    modes = []
    handle = module.model.register_forward_hook(lambda *a: modes.append(torch.is_inference_mode_enabled()))
    acc = module.evaluate("test")
    handle.remove()
    assert modes and all(modes) and module.training
    (tested,) = trainer.test(module, datamodule=datamodule, verbose=False)
    assert acc == pytest.approx(tested["test/acc"], abs=1e-6)


# --- checkpoints -----------------------------------------------------------------------------------------------
def test_checkpoint_interval():
    """auto: about ten checkpoints per run (every epoch under 20 epochs); an explicit N as given."""
    auto = LastCheckpoint("x", "auto")
    assert [auto.interval(e) for e in (1, 4, 19, 20, 30, 100)] == [1, 1, 1, 2, 3, 10]
    assert LastCheckpoint("x", 5).interval(100) == 5
    with pytest.raises(ValueError, match="checkpoint_every"):
        LastCheckpoint("x", 0)


class CrashOnce(L.Callback):
    """Raises at the end of training epoch ``epoch`` the first time only (``marker`` remembers)."""

    def __init__(self, epoch: int, marker: str) -> None:
        self.epoch, self.marker = epoch, Path(marker)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError("simulated crash")


def test_rare_checkpoints_resume_exactly(tmp_path):
    """checkpoint_every=2 over 4 epochs: writes after epochs 2 and 4 (counted in results.json); a run that
    crashes after epoch 3 resumes from epoch 2's checkpoint and ends exactly as the uninterrupted one."""
    common = ["dataset.recipe.epochs=4", "checkpoint_every=2"]
    straight = _run(tmp_path, "straight", *common)
    assert straight["storage"]["checkpoint_writes"] == 2
    assert straight["storage"]["checkpoint_bytes_written"] >= 2 * straight["storage"]["checkpoint_bytes"] > 0
    crash = [f"+callbacks.crash={{_target_: {__name__}.CrashOnce, epoch: 2, marker: '{tmp_path / 'crashed'}'}}"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, "resumed", *common, *crash)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    resumed = _run(tmp_path, "resumed", *common, *crash, "resume=true")
    assert resumed["history"] == straight["history"] and resumed["metrics"] == straight["metrics"]
    a, b = _state(tmp_path, "straight"), _state(tmp_path, "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        _run(tmp_path, "bad", "checkpoint_every=0")


# --- many runs, one machine ------------------------------------------------------------------------------------
def test_jobs_of_a_multirun_spread_over_visible_gpus():
    """Job k of a multirun takes GPU k mod n for one-device GPU trainers; DDP, the CPU and one GPU are untouched."""
    gpu = OmegaConf.create({"accelerator": "gpu", "devices": 1})
    assert [spread_device(k, gpu, 4) for k in range(6)] == [0, 1, 2, 3, 0, 1]
    assert spread_device(3, OmegaConf.create({"accelerator": "auto", "devices": 1}), 2) == 1
    assert spread_device(3, gpu, 1) is None
    assert spread_device(3, OmegaConf.create({"accelerator": "gpu", "devices": 2}), 4) is None
    assert spread_device(3, OmegaConf.create({"accelerator": "cpu", "devices": 1}), 4) is None
