"""MLP-k (VPT's head baseline, Jia et al. 2022): a k-layer MLP replaces the linear classifier; backbone frozen.

The head becomes ``k - 1`` hidden layers ``Linear(C, C) -> activation -> BatchNorm1d(C) -> Dropout`` (VPT's
code, src/models/mlp.py) followed by the fresh linear classifier ``Linear(C, classes)`` the backbone was built
with, so ``k=1`` is linear probing. (VPT's code counts hidden layers: its ``MLP_NUM=n`` is ``k=n+1``.)

Trainable parameters, all in the head (0 in the backbone), for width C and K classes:
    (k - 1) x (C^2 + C [linear] + 2C [batch norm]) + C K + K;
ViT-B/16, k=3, K=100: 2 x 592,128 + 76,900 = 1,261,156 (1.4699 % of the backbone's 85,798,656; without
batch norm 1,258,084).

Not reparameterisable beyond the head: merging leaves the backbone as it was, but the classifier is an MLP.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.methods.base import Method, State, freeze

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class MLPHead(Method):
    """Replace the linear head by a ``k``-layer MLP whose hidden width equals the feature width.

    Args:
        k: the number of linear layers in the head (>= 1; 1 = linear probing).
        activation: ``relu`` (VPT's code) or ``gelu``.
        batchnorm: BatchNorm1d after each hidden activation (VPT's code does).
        dropout: dropout after each hidden layer (VPT's code: 0.1).
    """

    def __init__(self, k: int = 3, activation: str = "relu", batchnorm: bool = True, dropout: float = 0.1) -> None:
        if int(k) < 1:
            raise ConfigError(f"mlp_head: k must be >= 1, got {k}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"mlp_head: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.k, self.activation = int(k), activation
        self.batchnorm, self.dropout = bool(batchnorm), float(dropout)

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        classifier = anatomy.head(model)
        if not isinstance(classifier, nn.Linear):
            raise ConfigError(f"mlp_head: expected a linear classifier head, found {type(classifier).__name__}")
        width = classifier.in_features  # C
        dev, dtype = classifier.weight.device, classifier.weight.dtype
        hidden: list[nn.Module] = []
        for _ in range(self.k - 1):
            fc = nn.Linear(width, width, device=dev, dtype=dtype)
            nn.init.kaiming_normal_(fc.weight, a=0, mode="fan_out")  # as VPT's MLP
            nn.init.zeros_(fc.bias)
            hidden += [fc, ACTIVATIONS[self.activation]()]
            if self.batchnorm:
                hidden.append(nn.BatchNorm1d(width, device=dev, dtype=dtype))
            if self.dropout > 0:
                hidden.append(nn.Dropout(self.dropout))
        mlp = nn.Sequential(*hidden, classifier).train(model.training)  # (B, C) -> (B, K); mode as the model's
        anatomy.set_head(model, mlp)

    def describe(self, state: State) -> dict[str, Any]:
        return {"k": self.k, "activation": self.activation}
