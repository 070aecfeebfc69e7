"""GPS (Zhang et al., "Gradient-based Parameter Selection for Efficient Fine-Tuning", CVPR 2024, arXiv:2312.10136).

For every candidate weight matrix and every row (output neuron), the ``k`` input connections with the largest
gradient score are tuned, as W = W0 + scatter(delta) (:class:`~peftbench.layers.sparse.SparseDeltaLinear`; the
patch embedding: :class:`~peftbench.layers.sparse.SparseDeltaConv2d`), so every other entry stays bit-identical to
W0 (no gradient masking). As the authors' code (its pruning mask and train scripts), by default:

* candidates: q, k, v (row slices of the fused qkv; per-row top-k of a slice = of the fused rows), proj, fc1, fc2
  of every block AND the patch embedding, its conv weight (C, 3, P, P) seen as the (C, 3*P*P) matrix applied to
  each patch (``patch_embed``);
* every bias of a linear or conv layer trains whole (``biases``); norms, cls token and position embedding stay
  frozen; the classifier head trains as always;
* scores: |gradient of a supervised-contrastive loss on two augmented views per image, summed over one pass of the
  training split, batch 16| (``scorer=contrastive``, :mod:`peftbench.scorers.contrastive`);
* optimiser: Adam with weight decay 0 (the table specs set ``optimizer.weight_decay=0``: AdamW with wd 0 is Adam).

ViT-B/16, k = 1: 12 x (2304 + 768 + 3072 + 768) weight rows + 768 patch-embedding rows = 83,712 entries, plus
83,712 bias entries (the same rows' biases) = 167,424 trainable backbone parameters (0.195 %; the head brings a
VTAB task to about the 0.25 % CDRA-SPT lists for GPS). ``patch_embed=false, biases=false`` is the paper's
"selected connections only" reading (82,944 on ViT-B/16). Any scorer with the matrix keys of
:func:`~peftbench.scorers.base.matrix_key` works (``scorer=sensitivity`` ranks by squared CE gradients, a proxy; it
does not score the patch embedding, so set ``method.patch_embed=false`` with it). Only the per-row ranking matters;
ties within a row are broken by column index (stable sort), so the selection is deterministic.
Swin note: the authors' name match ("bias") would also train Swin's relative-position bias tables; here only
linear / conv biases train.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.layers.sparse import SparseDeltaConv2d, SparseDeltaLinear
from peftbench.methods.base import Method, State, freeze
from peftbench.scorers.base import matrix_key, patch_key


def row_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (rows * k,) into ``score`` (d, c) of the ``k`` largest entries of each row (ties by column).

    k rounds of argmax (the first maximum, so ties go to the lower column), each taking the found entries out: the
    same as a stable descending sort's first k columns, 50x cheaper for small k. NaN scores are not expected.
    """
    d, c = score.shape
    k = min(int(k), c)
    rows = torch.arange(d)
    s = score.detach().float().clone()  # (d, c)
    cols = []
    for _ in range(k):
        j = s.argmax(dim=1)  # (d,)
        cols.append(j)
        s[rows, j] = -torch.inf
    cols = torch.stack(cols, dim=1) if cols else torch.zeros(d, 0, dtype=torch.long)  # (d, k)
    return (rows[:, None] * c + cols).flatten()


def layer_biases(model: nn.Module) -> list[str]:
    """Names of the biases of every linear / conv layer outside the classifier head (norms excluded)."""
    ids = {id(m.bias) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None}
    return [n for n, p in model.named_parameters() if id(p) in ids and not anatomy.is_head_param(model, n)]


class GPS(Method):
    """Top-``k`` scored entries per row of every candidate matrix as sparse deltas, plus every layer bias.

    Args:
        k: entries per row (the authors tune K per dataset: 1 on 18 of the 19 VTAB tasks, 2 on patch_camelyon).
        targets: candidate block matrices (must be among the scorer's).
        patch_embed: also select k entries per row of the patch embedding (authors' code).
        biases: train every linear / conv bias outside the head (authors' code); norms stay frozen.
    """

    needs_scores = True
    reparameterisable = True

    def __init__(
        self, k: int = 1, targets: Sequence[str] = anatomy.TARGETS, patch_embed: bool = True, biases: bool = True
    ) -> None:
        if int(k) < 1:
            raise ConfigError(f"GPS k must be >= 1, got {k}")
        self.k, self.targets = int(k), tuple(targets)
        self.patch_embed, self.biases = bool(patch_embed), bool(biases)

    @property
    def name(self) -> str:
        return "gps"

    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None) -> State:
        if not scores:
            raise ConfigError("gps needs gradient scores: set scorer=contrastive or scorer=sensitivity")
        sparse: dict[str, list[torch.Tensor]] = {}
        for block, target in anatomy.iter_linear_targets(model, self.targets):
            key = matrix_key(block, target)
            if key not in scores:
                continue
            score = scores[key].detach().float().cpu()  # (d, c) in the slice
            flat = row_topk(score, self.k)  # (d*k,) flat in the slice
            r, c = flat // score.shape[1], flat % score.shape[1]
            rows = block.rows(target)  # holding-weight rows of the slice (None = all)
            holding = r if rows is None else rows.cpu()[r]
            sparse.setdefault(block.linear_path(target), []).append(holding * score.shape[1] + c)
        indices = {path: torch.cat(parts).sort().values for path, parts in sparse.items()}
        weight_entries = sum(int(i.numel()) for i in indices.values())
        patch = None
        if self.patch_embed and (key := patch_key(model)) is not None:
            if key not in scores:
                raise ConfigError(
                    f"gps: no score for the patch embedding ({key}); use scorer=contrastive (it scores it) "
                    "or set method.patch_embed=false"
                )
            patch = row_topk(scores[key].detach().float().cpu(), self.k)  # (C*k,) flat = conv weight indices
            indices[anatomy.patch_embedding_path(model)] = patch.sort().values
        biases = layer_biases(model) if self.biases else []
        params = dict(model.named_parameters())
        n_bias = sum(params[n].numel() for n in biases)
        n_patch = 0 if patch is None else int(patch.numel())
        return {
            "k": self.k,
            "sparse": indices,
            "biases": biases,
            "summary": {
                "k": self.k,
                "matrices": len(sparse),
                "weight_entries": weight_entries,
                "patch_entries": n_patch,
                "bias_params": n_bias,
                "trainable_backbone": weight_entries + n_patch + n_bias,
            },
        }

    def apply(self, model: nn.Module, state: State) -> None:
        params = dict(model.named_parameters())
        biases = [params[n] for n in state.get("biases", [])]  # resolved before wrapping renames them
        freeze(model)
        done: set[str] = set()
        for block, target in anatomy.iter_linear_targets(model, self.targets):
            path = block.linear_path(target)
            indices = state["sparse"].get(path)
            if path in done or indices is None or not indices.numel():
                continue
            done.add(path)
            block.set_linear(target, SparseDeltaLinear(block.linear(target), indices))
        path = anatomy.patch_embedding_path(model)
        if path is not None and state["sparse"].get(path) is not None and state["sparse"][path].numel():
            anatomy.set_patch_embedding(model, SparseDeltaConv2d(anatomy.patch_embedding(model), state["sparse"][path]))
        for p in biases:
            p.requires_grad_(True)

    def describe(self, state: State) -> dict:
        return dict(state.get("summary", {}))
