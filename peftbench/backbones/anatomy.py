"""The one module that knows timm's attribute names.

Everything else in peftbench addresses a backbone through the views defined here: transformer blocks with
their attention (``qkv``, ``proj``, head count) and MLP (``fc1``, ``fc2``) linears, the classifier head, and
the parameters that are not part of any block (embeddings, tokens, final norm).

Row ``s*C + h*D + d`` of a fused ``qkv`` weight (C, 3C) belongs to q/k/v (``s`` = 0/1/2), head ``h``,
channel ``d``; :func:`qkv_rows` returns those row indices.

The patch embedding (timm ``patch_embed.proj``, a Conv2d (C, 3, P, P) with stride P) is a linear map of each
flattened patch; :func:`patch_embedding_matrix` views its weight as that (C, 3*P*P) matrix, whose flat indices are
the conv weight's own. :func:`token_parameters` names the tokens and embeddings (cls / register tokens, position
embeddings, Swin's relative-position tables) as timm's ``no_weight_decay()`` lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from peftbench.errors import ConfigError, WeightsError

#: Names of the linear "targets" a method can address inside a block.
ATTN_TARGETS = ("q", "k", "v", "proj")
MLP_TARGETS = ("fc1", "fc2")
TARGETS = ATTN_TARGETS + MLP_TARGETS
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


@dataclass
class BlockView:
    """A transformer block seen through peftbench's names."""

    index: int  # position among all blocks of the model, in forward order
    path: str  # dotted module path, e.g. "blocks.3" or "layers.2.blocks.5"
    module: nn.Module
    attn: nn.Module | None
    mlp: nn.Module | None
    num_heads: int  # 0 when the block has no attention (ConvNeXt)
    dim: int  # input width C

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads if self.num_heads else 0

    def linear_path(self, target: str) -> str:
        """Dotted path (from the model root) of the nn.Linear that holds ``target``."""
        return f"{self.path}.{_LOCAL_PATH[target]}"

    def linear(self, target: str) -> nn.Module:
        """The module holding ``target`` (an nn.Linear, or a peftbench wrapper around one)."""
        owner, attr = _LOCAL_PATH[target].split(".")
        return getattr(getattr(self.module, owner), attr)

    def set_linear(self, target: str, new: nn.Module) -> None:
        """Replace the module holding ``target`` (wrapping the Linear leaf, never ``attn`` itself)."""
        owner, attr = _LOCAL_PATH[target].split(".")
        setattr(getattr(self.module, owner), attr, new)

    def set_mlp(self, new: nn.Module) -> None:
        """Replace the block's MLP sub-module (for methods that act around the whole MLP, e.g. AdaptFormer)."""
        self.module.mlp = new
        self.mlp = new

    def take_mlp_residual(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """Hand over the modules around the MLP of a pre-norm block, ``x + drop_path2(ls2(mlp(norm2(x))))``: returns
        (norm2, ls2, drop_path2) and leaves nn.Identity in their places, so the block adds ``mlp(x)`` and a wrapper
        of the MLP applies them itself (an absent layer scale comes back as nn.Identity)."""
        if not isinstance(getattr(self.module, "norm2", None), nn.Module) or not hasattr(self.module, "drop_path2"):
            raise ConfigError(f"block {self.path} is not a pre-norm transformer block (no norm2 / drop_path2)")
        parts = []
        for name in ("norm2", "ls2", "drop_path2"):
            part = getattr(self.module, name, None)
            parts.append(part if isinstance(part, nn.Module) else nn.Identity())
            if part is not None:
                setattr(self.module, name, nn.Identity())
        return parts[0], parts[1], parts[2]

    def rows(self, target: str) -> torch.Tensor | None:
        """Output rows of the holding linear that belong to ``target`` (None = all rows)."""
        if target in _QKV_INDEX:
            return qkv_rows(self.dim, self.num_heads, parts=(target,))
        return None

    def targets(self) -> tuple[str, ...]:
        """Targets present in this block."""
        return (ATTN_TARGETS if self.attn is not None else ()) + (MLP_TARGETS if self.mlp is not None else ())


_LOCAL_PATH = {
    "q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"
}


def qkv_rows(dim: int, num_heads: int, parts: tuple[str, ...] = ("q", "k", "v"), heads=None) -> torch.Tensor:
    """Row indices of a fused qkv weight (3C, C) for the given parts and heads (sorted, int64)."""
    head_dim = dim // num_heads
    heads = range(num_heads) if heads is None else heads
    rows = [
        _QKV_INDEX[p] * dim + h * head_dim + torch.arange(head_dim) for p in parts for h in heads
    ]
    return torch.cat(rows).sort().values


def _is_block(module: nn.Module) -> bool:
    attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
    has_attn = attn is not None and hasattr(attn, "qkv") and hasattr(attn, "proj")
    has_mlp = mlp is not None and hasattr(mlp, "fc1") and hasattr(mlp, "fc2")
    return has_mlp and (has_attn or attn is None)


def blocks(model: nn.Module) -> list[BlockView]:
    """All transformer (or ConvNeXt) blocks of a timm model, in forward order."""
    views = []
    for path, module in model.named_modules():
        if path and _is_block(module):
            attn = getattr(module, "attn", None)
            fc1 = module.mlp.fc1
            dim = _in_features(fc1)
            views.append(
                BlockView(
                    index=len(views),
                    path=path,
                    module=module,
                    attn=attn,
                    mlp=module.mlp,
                    num_heads=int(getattr(attn, "num_heads", 0)) if attn is not None else 0,
                    dim=dim,
                )
            )
    return views


def base_layer(layer: nn.Module | None) -> nn.Module | None:
    """The original layer inside (nested) tuner wrappers (``layer`` itself when it is not wrapped)."""
    while hasattr(layer, "base_layer"):
        layer = layer.base_layer
    return layer


def _in_features(layer: nn.Module) -> int:
    base = base_layer(layer)
    if isinstance(base, nn.Linear):
        return base.in_features
    if isinstance(base, nn.Conv2d):
        return base.in_channels
    raise WeightsError(f"unexpected MLP layer {type(base).__name__}: peftbench expects nn.Linear fc1/fc2")


def head(model: nn.Module) -> nn.Module:
    """The classifier head module (``model.head`` in timm ViT/Swin; ``model.head.fc`` in ConvNeXt)."""
    h = model.get_classifier() if hasattr(model, "get_classifier") else model.head
    return h


def head_prefix(model: nn.Module) -> str:
    """Name prefix of the classifier's parameters in ``model.named_parameters()``."""
    target = head(model)
    for name, module in model.named_modules():
        if module is target:
            return name + "."
    raise WeightsError("could not find the classifier head in the model")


def is_head_param(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to the classifier head (whole ``model.head`` subtree)."""
    return name.startswith("head.") or name.startswith(head_prefix(model))


def heads_per_block(model: nn.Module) -> list[int]:
    """Attention head count of each block (constant for ViT, per stage for Swin)."""
    return [b.num_heads for b in blocks(model)]


def reset_head(model: nn.Module, num_classes: int) -> None:
    """Replace the classifier with a freshly initialised one for ``num_classes`` classes."""
    model.reset_classifier(num_classes)


def check_structure(model: nn.Module, name: str) -> None:
    """Fail with a clear message when ``model`` lacks the structure peftbench addresses."""
    views = blocks(model)
    if not views:
        raise WeightsError(
            f"backbone {name!r}: found no blocks with mlp.fc1/fc2; peftbench supports timm ViT/Swin/ConvNeXt"
        )
    for b in views:
        if b.attn is not None:
            base = base_layer(b.linear("q"))
            if not isinstance(base, nn.Linear) or base.out_features != 3 * b.dim:
                raise WeightsError(f"backbone {name!r}: {b.path}.attn.qkv is not a Linear(C, 3C)")
            if b.dim % b.num_heads:
                raise WeightsError(f"backbone {name!r}: width {b.dim} is not divisible by {b.num_heads} heads")
    if not hasattr(model, "reset_classifier"):
        raise WeightsError(f"backbone {name!r}: model has no reset_classifier(); not a timm classifier")


def iter_linear_targets(model: nn.Module, targets: tuple[str, ...]) -> Iterator[tuple[BlockView, str]]:
    """Every (block, target) pair present in the model for the requested target names."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ConfigError(f"unknown target(s) {sorted(unknown)}; choose from {list(TARGETS)}")
    for b in blocks(model):
        for t in targets:
            if t in b.targets():
                yield b, t



def patch_embedding_path(model: nn.Module) -> str | None:
    """Dotted path of the patch-embedding convolution (timm ViT / Swin: ``patch_embed.proj``), None without one."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return "patch_embed.proj" if isinstance(base_layer(proj), nn.Conv2d) else None


def patch_embedding(model: nn.Module) -> nn.Module | None:
    """The patch-embedding conv (or the tuner wrapper around it), None when the model has none."""
    path = patch_embedding_path(model)
    return None if path is None else model.get_submodule(path)


def set_patch_embedding(model: nn.Module, new: nn.Module) -> None:
    """Replace the patch-embedding conv (e.g. by a wrapper whose ``base_layer`` is the conv)."""
    if patch_embedding_path(model) is None:
        raise ConfigError(f"{type(model).__name__} has no patch-embedding convolution")
    model.patch_embed.proj = new


def patch_embedding_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight (C_out, C_in, kh, kw) as the (C_out, C_in*kh*kw) matrix it applies to each flattened patch.

    A view: entry (c, j) is flat index ``c * C_in*kh*kw + j`` of the conv weight itself.
    """
    return weight.flatten(1)


def token_parameters(model: nn.Module) -> set[str]:
    """Names of the token / embedding parameters that are not weight matrices (timm's ``no_weight_decay()``):
    ViT ``cls_token``, ``reg_token``, ``pos_embed``, Swin's ``relative_position_bias_table`` ...; only those present."""
    listed = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else set()
    return {name for name, _ in model.named_parameters() if name in listed}


def relative_position_tables(model: nn.Module) -> set[str]:
    """Names of Swin's relative-position bias tables (timm ``relative_position_bias_table``, (169, heads) at window 7);
    empty for a model without them."""
    return {name for name, _ in model.named_parameters() if name.endswith("relative_position_bias_table")}


#: the parameters outside every block, by role: what a scorer's ``exclude`` names (never timm's attribute names)
EMBEDDING_PARTS = ("class_token", "register_tokens", "position_embedding", "patch_embedding")
_EMBEDDING_PREFIX = {"cls_token": "class_token", "reg_token": "register_tokens", "pos_embed": "position_embedding",
                     "patch_embed": "patch_embedding"}


def embedding_part(name: str) -> str | None:
    """The :data:`EMBEDDING_PARTS` role of parameter ``name`` (``pos_embed`` -> ``position_embedding``), or None."""
    return _EMBEDDING_PREFIX.get(name.split(".")[0])


def matrix_target(weight_name: str) -> tuple[str, str] | None:
    """(block path, target) of a block linear's weight name, ``blocks.3.attn.qkv.weight`` -> (``blocks.3``,
    ``qkv``), ``...attn.proj.weight`` -> (..., ``proj``), ``...mlp.fc1.weight`` -> (..., ``fc1``); else None.
    ``qkv`` stands for the fused q, k, v rows (split them with :meth:`BlockView.rows`)."""
    if not weight_name.endswith(".weight"):
        return None
    path = weight_name[: -len(".weight")]
    for local in dict.fromkeys(_LOCAL_PATH.values()):
        if path.endswith("." + local):
            target = "qkv" if local == _LOCAL_PATH["q"] else next(t for t, v in _LOCAL_PATH.items() if v == local)
            return path[: -len(local) - 1], target
    return None


def pre_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The features the classifier head reads, (B, C): timm's ``forward_head(forward_features(x), pre_logits=True)``."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def prefix_tokens(model: nn.Module) -> int:
    """Number of tokens before the patch tokens (cls + register tokens) in a timm ViT's sequence."""
    return int(getattr(model, "num_prefix_tokens", 1))


def class_token(model: nn.Module) -> nn.Parameter | None:
    """The class token of a timm ViT (``model.cls_token``, (1, 1, C)); None when the model has none (Swin, ConvNeXt)."""
    token = getattr(model, "cls_token", None)
    return token if isinstance(token, nn.Parameter) else None


def qkv_bias_name(block: BlockView) -> str | None:
    """Parameter name of the fused qkv bias (3C,) of ``block`` (rows as :meth:`BlockView.rows`), None without one."""
    if block.attn is None:
        return None
    layer = base_layer(block.linear("q"))
    return f"{block.linear_path('q')}.bias" if getattr(layer, "bias", None) is not None else None


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm after the last block (``model.norm`` for ViT/Swin, ``model.head.norm`` for ConvNeXt), if any."""
    norm = getattr(model, "norm", None)
    if norm is None or isinstance(norm, nn.Identity):
        norm = getattr(getattr(model, "head", None), "norm", None)
    return None if isinstance(norm, nn.Identity) else norm


def set_head(model: nn.Module, new: nn.Module) -> None:
    """Replace the classifier head module (ViT/Swin: ``model.head``; ConvNeXt: ``model.head.fc``)."""
    if isinstance(getattr(model, "head", None), nn.Linear) or not hasattr(model.head, "fc"):
        model.head = new
    else:
        model.head.fc = new


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a plain (non-hierarchical) timm VisionTransformer with a token sequence."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)
