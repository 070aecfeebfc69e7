"""Weight decay by role: a parameter decays iff it holds entries of a weight matrix.

Roles (:data:`peftbench.layers.base.ROLES`):

* ``matrix`` (decayed): dense weights of linears and convolutions (``weight`` of nn.Linear / nn.ConvNd, the
  head's included), LoRA / adapter / PHM factors, and sparse deltas of weight matrices (SPT, CDRA-SPT, GPS,
  Child-Tuning, HiFi): a weight entry stored in a 1-D delta is still a weight entry.
* ``vector`` (not decayed): biases, norm scales and shifts, layer scales, and sparse deltas of those.
* ``token`` (not decayed): cls / register tokens, position embeddings and relative-position tables (what timm's
  ``no_weight_decay()`` lists, :func:`peftbench.backbones.anatomy.token_parameters`), VPT prompts.

How a parameter gets its role, first match wins:

1. declared by the module that adds it (``param_roles`` on peftbench's tuner layers, prompts, PHM layers); a
   parameter of a declaring module that it does not declare is an error (a new layer must say what it adds);
2. ``weight`` of an nn.Linear / nn.ConvNd -> matrix, its ``bias`` -> vector;
3. listed by the backbone as a token -> token;
4. otherwise by shape: >= 2-D -> matrix, 1-D (norms, layer scales) -> vector.

The tensor rank alone is not the rule: sparse deltas of matrices are 1-D, and tokens / prompts are 2-D or 3-D.
:func:`parameter_groups` is the one place the optimizer's groups are made (training and ``peftbench.bench``).
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import PeftbenchError
from peftbench.layers.base import MATRIX, ROLES, TOKEN, VECTOR


def _declared(model: nn.Module) -> dict[int, str]:
    """{id(parameter): role} of every parameter a module declares through ``param_roles``."""
    roles: dict[int, str] = {}
    for path, module in model.named_modules():
        declared = getattr(module, "param_roles", None)
        if declared is None:
            continue
        for key, role in declared.items():
            if role not in ROLES:
                raise PeftbenchError(f"{type(module).__name__}.param_roles[{key!r}] = {role!r}; use one of {ROLES}")
            try:
                params = [module.get_parameter(key)]
            except AttributeError:  # a ParameterList, or an optional parameter this instance lacks (PHM's phm_B)
                holder = getattr(module, key, None)
                params = list(holder.parameters()) if isinstance(holder, nn.Module) else []
            for p in params:
                roles[id(p)] = role
        own = [n for n, p in module.named_parameters(recurse=False) if id(p) not in roles]
        lists = [n for n, m in module.named_children() if isinstance(m, (nn.ParameterList, nn.ParameterDict))]
        own += [f"{n}.{k}" for n in lists for k, p in getattr(module, n).named_parameters() if id(p) not in roles]
        if own:
            where = f"{path}." if path else ""
            raise PeftbenchError(
                f"{type(module).__name__} does not declare the weight-decay role of {where}{own[0]}: add it to its "
                f"param_roles ({', '.join(ROLES)})"
            )
    return roles


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """{parameter name: role} for every parameter of ``model`` (see the module docstring for the rule)."""
    roles = _declared(model)
    tokens = anatomy.token_parameters(model)
    out: dict[str, str] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a shared parameter (e.g. Compacter's rule) has one role
                continue
            seen.add(id(p))
            name = f"{path}.{local}" if path else local
            if id(p) in roles:
                role = roles[id(p)]
            elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and local in ("weight", "bias"):
                role = MATRIX if local == "weight" else VECTOR
            elif name in tokens:
                role = TOKEN
            else:
                role = MATRIX if p.ndim >= 2 else VECTOR
            out[name] = role
    return out


def parameter_groups(model: nn.Module) -> list[dict]:
    """The optimizer's two groups of trainable parameters: [matrix entries (decayed), the rest (weight_decay 0)].

    Always two groups (possibly empty), in ``model.named_parameters()`` order, so optimizers rebuilt mid-training
    (TINA) line up with the old ones.
    """
    roles = parameter_roles(model)
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if roles[name] == MATRIX else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
