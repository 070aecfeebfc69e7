"""Visual Prompt Tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119): learnable prompt tokens in
the token sequence of a frozen ViT.

* shallow (VPT-Shallow): P prompt tokens are inserted after the prefix (cls/register) tokens at the input of the
  first block and travel through all blocks like patch tokens.
* deep (VPT-Deep): as shallow, and at the input of every later block the P tokens at those positions are
  replaced by that block's own prompts.

The sequence is (B, prefix + P + N, C) inside the blocks; the P prompt positions are dropped after the last block,
so the final norm and the pooling (cls token or patch average) see the original layout. Done with forward hooks
on the blocks (timm's forward is untouched); the prompts live in ``model.vpt`` (parameter ``vpt_prompts``).
As in VPT's code: prompts uniform in [-v, v] with v = sqrt(6 / (3 p^2 + C)) for patch size p (Xavier-uniform
over the patch embedding's fan-in 3 p^2 and C), dropout on the prompts (fresh mask per image).

Trainable backbone parameters = n x P x C with n = 1 (shallow) or L (deep);
ViT-B/16, P = 10: shallow 10 x 768 = 7,680 (0.0090 %), deep 12 x 10 x 768 = 92,160 (0.1074 % of 85,798,656).

VPT is NOT reparameterisable and does NOT equal the base model at step 0: every token attends to the prompts
from the first step on. :func:`remove_prompts` takes them out again and restores the base model exactly.
ViT only (a flat token sequence); other backbones raise ValueError.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError, check_range
from peftbench.layers.base import TOKEN
from peftbench.methods.base import Method, State, freeze

#: attribute of the model that holds the prompts
ATTR = "vpt"


class Prompts(nn.Module):
    """Prompt tokens for ``layers`` blocks and the hooks that put them into (and take them out of) the sequence.

    Args:
        layers: 1 (shallow) or the number of blocks (deep).
        tokens: P, prompt tokens per block.
        dim: C, token width.
        prefix: tokens before the patch tokens (cls + registers); prompts go right after them.
        init_range: v, prompts are drawn from U(-v, v).
        dropout: dropout on the prompts.
    """

    param_roles = {"vpt_prompts": TOKEN}  # tokens: no weight decay (peftbench.training.weight_decay)

    def __init__(self, layers: int, tokens: int, dim: int, prefix: int, init_range: float, dropout: float) -> None:
        super().__init__()
        self.tokens, self.prefix = tokens, prefix
        self.vpt_prompts = nn.Parameter(torch.empty(layers, tokens, dim).uniform_(-init_range, init_range))  # (n, P, C)
        self.vpt_dropout = nn.Dropout(dropout)
        self.handles: list[RemovableHandle] = []

    def prompts(self, layer: int, batch: int) -> torch.Tensor:
        """The prompts of ``layer`` for a batch, after dropout: (B, P, C)."""
        return self.vpt_dropout(self.vpt_prompts[layer].expand(batch, -1, -1))

    def _input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
        """Split a block's call into (x, other positional args, keyword args); x is (B, tokens, C)."""
        if kwargs.get("attn_mask") is not None:
            raise ConfigError("vpt: attention masks are not supported (their size excludes the prompt tokens)")
        if args:
            return args[0], args[1:], kwargs
        return kwargs.pop("x"), (), kwargs

    def insert(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pre-hook of the first block: (B, prefix + N, C) -> (B, prefix + P + N, C)."""
        x, rest, kwargs = self._input(module, args, kwargs)
        x = torch.cat([x[:, : self.prefix], self.prompts(0, x.shape[0]).to(x.dtype), x[:, self.prefix :]], dim=1)
        return (x, *rest), kwargs

    def replace(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pre-hook of block ``layer`` > 0 (deep): the P prompt positions get this block's prompts."""
        x, rest, kwargs = self._input(module, args, kwargs)  # (B, prefix + P + N, C)
        start, stop = self.prefix, self.prefix + self.tokens
        x = torch.cat([x[:, :start], self.prompts(layer, x.shape[0]).to(x.dtype), x[:, stop:]], dim=1)
        return (x, *rest), kwargs

    def drop(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Hook after the last block: (B, prefix + P + N, C) -> (B, prefix + N, C)."""
        return torch.cat([output[:, : self.prefix], output[:, self.prefix + self.tokens :]], dim=1)

    def attach(self, blocks: list[nn.Module]) -> None:
        """Register the hooks on the model's blocks (in forward order)."""
        self.handles.append(blocks[0].register_forward_pre_hook(self.insert, with_kwargs=True))
        for i in range(1, len(self.vpt_prompts)):
            self.handles.append(blocks[i].register_forward_pre_hook(partial(self.replace, i), with_kwargs=True))
        self.handles.append(blocks[-1].register_forward_hook(self.drop))

    def detach(self) -> None:
        """Remove the hooks: the blocks compute exactly what they computed before :meth:`attach`."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def extra_repr(self) -> str:
        layers, tokens, dim = self.vpt_prompts.shape
        return f"layers={layers}, tokens={tokens}, dim={dim}, prefix={self.prefix}"


def patch_fan_in(model: nn.Module) -> int:
    """Fan-in of the patch embedding (3 p^2): the first Conv2d of a ViT."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return conv.weight[0].numel()


def remove_prompts(model: nn.Module) -> None:
    """Undo VPT: remove the hooks and the prompts; the model is the frozen base model again."""
    prompts = getattr(model, ATTR)
    prompts.detach()
    delattr(model, ATTR)


class VPT(Method):
    """Prompt tuning with ``tokens`` prompts, shallow (input only) or deep (every block).

    Args:
        tokens: P, prompt tokens (VPT's default search: 1, 5, 10, 50, 100, 200).
        deep: replace the prompts at every block's input (VPT-Deep) instead of inserting them once.
        dropout: dropout on the prompts (VPT: 0.1).
    """

    def __init__(self, tokens: int = 10, deep: bool = False, dropout: float = 0.1) -> None:
        if int(tokens) < 1:
            raise ConfigError(f"vpt: tokens must be >= 1, got {tokens}")
        check_range("method.dropout", dropout, 0.0, 1.0)
        self.tokens, self.deep, self.dropout = int(tokens), bool(deep), float(dropout)

    @property
    def name(self) -> str:
        return "vpt_deep" if self.deep else "vpt_shallow"

    def apply(self, model: nn.Module, state: State) -> None:
        if not anatomy.is_vit(model):
            raise ConfigError(f"{self.name}: VPT needs a plain ViT token sequence, got {type(model).__name__}")
        if hasattr(model, ATTR):
            raise ConfigError(f"{self.name}: the model already has prompts (model.{ATTR})")
        freeze(model)
        views = anatomy.blocks(model)
        dim = views[0].dim  # C
        init_range = math.sqrt(6.0 / (patch_fan_in(model) + dim))  # v = sqrt(6 / (3 p^2 + C))
        layers = len(views) if self.deep else 1
        prompts = Prompts(layers, self.tokens, dim, anatomy.prefix_tokens(model), init_range, self.dropout)
        ref = next(model.parameters())
        model.add_module(ATTR, prompts.to(device=ref.device, dtype=ref.dtype).train(model.training))
        prompts.attach([v.module for v in views])

    def describe(self, state: State) -> dict[str, Any]:
        return {"tokens": self.tokens, "deep": self.deep}
