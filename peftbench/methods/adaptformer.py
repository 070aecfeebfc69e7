"""AdaptFormer (Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition", NeurIPS 2022,
arXiv:2205.13535): a scaled bottleneck branch in parallel with every block's MLP.

    x' = x + drop_path(mlp(norm2(x))) + s * up(dropout(relu(down(b)))),   b = x (input=block) | norm2(x) (input=norm)

As the authors' code (what produced the published numbers): the branch reads the un-normalised x
(``adapter_layernorm_option="none"``: ``input=block``, default) and is added after the MLP's drop-path (and layer
scale). The paper's equation feeds it LN(x), the MLP's input: ``input=norm``. The block's norm2, layer scale and
drop-path move into the MLP wrapper (the block keeps nn.Identity in their places), which is how the wrapper sees x
and keeps the branch out of the drop-path. ``up`` is zero-initialised ("lora" init of the code) so step 0 equals
the pre-trained model.

Trainable backbone parameters = L x (C*n + n + n*C + C) for L blocks of width C; ViT-B/16, n = 64:
12 x (768*64 + 64 + 64*768 + 768) = 1,189,632 (1.387% of 85,798,656).
"""

from __future__ import annotations

from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError, check_range
from peftbench.layers.adapter import Bottleneck, ParallelAdapter
from peftbench.methods.base import Method, State, freeze


class AdaptFormer(Method):
    """A parallel ReLU bottleneck beside each MLP, scaled by s.

    Args:
        n: bottleneck width (the paper's \\hat{d}; 64 on VTAB).
        scale: s (0.1 in the paper).
        dropout: dropout on the hidden activations (0.1 in the authors' code).
        input: what the branch sees: ``block`` (the un-normalised x, the authors' code) or ``norm`` (norm2(x), the
            MLP's input, the paper's equation).
    """

    def __init__(self, n: int = 64, scale: float = 0.1, dropout: float = 0.1, input: str = "block") -> None:
        check_range("method.n", n, 1, integer=True)
        check_range("method.dropout", dropout, 0.0, 1.0)
        if input not in ("block", "norm"):
            raise ConfigError(f"method.input={input!r}: choose block (the authors' code) or norm (the paper)")
        self.n, self.scale, self.dropout, self.input = int(n), float(scale), float(dropout), input

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        for block in anatomy.blocks(model):
            if block.mlp is None:
                continue
            weight = block.linear("fc1").weight
            branch = Bottleneck(block.dim, self.n, "relu", self.dropout, device=weight.device, dtype=weight.dtype)
            residual = block.take_mlp_residual()  # norm2, ls2, drop_path2: the wrapper applies them itself
            block.set_mlp(ParallelAdapter(block.mlp, branch, self.scale, residual, self.input == "norm"))
