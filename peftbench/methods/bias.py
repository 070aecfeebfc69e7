"""BitFit (Ben Zaken, Goldberg and Ravfogel, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", ACL 2022, arXiv:2106.10199): train every bias term of the backbone (and the head).

"Bias term" = the ``bias`` parameter of any layer that has one: linear, conv and norm layers. Other
bias-like tensors (Swin's relative position bias tables, position embeddings) are not bias terms.

Trainable backbone parameters on a ViT of width C, depth L and MLP ratio 4 (all linears with bias):
    C (patch embedding) + L x 11C (norm1 C, qkv 3C, proj C, norm2 C, fc1 4C, fc2 C) + C (final norm)
    = (11L + 2) C;  ViT-B/16: 134 x 768 = 102,912 (0.1199 % of 85,798,656).
"""

from __future__ import annotations

from torch import nn

from peftbench.methods.base import Method, State, freeze


def bias_terms(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every bias parameter of ``model``, by its name in ``model.named_parameters()``."""
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    return {name: p for name, p in model.named_parameters() if id(p) in biases}


class BitFit(Method):
    """Train the bias terms only; the weights stay frozen. Merging is trivial (biases are updated in place)."""

    reparameterisable = True

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        for p in bias_terms(model).values():
            p.requires_grad_(True)
