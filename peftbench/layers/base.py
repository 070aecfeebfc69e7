"""The common base of peftbench's tuner layers: a module that wraps (and keeps) the original ``base_layer``.

Every tuner module declares the role of each parameter it adds (``param_roles``): ``matrix`` when it holds entries
of a weight matrix (LoRA / adapter factors, sparse deltas of a weight), ``vector`` for biases, norms and sparse
deltas of those, ``token`` for tokens and prompts. :mod:`peftbench.training.weight_decay` decays exactly the
``matrix`` ones.
"""

from __future__ import annotations

import torch
from torch import nn

#: parameter roles (see the module docstring); only MATRIX parameters get weight decay
MATRIX, VECTOR, TOKEN = "matrix", "vector", "token"
ROLES = (MATRIX, VECTOR, TOKEN)


class BaseLayerWrapper(nn.Module):
    """A module wrapping ``base_layer``: the base's children stay reachable (and replaceable) through it.

    So ``anatomy`` still finds fc1/fc2 inside a wrapped MLP, and replacing one of them through the wrapper
    replaces it inside the module that actually runs. ``weight``/``bias`` are the base layer's (nn.Linear).
    """

    base_layer: nn.Module
    #: role of each parameter the wrapper itself adds: {attribute name (a Parameter or a ParameterList): role}
    param_roles: dict[str, str] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is not None and name in base._modules:
                return base._modules[name]
            raise

    def __setattr__(self, name: str, value) -> None:
        base = self.__dict__.get("_modules", {}).get("base_layer")
        if base is not None and name in base._modules:
            setattr(base, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


class MergeableWrapper(BaseLayerWrapper):
    """A wrapper whose effect is a dense weight delta (:meth:`delta_weight`): merge/unmerge fold it in and out.

    Subclasses set ``self.merged = False`` in ``__init__`` and skip their delta in ``forward`` while merged.
    """

    merged: bool

    def delta_weight(self) -> torch.Tensor:
        """The dense (out, in) weight delta this layer adds."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into ``base_layer.weight``."""
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the delta out of ``base_layer.weight`` again."""
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False
