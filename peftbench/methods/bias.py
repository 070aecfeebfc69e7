"""BitFit (Ben Zaken, Goldberg and Ravfogel, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", ACL 2022, arXiv:2106.10199): train every bias term of the backbone (and the head).

"Bias term" = the ``bias`` parameter of any layer that has one: linear, conv and norm layers. On Swin,
``relative_position=true`` (default) also trains the relative-position bias tables, as the authors' code of the
published BitFit-on-Swin numbers does (VPT's and TINA's rule: every parameter whose name contains "bias"; TINA's
printed 0.34M on Swin-T needs them); ``false`` keeps to the layers' bias terms (0.32M). Position embeddings never train.

Trainable backbone parameters on a ViT of width C, depth L and MLP ratio 4 (all linears with bias):
    C (patch embedding) + L x 11C (norm1 C, qkv 3C, proj C, norm2 C, fc1 4C, fc2 C) + C (final norm)
    = (11L + 2) C;  ViT-B/16: 134 x 768 = 102,912 (0.1199 % of 85,798,656).
"""

from __future__ import annotations

from torch import nn

from peftbench.backbones import anatomy
from peftbench.methods.base import Method, State, freeze


def bias_terms(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every bias parameter of ``model``, by its name in ``model.named_parameters()``."""
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    return {name: p for name, p in model.named_parameters() if id(p) in biases}


class BitFit(Method):
    """Train the bias terms only; the weights stay frozen. Merging is trivial (biases are updated in place).

    Args:
        relative_position: also train Swin's relative-position bias tables (the authors' name rule); no effect on
            a model without them.
    """

    reparameterisable = True

    def __init__(self, relative_position: bool = True) -> None:
        self.relative_position = bool(relative_position)

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        tables = anatomy.relative_position_tables(model) if self.relative_position else set()
        for name, p in model.named_parameters():
            if name in tables:
                p.requires_grad_(True)
        for p in bias_terms(model).values():
            p.requires_grad_(True)
