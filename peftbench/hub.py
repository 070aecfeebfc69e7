"""A finished run as standard artefacts that load without peftbench's internals.

- :func:`load`: ``peftbench.load(run_dir) -> (model, preprocessing)``: the run's model rebuilt from its task file
  (:func:`peftbench.export.load_task`, the safe path), merged into a plain timm model where the method allows, in
  eval mode; ``preprocessing`` is timm's data config (``input_size``, ``mean``, ``std``, ``interpolation``,
  ``crop_pct``, ``crop_mode``) of the run's evaluation pipeline.
- :func:`save_timm`: the merged model in timm's Hugging Face layout, ``config.json`` (``architecture``,
  ``num_classes``, ``model_args``, ``pretrained_cfg`` with the preprocessing) + ``model.safetensors``:
  ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads it (``vit_micro`` needs ``import peftbench``,
  which registers the name; any other architecture needs timm alone).
- :func:`peft_adapter` / :func:`save_peft`: a LoRA-family adapter (LoRA, Heart-LoRA, Bi-LoRA; SPT-LoRA when it
  chose LoRA modules only) in HF peft's format, ``adapter_config.json`` + ``adapter_model.safetensors``, for
  ``peft.PeftModel.from_pretrained(timm_model, folder)``. Written without peft (peft is needed only to read it).

How peftbench's LoRA maps onto peft's: peft adapts whole ``nn.Linear`` modules, peftbench adapts row groups of one
(q and v of timm's fused qkv, each with its own rank-r A and B). A layer with G groups of rank r becomes ONE
rank-(G*r) peft LoRA on the whole Linear: A = the G A's stacked (G*r, in); B (out, G*r) holds group g's B in g's
rows and g's r columns and is ZERO everywhere else (the k rows of qkv, and the cross-group blocks), so
B @ A = the sum of the groups' deltas, each on its own rows. peft scales by ``lora_alpha / r``: ``lora_alpha`` is
peftbench's scale s times G*r. Heart-LoRA: the deactivated heads' rows are zero rows of B. Bi-LoRA: the effective
factors, i.e. the 1-bit codes decoded to floats (offset + scale * sign); peft stores them as floats. Dropout is
recorded for completeness only (it acts in training; Bi-LoRA's acts on the rank-r hidden, peft's on the input).
Methods with anything else (sparse deltas, compact blocks, adapters, prompts, tuned biases) are not representable:
:class:`NotRepresentable` names what.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

from peftbench.backbones import anatomy
from peftbench.data.base import NORMALIZE, Task
from peftbench.data.decode import ImageTransform
from peftbench.errors import PeftbenchError
from peftbench.layers.binary_lora import BinaryLoRALinear
from peftbench.layers.head_lora import HeadLoRALinear
from peftbench.layers.lora import LoRALinear

#: folder names (under the run folder, or the folder ``--out`` names) of the two exports
MERGED_DIR, PEFT_DIR = "merged", "peft"
#: peftbench layers that are exactly a LoRA (subclasses that add anything else, e.g. sparse deltas, are not)
PEFT_LORA_LAYERS = (LoRALinear, HeadLoRALinear, BinaryLoRALinear)
#: HF peft's file names
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class NotRepresentable(PeftbenchError):
    """The run's adapter has something HF peft's LoRA cannot hold (the message names it)."""


# --- preprocessing ---------------------------------------------------------------------------------------------
def eval_transform(task: Task, image_size: int) -> ImageTransform:
    """The task's evaluation decode at ``image_size`` (VTAB: square resize; FGVC: resize + center crop).

    Tasks whose images are generated at their size (the embedded suite) have no ``transform``: a square resize
    with :class:`ImageTransform`'s defaults (bicubic), what they use for other sizes.
    """
    transform = getattr(task, "transform", None)
    if transform is None:
        return ImageTransform(image_size)
    if "for_training" in inspect.signature(transform).parameters:
        return transform(image_size, for_training=False)
    return transform(image_size)


def data_config(transform: ImageTransform, normalize: str) -> dict[str, Any]:
    """timm's data config (as in a ``pretrained_cfg``) that reproduces ``transform`` + normalisation ``normalize``.

    timm's eval transform resizes to ``floor(size / crop_pct)`` then center-crops ``size``: ``crop_mode="squash"``
    resizes both sides (our square resize), ``"center"`` the shorter side (our ``square=False``).
    """
    size = transform.fixed_size
    if size is None:
        raise PeftbenchError(f"evaluation transform {transform.tag} gives images of varying size; no timm config")
    mean, std = NORMALIZE[normalize]
    return {
        "input_size": (3, size, size),
        "interpolation": transform.interpolation,
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": 1.0 if transform.crop is None else _crop_pct(size, transform.resize),
        "crop_mode": "squash" if transform.square else "center",
    }


def _crop_pct(size: int, resize: int) -> float:
    """The crop_pct for which timm's ``floor(size / crop_pct)`` is exactly ``resize`` (size / resize, rounded)."""
    pct = size / resize
    while math.floor(size / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    while math.floor(size / pct) > resize:
        pct = math.nextafter(pct, 1.0)
    return pct


def preprocessing(cfg: DictConfig, task: Task) -> dict[str, Any]:
    """The run's evaluation preprocessing as timm's data config (from its dataset and ``data.normalize``)."""
    return data_config(eval_transform(task, int(cfg.data.image_size)), str(cfg.data.normalize))


# --- timm's Hugging Face layout --------------------------------------------------------------------------------
def save_timm(model: nn.Module, folder: str | Path, preprocessing: dict[str, Any]) -> Path:
    """Write a plain timm ``model`` as ``<folder>/config.json`` + ``model.safetensors`` (timm's ``save_for_hf``).

    ``config.json``: ``architecture`` (the timm model name), ``num_classes``, ``model_args`` (what timm needs to
    rebuild it, e.g. the image size) and ``pretrained_cfg`` with ``preprocessing``. The source checkpoint's tag is
    dropped (these are the task's weights, not the tag's).
    """
    from timm.models import save_for_hf

    wrappers = [name for name, m in model.named_modules() if hasattr(m, "base_layer")]
    if wrappers:
        raise PeftbenchError(f"save_timm needs a plain timm model; {wrappers[0]} is still a tuner wrapper (merge it)")
    if not hasattr(model, "pretrained_cfg"):
        raise PeftbenchError(f"{type(model).__name__} was not built by timm.create_model: no timm name to record")
    folder = Path(folder)
    save_for_hf(model, folder, safe_serialization=True, data_config=dict(preprocessing))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["pretrained_cfg"].pop("tag", None)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return folder


# --- HF peft's adapter format ----------------------------------------------------------------------------------
@torch.no_grad()
def _full_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA on the whole Linear from the layer's row groups: A (G*r, in), B (out, G*r), zero off the groups."""
    a, b = (t.detach().float().cpu() for t in layer.factors())  # (G, r, in), (G, out_g, r)
    groups, rank, n_in = a.shape
    weight = layer.base_layer.weight
    full_b = torch.zeros(weight.shape[0], groups * rank)  # (out, G*r)
    if layer.lora_rows is None:
        full_b[:, :] = b[0]
    else:
        rows = layer.lora_rows.cpu().view(groups, b.shape[1])  # (G, out_g); out_g = 0 when Heart-LoRA left no head
        for g in range(groups):
            full_b[rows[g], g * rank : (g + 1) * rank] = b[g]
    return a.reshape(groups * rank, n_in), full_b


def peft_adapter(model: nn.Module, base_model: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of HF peft's LoRA equivalent to the (unmerged) prepared ``model``.

    Raises :class:`NotRepresentable` when the model trains anything besides LoRA factors and the classifier head.
    The head goes in as peft's ``modules_to_save``.
    """
    head = anatomy.head_prefix(model).rstrip(".")
    layers: dict[str, LoRALinear] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "base_layer"):
            continue
        if type(module) not in PEFT_LORA_LAYERS:
            raise NotRepresentable(f"{name} is a {type(module).__name__}: peft's LoRA cannot hold it")
        if module.merged:
            raise PeftbenchError(f"{name} is merged: export the adapter before merging")
        layers[name] = module
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        in_lora = owner in layers and name.rsplit(".", 1)[1] in ("lora_A", "lora_B")
        if p.requires_grad and not in_lora and not name.startswith(head + "."):
            raise NotRepresentable(f"the method trains {name}, which peft's LoRA cannot hold")
    if not layers:
        raise NotRepresentable("the model has no LoRA layer (only the head trains: the merged model is the export)")
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in layers.items():
        a, b = _full_factors(layer)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        ranks[name], alphas[name] = a.shape[0], layer.scale * a.shape[0]
    for key, value in anatomy.head(model).state_dict().items():
        tensors[f"{_PEFT_PREFIX}{head}.{key}"] = value.detach().float().cpu().contiguous()
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropout = next(iter(layers.values())).lora_dropout
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(getattr(dropout, "p", 0.0)),
        "target_modules": sorted(layers),
        "modules_to_save": [head],
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    return config, tensors


def save_peft(model: nn.Module, folder: str | Path, base_model: str | None = None) -> Path:
    """Write ``<folder>/adapter_config.json`` + ``adapter_model.safetensors`` (see :func:`peft_adapter`)."""
    config, tensors = peft_adapter(model, base_model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder
