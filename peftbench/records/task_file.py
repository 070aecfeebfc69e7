"""The task file, ``<run_dir>/task.pt``: what a task adds to the shared pre-trained backbone.

``{"params": trainable tensors, "method_state": the method's selection, "config": the resolved config (YAML)}``,
written atomically by training and read with ``torch.load(weights_only=True)`` (no code runs). Rebuilding a model
from it (:func:`peftbench.export.load_task`) recomposes the config through ``conf/``, never instantiating what the
file says.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from peftbench.errors import PeftbenchError

TASK_FILE = "task.pt"


def task_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a prepared model (what a task adds to the shared backbone)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_task(model: nn.Module, method_state: dict, cfg: DictConfig, path: Path) -> int:
    """Write the task file; return its size in bytes."""
    payload = {
        "params": task_tensors(model),
        "method_state": method_state,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path.stat().st_size


def read_task(path: Path) -> dict:
    """The task file's payload ``{"params", "method_state", "config"}``, read without running code."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file, or a pickle that needs code
        raise PeftbenchError(
            f"task file {path} cannot be read ({type(err).__name__}); it is damaged, truncated or not a task file"
        ) from None
    if not isinstance(payload, dict) or not {"params", "method_state", "config"} <= set(payload):
        raise PeftbenchError(f"task file {path} lacks params / method_state / config; it is not a peftbench task file")
    if not isinstance(payload["params"], dict):
        raise PeftbenchError(f"task file {path}: params is not a mapping of tensors; the file is damaged")
    return payload
