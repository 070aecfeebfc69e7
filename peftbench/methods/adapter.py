"""Sequential bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019,
arXiv:1902.00751): x + up(act(down(x))) on a sub-layer's output.

Placement ``mlp`` puts one adapter on the output of every MLP (wrapping ``fc2``); ``both`` adds one on the
output of every attention too (wrapping ``proj``), as TINA (Fig. 2a) and Houlsby do; ``attn`` only the latter.
The adapter sits inside the block's residual branch: block output = x + drop_path(adapter(sublayer(x))).

Trainable backbone parameters = sum over adapters of (2 * n * C + n + C), with C the block width and n the
hidden width (``n``, or round(C / sigma) when the compression ratio ``sigma`` is set, TINA's sigma = m / n).
ViT-B/16 (12 blocks, C = 768), n = 8, placement mlp: 12 x (768*8 + 8 + 8*768 + 768) = 156,768 (0.183%);
placement both: 313,536 (0.365%); sigma = 32 (n = 24), both: 24 x (2*24*768 + 24 + 768) = 903,744 (1.053%).
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError, check_range
from peftbench.layers.adapter import Bottleneck, SequentialAdapter
from peftbench.methods.base import Method, State, freeze

#: which block outputs get an adapter: the linear target whose output it adapts
PLACEMENTS = {"mlp": ("fc2",), "attn": ("proj",), "both": ("proj", "fc2")}


class Adapter(Method):
    """Houlsby adapters with a zero-initialised up-projection, so step 0 equals the pre-trained model.

    Args:
        n: hidden width of every adapter (ignored when ``sigma`` is set).
        sigma: compression ratio C / n; sets n = max(1, round(C / sigma)) per block (proportional sizing).
        placement: ``mlp`` (default), ``attn`` or ``both``.
        act: activation between down and up (gelu, quick_gelu, relu, silu, identity); GELU is ViT's and Houlsby's,
            quick_gelu NOAH's (the SPT tables' Adapter rows).
        dropout: dropout on the hidden activations.
    """

    def __init__(
        self,
        n: int = 8,
        sigma: float | None = None,
        placement: str = "mlp",
        act: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        if placement not in PLACEMENTS:
            raise ConfigError(f"unknown adapter placement {placement!r}; choose from {sorted(PLACEMENTS)}")
        if sigma is not None and sigma <= 0:
            raise ConfigError(f"adapter compression ratio sigma must be > 0, got {sigma}")
        check_range("method.n", n, 1, integer=True)  # a width-0 adapter trains nothing but the head
        check_range("method.dropout", dropout, 0.0, 1.0)
        self.n, self.sigma, self.placement = int(n), sigma, placement
        self.act, self.dropout = act, float(dropout)

    def hidden(self, width: int) -> int:
        """Hidden width of an adapter on a block of width ``width``."""
        return self.n if self.sigma is None else max(1, round(width / self.sigma))

    def bottleneck(self, width: int, device: torch.device, dtype: torch.dtype) -> Bottleneck:
        """A fresh bottleneck for one adapter (the PHM variants override this)."""
        return Bottleneck(width, self.hidden(width), self.act, self.dropout, device=device, dtype=dtype)

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        for block in anatomy.blocks(model):
            for target in PLACEMENTS[self.placement]:
                if target in block.targets():
                    layer = block.linear(target)
                    adapter = self.bottleneck(block.dim, layer.weight.device, layer.weight.dtype)
                    block.set_linear(target, SequentialAdapter(layer, adapter))
