"""HiFi (Gui & Xiao, ACL 2023, Alg. 3): fine-tune only the W^Q, W^K, W^V of the top-k heads per layer.

Heads are ranked per layer by the PageRank value p*_h of ``scorer=hifi`` (``<block path>.attn:pagerank``).

* ``strategy=layer_wise``: the top-k heads of every attention block (the paper's HiFi_layer-wise, k = 3).
* ``strategy=mid_top``: the top-k heads of blocks ``L // 2`` .. ``L - 1`` only (HiFi_mid-top: "from middle to
  top", half the trainable parameters of layer-wise for even L; lower blocks stay frozen).

The head's rows of timm's fused qkv (q, k and v rows h*D .. h*D+D-1, all C columns each;
:func:`anatomy.qkv_rows`) are tuned as a sparse delta, W = W0 + scatter(delta) (:class:`SparseDeltaLinear` over
their flat indices), so the method merges into qkv and every other entry stays bit-identical. Trainable backbone
parameters = tuned layers x k x 3 x D x C. The q/k/v biases of those rows are NOT tuned (the paper's W_h =
{W^Q, W^K, W^V} names only weights; its footnote ignores biases), which also keeps the delta mergeable with the
existing sparse layer. Ties in p*_h go to the lower head index.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.layers.sparse import SparseDeltaLinear
from peftbench.methods.base import Method, State, freeze
from peftbench.scorers.hifi import head_key

STRATEGIES = ("layer_wise", "mid_top")


def top_heads(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest entries of ``scores`` (H,), ties to the lower index, returned sorted."""
    order = torch.sort(-scores.double().flatten(), stable=True).indices  # descending, stable
    return sorted(int(i) for i in order[: min(k, scores.numel())])


def qkv_head_indices(block: anatomy.BlockView, heads: list[int], n_in: int) -> torch.Tensor:
    """Flat indices (rows x all ``n_in`` columns) of the q, k, v rows of ``heads`` in the fused qkv weight."""
    rows = anatomy.qkv_rows(block.dim, block.num_heads, ("q", "k", "v"), heads)  # (3 * len(heads) * D,)
    return (rows.unsqueeze(1) * n_in + torch.arange(n_in)).flatten()  # (rows * n_in,)


class HiFi(Method):
    """Tune the qkv rows of the top-k PageRank heads per layer.

    Args:
        k: heads per tuned layer (3 in the paper; capped at the layer's head count).
        strategy: ``layer_wise`` (every layer) or ``mid_top`` (layers from the middle up).
        ratio: hierarchical backbones (Swin, whose stages have 4 / 8 / 16 / 32 heads): k_l = max(1, round(ratio *
            H_l)) per layer instead of a fixed k (0.25 gives ViT-B's k = 3 of 12). None: the fixed ``k``.
    """

    needs_scores = True
    reparameterisable = True

    def __init__(self, k: int = 3, strategy: str = "layer_wise", ratio: float | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown hifi strategy {strategy!r}; choose from {list(STRATEGIES)}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if ratio is not None and not 0 < ratio <= 1:
            raise ConfigError(f"hifi ratio must lie in (0, 1], got {ratio}")
        self.k, self.strategy, self.ratio = int(k), strategy, ratio

    def heads_for(self, num_heads: int) -> int:
        """Heads tuned in a layer with ``num_heads`` heads."""
        if self.ratio is None:
            if self.k > num_heads:
                raise ConfigError(f"method.k={self.k}: a layer has only {num_heads} heads (use k <= {num_heads})")
            return self.k
        return max(1, int(math.floor(self.ratio * num_heads + 0.5)))

    @property
    def name(self) -> str:
        return "hifi"

    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None) -> State:
        if not scores:
            raise ConfigError("hifi needs head scores: set scorer=hifi")
        views = [b for b in anatomy.blocks(model) if b.attn is not None]
        first = len(views) // 2 if self.strategy == "mid_top" else 0
        heads: dict[str, list[int]] = {}
        maps: dict[str, dict[str, list[float]]] = {"pagerank": {}, "info": {}}  # for the head maps of a run
        n_params = 0
        for pos, b in enumerate(views):
            for what, saved in maps.items():
                if head_key(b, what) in scores:
                    saved[b.path] = [float(v) for v in scores[head_key(b, what)].flatten()]
            if pos < first:
                continue
            key = head_key(b, "pagerank")
            if key not in scores:
                raise ConfigError(f"hifi: no score {key!r}; was the model scored with scorer=hifi?")
            heads[b.path] = top_heads(scores[key], self.heads_for(b.num_heads))
            n_params += 3 * len(heads[b.path]) * b.head_dim * b.dim
        return {"strategy": self.strategy, "k": self.k, "ratio": self.ratio, "heads": heads,
                "trainable_backbone": n_params, "num_heads": max(b.num_heads for b in views), **maps}

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        for b in anatomy.blocks(model):
            chosen = state["heads"].get(b.path)
            if not chosen:
                continue
            layer = b.linear("q")  # the fused qkv (C -> 3C)
            b.set_linear("q", SparseDeltaLinear(layer, qkv_head_indices(b, list(chosen), layer.weight.shape[1])))

    def describe(self, state: State) -> dict[str, Any]:
        return {
            "strategy": state["strategy"],
            "k": state["k"],
            "ratio": state.get("ratio"),
            "heads": {path: list(h) for path, h in state["heads"].items()},
            "trainable_backbone": state["trainable_backbone"],
            "num_heads": state.get("num_heads"),
            "pagerank": state.get("pagerank", {}),
            "info": state.get("info", {}),
        }
