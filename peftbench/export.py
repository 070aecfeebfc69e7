"""Export a finished run: the task file (only what the task adds) and standard artefacts that load without peftbench.

``python -m peftbench.export <run_dir> [--check] [--out DIR]``

- ``<run_dir>/task.pt``: the trainable tensors (deltas, adapters, prompts, head), the method's selection and the
  resolved config; loadable back onto the pre-trained backbone with :func:`load_task` (``torch.load`` with
  ``weights_only=True``: no code runs). Training writes it; its size is recorded in results.json.
- ``<out>/merged/``: for reparameterisable methods, the plain timm model with every delta folded in, in timm's
  Hugging Face layout (``config.json`` + ``model.safetensors``): ``timm.create_model("local-dir:<out>/merged",
  pretrained=True)`` (see :mod:`peftbench.hub`). It replaces the flat ``merged.safetensors`` of earlier versions.
- ``<out>/peft/``: for LoRA-family methods, the adapter in HF peft's format (``adapter_config.json`` +
  ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(<the timm backbone>, <out>/peft)``; methods
  peft cannot represent are skipped, and the output says why.
- ``--check``: rebuild the model from the task file alone and re-evaluate the test split; the artefacts are written
  only when it matches results.json.

``<out>`` is the run folder unless ``--out`` names another.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from peftbench.compose import config_from_file
from peftbench.errors import PeftbenchError
from peftbench.hub import MERGED_DIR, PEFT_DIR, NotRepresentable, preprocessing, save_peft, save_timm
from peftbench.methods.base import unwrap
from peftbench.records.results import RESULTS, read_results
from peftbench.records.task_file import TASK_FILE, read_task
from peftbench.train import build


def load_task(path: Path, overrides: list[str] | None = None, search_path: list[str] | None = None):
    """Rebuild the run's module from a task file: pre-trained backbone + method selection + task tensors.

    The file's config is recomposed through ``conf/`` (:func:`peftbench.compose.config_from_file`): nothing in
    the file chooses code to run. ``overrides`` are plain ``key=value`` settings from the caller (e.g. a data
    folder on this machine). Returns ``(module, datamodule, cfg)``; the module is prepared (method applied) and
    holds the task's weights. ``search_path``: the caller's own extra config folders (see
    :func:`peftbench.compose.config_from_file`). A damaged or foreign file raises one :class:`PeftbenchError` line.
    """
    path = Path(path)
    if not path.is_file():
        raise PeftbenchError(f"task file {path} does not exist; run training first (it writes {TASK_FILE})")
    payload = read_task(path)
    cfg = config_from_file(payload["config"], f"task file {path}", search_path or ())
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    try:
        _, datamodule, module, _ = build(cfg, method_state=payload["method_state"])
        module.configure_model()
    except PeftbenchError:
        raise
    except Exception as err:  # noqa: BLE001 - a selection that does not fit its method is a damaged file
        raise PeftbenchError(
            f"task file {path}: its method state does not fit method {cfg.method.get('_target_')!r} "
            f"({type(err).__name__}: {err}); the file is damaged or from another peftbench version"
        ) from err
    params = dict(module.model.named_parameters())
    unknown = sorted(set(payload["params"]) - set(params))
    if unknown:
        raise PeftbenchError(f"task file {path} does not fit its method: unknown tensors {unknown[:3]}")
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in payload["params"])
    if missing:
        raise PeftbenchError(f"task file {path} lacks trained tensors its method builds: {missing[:3]}")
    for name, value in payload["params"].items():
        if not isinstance(value, torch.Tensor) or value.shape != params[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PeftbenchError(
                f"task file {path}: tensor {name!r} has shape {shape}, the method built {tuple(params[name].shape)}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise PeftbenchError(f"task file {path}: tensor {name!r} holds NaN or infinite values; the file is damaged")
    with torch.no_grad():
        for name, value in payload["params"].items():
            params[name].copy_(value)
    return module, datamodule, cfg


# --- peftbench.load: the run's model, ready -------------------------------------------------------------------
def load(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    search_path: list[str] | None = None,
    merge: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """The run's model and its preprocessing: ``model, pre = peftbench.load("outputs/runs/...")``.

    The model is rebuilt from ``<run_dir>/task.pt`` on the pre-trained backbone (nothing in the file chooses code to
    run), in eval mode on the CPU; for a reparameterisable method (and ``merge=True``) every delta is folded in and
    the result is a plain timm model, otherwise the method's wrapped model. ``pre``: timm's data config of the run's
    evaluation pipeline (feed it to ``timm.data.create_transform(**pre)``). ``overrides``: plain ``key=value``
    settings (e.g. ``paths.data_dir=...``); ``search_path``: your own extra config folders. The caller's random
    states (torch CPU, numpy, random) are left as they were, although rebuilding seeds them.
    """
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # the rebuild seeds the run's RNGs: the caller's are left as they were
        try:
            module, datamodule, cfg = load_task(Path(run_dir) / TASK_FILE, overrides, search_path)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
    model = module.model
    if merge and getattr(module.method, "reparameterisable", False):
        model = unwrap(model)
    return model.eval(), preprocessing(cfg, datamodule.task)


def export_merged(module, folder: Path, preprocessing: dict) -> Path:
    """Write the merged plain timm model of a reparameterisable method in timm's Hugging Face layout (in place:
    the module's wrappers are merged and removed)."""
    if not getattr(module.method, "reparameterisable", False):
        raise PeftbenchError(f"method {module.method.name!r} is not reparameterisable: only the task file exists")
    return save_timm(unwrap(module.model), folder, preprocessing)


@torch.no_grad()
def evaluate(module, datamodule, role: str = "test") -> float:
    """Top-1 accuracy of ``module`` on ``role`` (eval mode, large batches); non-finite logits raise."""
    module.eval()
    correct = total = 0
    for images, labels in datamodule._eval_loader(role):
        logits = module(datamodule.normalize(images))
        if not torch.isfinite(logits).all():
            raise PeftbenchError(f"the model gives non-finite logits on the {role} split: its weights are damaged")
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return correct / max(1, total)


#: --check: the re-evaluated accuracy may differ from results.json by this much when the run did not train in
#: fp32 on a CPU (bf16 autocast and GPU kernels round differently); fp32 CPU runs must match exactly
CHECK_TOLERANCE = 0.005


def reference_accuracy(run_dir: Path) -> tuple[float, float]:
    """(test accuracy of the run's final model from results.json, allowed difference) for ``export --check``."""
    try:
        record = read_results(run_dir)
    except (OSError, ValueError) as err:
        raise PeftbenchError(f"--check needs {run_dir / RESULTS} to compare with ({type(err).__name__})") from None
    metrics = record.get("metrics") or {}
    if record.get("status") != "ok":
        raise PeftbenchError(f"{run_dir / RESULTS} has status {record.get('status')!r}: nothing to check against")
    key = "test_acc_last" if record.get("protocol") == "paper" else "test_acc"
    history = record.get("history") or []
    if key == "test_acc_last" and (not history or history[-1][0] != record.get("epochs", 0) - 1):
        raise PeftbenchError(f"{run_dir / RESULTS}: the final epoch was not evaluated (paper_eval_every), so there is "
                             "no accuracy of the final model to check against")
    if not isinstance(metrics.get(key), (int, float)):
        raise PeftbenchError(f"{run_dir / RESULTS} has no metrics.{key} (the final model's test accuracy)")
    exact = "cpu" in str(record.get("device", "cpu")) and str(record.get("precision", "32-true")).startswith("32")
    return float(metrics[key]), (0.0 if exact else CHECK_TOLERANCE)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m peftbench.export <run_dir> [--check] [--out DIR] [--config-dir DIR] [k=v ...]``."""
    parser = argparse.ArgumentParser(prog="python -m peftbench.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="plain key=value settings, e.g. paths.data_dir=/data")
    parser.add_argument(
        "--check", action="store_true",
        help="re-evaluate the test split from the task file and compare with results.json; write merged/ and peft/ "
        "only when they agree",
    )
    parser.add_argument("--config-dir", action="append", default=[], help="an extra config folder of your own")
    parser.add_argument("--out", type=Path, default=None, help="folder for merged/ and peft/ (default: the run folder)")
    args = parser.parse_args(argv)
    task_file = args.run_dir / TASK_FILE
    out_dir = args.out if args.out is not None else args.run_dir
    try:
        for ov in args.overrides:
            key = ov.split("=", 1)[0]
            if "=" not in ov or any(part.startswith("_") for part in key.lstrip("+").split(".")):
                raise PeftbenchError(f"override {ov!r}: give plain key=value settings (no _target_ or other _keys_)")
        module, datamodule, cfg = load_task(task_file, args.overrides, args.config_dir)
        out = {"task_file": str(task_file), "task_file_bytes": task_file.stat().st_size}
        if args.check:
            expected, tolerance = reference_accuracy(args.run_dir)
            got = evaluate(module, datamodule)
            n = len(datamodule.split("test"))
            out.update(test_acc_from_task_file=got, test_acc_in_results=expected)
            if abs(got - expected) > max(tolerance, 0.5 / max(1, n)):
                raise PeftbenchError(
                    f"--check failed: the task file gives test accuracy {got:.4f}, results.json says {expected:.4f} "
                    f"(allowed difference {tolerance:g}); nothing exported"
                )
        out.update(export_artefacts(module, cfg, datamodule.task, out_dir))
    except PeftbenchError as err:
        print(f"peftbench: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


def export_artefacts(module, cfg: DictConfig, task, out_dir: Path) -> dict[str, Any]:
    """Write ``<out_dir>/peft`` (LoRA family) and ``<out_dir>/merged`` (reparameterisable methods) of a loaded run;
    returns what was written and, for what was not, why (``peft_skipped`` / ``merged_skipped``)."""
    out = {}
    bb = cfg.backbone
    # the timm model the adapter goes onto: only a timm name with timm's (or the package's) pre-trained weights
    base = bb.get("timm_name") if bb.get("pretrained") and bb.get("checkpoint") is None else None
    try:  # before merging: the adapter is read from the wrapped model
        out["peft"] = str(save_peft(module.model, out_dir / PEFT_DIR, base_model=base))
        args = getattr(module.model, "_model_args", {})  # what timm.create_model(base, pretrained=True, ...) needs
        out["peft_base_args"] = {k: v for k, v in args.items() if not k.endswith("drop_path_rate")}
        if base is None:
            out["peft_note"] = ("the run's backbone weights are not a timm pre-trained model (backbone.checkpoint, "
                                "pretrained=false or a custom arch): load the adapter onto those same weights")
    except NotRepresentable as why:
        out["peft_skipped"] = f"not in HF peft's format: {why}"
    if getattr(module.method, "reparameterisable", False):
        out["merged"] = str(export_merged(module, out_dir / MERGED_DIR, preprocessing(cfg, task)))
    else:
        out["merged_skipped"] = f"method {module.method.name!r} is not reparameterisable: the task file is the model"
    return out


if __name__ == "__main__":
    sys.exit(main())
