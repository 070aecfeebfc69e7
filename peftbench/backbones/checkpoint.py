"""Safe loading of backbone checkpoints: safetensors, ``torch.load(weights_only=True)``, or ViT .npz.

A pickle that would need to execute code to load is refused, never run.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from peftbench.errors import WeightsError

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar", ".npz")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from ``path`` without executing code."""
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; fix backbone.checkpoint or download the file first")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise WeightsError(f"checkpoint {path} is empty (0 bytes); download it again")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: a damaged or truncated file
            raise WeightsError(
                f"checkpoint {path} is not a readable safetensors file ({_first_line(err)}); it is damaged or "
                "truncated: download it again"
            ) from None
    if suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" in str(err) and "invalid load key" not in str(err):
                raise WeightsError(
                    f"checkpoint {path} needs to execute code to load (not a plain tensor file); refused. "
                    "Convert it to .safetensors on a machine you trust"
                ) from None
            raise WeightsError(f"checkpoint {path} is not a torch tensor file ({_first_line(err)})") from None
        except Exception as err:  # noqa: BLE001 - EOFError, zip errors: a damaged or truncated file
            raise WeightsError(
                f"checkpoint {path} cannot be read ({type(err).__name__}: {_first_line(err)}); it is damaged or "
                "truncated: download it again"
            ) from None
        return _unwrap(obj, path)
    raise WeightsError(f"checkpoint {path}: unknown format {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"checkpoint {path} does not hold a state dict of tensors")
    return obj


def convert_mocov3(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MoCo v3 checkpoint (``module.base_encoder.*``) -> timm ViT keys; drops projector/predictor."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.base_encoder.", "base_encoder."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                if not key.startswith("head"):
                    out[key] = value
                break
    if not out:
        raise WeightsError("checkpoint_format=mocov3 but no 'module.base_encoder.*' keys were found")
    return out


CONVERTERS = {"mocov3": convert_mocov3}


def load_checkpoint(model: nn.Module, path: Path, fmt: str | None = None, name: str = "backbone") -> None:
    """Load weights from ``path`` into ``model`` (the head is excluded; callers re-initialise it)."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist; fix backbone.checkpoint or download the file first")
        if not hasattr(model, "load_pretrained"):
            raise WeightsError(f"backbone {name!r}: .npz checkpoints are supported for timm ViTs only")
        try:
            model.load_pretrained(str(path))  # timm's loader for the original big_vision / ViT release (no pickle)
        except Exception as err:  # noqa: BLE001 - a damaged archive, or arrays of another architecture
            raise WeightsError(
                f"checkpoint {path} does not load as a ViT .npz for backbone {name!r} ({type(err).__name__}: "
                f"{_first_line(err)}): a damaged file or another architecture"
            ) from None
        return
    state = read_state_dict(path)
    if fmt is not None:
        if fmt not in CONVERTERS:
            raise WeightsError(f"backbone.checkpoint_format={fmt!r} is unknown; choose one of {sorted(CONVERTERS)}")
        state = CONVERTERS[fmt](state)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)  # timm's own key/shape conversions (pos_embed resampling, ...)
        except Exception as err:  # noqa: BLE001 - tensors timm cannot convert: another architecture
            raise WeightsError(
                f"checkpoint {path} does not fit backbone {name!r} ({type(err).__name__}: {_first_line(err)}); "
                "another architecture? check backbone=... and the file"
            ) from None
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("head") and (k not in own or own[k].shape != v.shape))}
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise WeightsError(
                f"checkpoint {path} does not fit backbone {name!r}: {key} is {tuple(value.shape)} in the file but "
                f"{tuple(own[key].shape)} in the model (another architecture? check backbone=... and the file)"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise WeightsError(
            f"checkpoint {path} does not fit backbone {name!r}: missing {missing[:3]}, unexpected {unexpected[:3]} "
            "(wrong file, or set backbone.checkpoint_format)"
        )
