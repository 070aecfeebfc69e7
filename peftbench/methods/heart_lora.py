"""Heart-LoRA (Zhong and Zhou, "Rethinking Low-Rank Adaptation in Vision: Exploring Head-Level Responsiveness across
Diverse Tasks", 2024, arXiv:2404.08894): LoRA on q and v whose least responsive attention heads are deactivated
after a warm-up.

Follows the appendix (Alg. 1, appendices A, B, D, E) and JieShibo's LoRA (the Bi-LoRA / FacT code): LoRA on q
and v of every block, delta scaled by s, dropout 0.1 on the adapter input. Training runs in ONE fit:

1. warm-up: ``warmup_epochs`` epochs of plain LoRA (all heads active; B starts at zero, so scores taken at
   step 0 would be meaningless);
2. at the start of epoch ``warmup_epochs`` the training hook (:meth:`HeartLoRA.on_epoch_start`) scores every
   head (:func:`head_scores`) on a fresh pass over the scoring batches (``scoring.n_samples`` first training
   images, no augmentation, model in eval mode so dropout does not perturb the scores) and deactivates the chosen
   heads (:func:`choose`): their rows of every up-projection B are DROPPED (:func:`deactivate_heads`, B shrinks to
   the active heads' rows; A stays), the optimizer is rebuilt with the survivors' AdamW state carried over, and
   training continues. Deactivated rows neither train nor drift under weight decay, are not stored in
   ``task.pt`` and are not counted: ViT-B/16, r = 8, ne = 3 of 12 heads trains 258,048 backbone parameters
   (A 147,456 + B 110,592), not LoRA's 294,912.

``protocol=paper`` reports the best test accuracy from the deactivation epoch on (:meth:`first_reportable_epoch`),
never an epoch of the warm-up, when all heads were still active (with ``ne=0`` every epoch counts).

Choices where the appendix is silent (all in ``conf/method/heart_lora.yaml``):

* Which parameters score a head (Alg. 1 ``weight[:, i:i+step]``): the up-projection B rows that write into
  head i (the only adapter parameters that belong to one head; A is shared by all heads of a target).
* q and v together: deactivating head i removes its q AND v rows, so the first-order Taylor estimate of the
  loss change is one sum over both: ``taylor = |sum_{g in targets, rows of head i, r} B * dL/dB|``.
* Gradient: dL/dB averaged over the scoring batches (mean cross-entropy per batch), taken at the weights
  reached after the warm-up. ``weight_norm`` = ||B_head||_2, ``grad_norm`` = ||dL/dB_head||_2 (appendix D),
  ``front`` = heads 0..ne-1 (appendix E's arbitrary deactivation), ``random`` = seeded random scores.
* ``granularity=global`` (the original Heart-LoRA): scores are ACCUMULATED LAYER BY LAYER into one score per
  head index (sum over layers of the per-layer score) and the ne lowest head indices are deactivated in EVERY
  layer. This is our reading of "layer-by-layer accumulation ... the responsiveness of each head is considered
  globally", of Alg. 1's mask ``mask[:, :, i, :, :] = 0`` (a head index without a layer index), of ne in
  {1..11} for 12-head ViT-B, and of appendix B (accumulation restricted to layers with the same head count).
  ``layer`` (Heart-LoRA†): the ne lowest heads of each layer. ``pooled`` (our extra variant): ne x L (layer,
  head) pairs chosen over all layers at once (so layers get different counts; ties broken by layer order; a layer
  that loses every head also freezes its A, which then no longer reaches the output).
* Hierarchical backbones (Swin): ``ratio`` (appendix B) sets ne = floor(ratio * H + 0.5) per group of blocks with
  the same head count H (Swin-B ratio 0.25 -> {1, 2, 4, 8}); accumulation is restricted to each group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.layers.head_lora import HeadLoRALinear
from peftbench.methods.base import Method, ParamMap, State, TrainingContext, freeze

SCORES = ("taylor", "weight_norm", "grad_norm", "front", "random")
GRANULARITIES = ("global", "layer", "pooled")


def head_layers(model: nn.Module) -> dict[str, HeadLoRALinear]:
    """Every :class:`HeadLoRALinear` of ``model`` by its module path, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HeadLoRALinear)}


def mean_grads(model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """dL/dB of every head layer averaged over ``batches`` (mean cross-entropy per batch), model in eval mode.

    Uses ``torch.autograd.grad`` so no ``.grad`` of the training run is touched.
    """
    layers = head_layers(model)
    params = [m.lora_B for m in layers.values()]
    sums = [torch.zeros_like(p) for p in params]
    was_training, n = model.training, 0
    model.eval()
    try:
        with torch.enable_grad():
            for images, labels in batches:
                loss = F.cross_entropy(model(images), labels)
                for s, g in zip(sums, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                    if g is not None:
                        s.add_(g)
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ConfigError("Heart-LoRA: no scoring batches")
    return {name: s / n for name, s in zip(layers, sums, strict=True)}


def head_scores(
    model: nn.Module, score: str, batches: Iterable | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Responsiveness of each head of each head layer: {layer path: (H,) float64}; low = deactivate first."""
    if score not in SCORES:
        raise ConfigError(f"unknown Heart-LoRA score {score!r}; choose one of {SCORES}")
    layers = head_layers(model)
    grads = mean_grads(model, batches) if score in ("taylor", "grad_norm") else {}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in layers.items():
        h = layer.num_heads
        w = layer.head_view(layer.lora_B.detach()).double()  # (G, H, head_dim, r)
        if score == "taylor":
            g = layer.head_view(grads[name]).double()  # (G, H, head_dim, r)
            s = (w * g).sum(dim=(0, 2, 3)).abs()  # (H,): one first-order sum over q and v rows of the head
        elif score == "weight_norm":
            s = w.transpose(0, 1).reshape(h, -1).norm(dim=1)  # (H,)
        elif score == "grad_norm":
            s = layer.head_view(grads[name]).double().transpose(0, 1).reshape(h, -1).norm(dim=1)  # (H,)
        elif score == "front":
            s = torch.arange(h, dtype=torch.float64)  # (H,): head 0 first
        else:
            s = torch.rand(h, generator=gen, dtype=torch.float64)  # (H,)
        out[name] = s.cpu()
    return out


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (stable: ties go to the lower index), sorted."""
    return sorted(torch.argsort(scores, stable=True)[:k].tolist())


def choose(scores: dict[str, torch.Tensor], ne: dict[str, int], granularity: str) -> dict[str, list[int]]:
    """Heads to deactivate per layer.

    Args:
        scores: {layer: (H_layer,)} responsiveness.
        ne: {layer: heads to deactivate in that layer (on average, for ``pooled``)}.
        granularity: ``global`` (accumulate over layers with the same head count, same heads everywhere),
            ``layer`` (per layer) or ``pooled`` (sum of ne over all (layer, head) pairs of a head-count group).
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if granularity == "layer":
        return {name: lowest(s, ne[name]) for name, s in scores.items()}
    groups: dict[int, list[str]] = {}
    for name, s in scores.items():  # appendix B: candidates compared only within layers of one head count
        groups.setdefault(len(s), []).append(name)
    picked: dict[str, list[int]] = {}
    for names in groups.values():
        if granularity == "global":
            heads = lowest(torch.stack([scores[n] for n in names]).sum(0), ne[names[0]])  # (H,) accumulated
            picked.update({n: list(heads) for n in names})
        else:
            flat = torch.cat([scores[n] for n in names])  # (L_group * H,) layer-major
            h = len(scores[names[0]])
            chosen = lowest(flat, sum(ne[n] for n in names))
            picked.update({n: [i % h for i in chosen if i // h == j] for j, n in enumerate(names)})
    return picked


class HeartLoRA(Method):
    """LoRA on q and v with per-head deactivation of the adapter after a warm-up (see the module docstring).

    Args:
        rank: r.
        targets: a subset of q, k, v (the qkv row groups carrying LoRA).
        scale: s (searched over {0.01, 0.1, 1, 10, 100}).
        dropout: dropout on the adapter input (0.1, JieShibo's code).
        ne: heads deactivated per layer (0..H-1); ignored when ``ratio`` is set.
        ratio: fraction of heads deactivated per layer, ne = floor(ratio * H + 0.5) (Swin, appendix B).
        score: taylor | weight_norm | grad_norm | front | random.
        granularity: global | layer | pooled.
        warmup_epochs: epochs of plain LoRA before scoring (default 1: B is zero at step 0; the paper is silent).
        seed: seed of ``score=random``.
    """

    reparameterisable = True

    def __init__(
        self,
        rank: int = 8,
        targets: Sequence[str] = ("q", "v"),
        scale: float = 1.0,
        dropout: float = 0.1,
        ne: int = 1,
        ratio: float | None = None,
        score: str = "taylor",
        granularity: str = "global",
        warmup_epochs: int = 1,
        seed: int = 0,
    ) -> None:
        self.rank, self.targets, self.scale, self.dropout = int(rank), tuple(targets), float(scale), float(dropout)
        if not self.targets or not set(self.targets) <= {"q", "k", "v"}:
            raise ConfigError(f"Heart-LoRA targets must be a non-empty subset of q, k, v; got {self.targets}")
        if score not in SCORES:
            raise ConfigError(f"unknown Heart-LoRA score {score!r}; choose one of {SCORES}")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
        if warmup_epochs < 0:
            raise ConfigError("warmup_epochs must be >= 0")
        self.ne, self.ratio, self.score, self.granularity = int(ne), ratio, score, granularity
        self.warmup_epochs, self.seed = int(warmup_epochs), int(seed)

    @property
    def name(self) -> str:
        return "heart_lora"

    def ne_per_layer(self, model: nn.Module) -> dict[str, int]:
        """{qkv path: heads to deactivate} from ``ne`` (one head count) or ``ratio`` (any head counts)."""
        blocks = [b for b in anatomy.blocks(model) if b.attn is not None]
        counts = {b.num_heads for b in blocks}
        if self.ratio is None and len(counts) > 1:
            raise ConfigError(f"blocks have different head counts {sorted(counts)}: set method.ratio (appendix B)")
        out = {}
        for b in blocks:
            k = math.floor(float(self.ratio) * b.num_heads + 0.5) if self.ratio is not None else self.ne
            if not 0 <= k < b.num_heads:
                raise ConfigError(f"Heart-LoRA deactivates {k} of {b.num_heads} heads in {b.path}; need 0..H-1")
            out[b.linear_path("q")] = k
        return out

    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None) -> State:
        """Before training nothing is chosen: the callback fills ``deactivated``/``scores`` after the warm-up."""
        return {"selected": False, "ne": self.ne_per_layer(model), "deactivated": {}, "scores": {}, "epoch": -1}

    def apply(self, model: nn.Module, state: State) -> None:
        freeze(model)
        for block in anatomy.blocks(model):
            if block.attn is None:
                continue
            rows = [block.rows(t) for t in self.targets]
            layer = HeadLoRALinear(
                block.linear(self.targets[0]), self.rank, rows, block.num_heads, scale=self.scale, dropout=self.dropout
            )
            block.set_linear(self.targets[0], layer)
        deactivate_heads(model, state.get("deactivated", {}))  # a resumed run: the shrunken shapes

    def choose_heads(self, model: nn.Module, state: State, batches: Callable[[], Iterable] | None) -> State:
        """Score the heads and choose the ones to deactivate; return the new state (the model is left as found)."""
        if self.score in ("taylor", "grad_norm") and batches is None:
            raise ConfigError(f"Heart-LoRA score={self.score} needs training batches (a datamodule)")
        scores = head_scores(model, self.score, batches() if batches is not None else None, self.seed)
        deactivated = choose(scores, state["ne"], self.granularity)
        return {**state, "scores": scores, "deactivated": deactivated, "selected": True}

    def deactivate(self, model: nn.Module, state: State, batches: Callable[[], Iterable] | None) -> ParamMap:
        """Score, choose and deactivate in one go, recording the choice in ``state`` (in place; outside a fit).

        Returns the replaced B parameters (see :func:`deactivate_heads`): an optimizer holding the old ones must be
        rebuilt (:func:`peftbench.training.callbacks.carry_optimizer_state`).
        """
        new = self.choose_heads(model, state, batches)
        mapping = deactivate_heads(model, new["deactivated"])
        state.update(new)
        return mapping

    # --- training hooks (driven by peftbench.training.callbacks.MethodHooks) ----------------------------------------
    def on_epoch_start(self, model: nn.Module, state: State, ctx: TrainingContext) -> State | None:
        """At the start of epoch ``warmup_epochs`` (once; resume-safe): score the heads and choose."""
        if state.get("selected") or ctx.epoch < self.warmup_epochs:
            return None
        new = self.choose_heads(model, state, ctx.batches)
        new["epoch"] = int(ctx.epoch)
        ctx.info(
            f"Heart-LoRA: epoch {ctx.epoch}: deactivated {sum(len(v) for v in new['deactivated'].values())} heads "
            f"({self.score}, {self.granularity}): {new['deactivated']}"
        )
        return new

    def update(self, model: nn.Module, old: State, new: State) -> ParamMap | None:
        """Deactivate ``new``'s heads: their B rows are dropped (the mapping carries the survivors' AdamW state)."""
        return deactivate_heads(model, new["deactivated"]) or None

    def first_reportable_epoch(self, state: State) -> int:
        """The epoch the heads were deactivated at (0 with ne = 0; past the fit when it ended before)."""
        if not any(state.get("ne", {}).values()):
            return 0
        return int(state["epoch"]) if state.get("selected") else self.warmup_epochs

    def on_fit_end(self, model: nn.Module, state: State, ctx: TrainingContext) -> State | None:
        if not state.get("selected"):
            ctx.warn(
                f"Heart-LoRA: the fit ended ({ctx.max_epochs} epochs) before epoch warmup_epochs="
                f"{self.warmup_epochs}; no head was deactivated"
            )
        return None

    def describe(self, state: State) -> dict[str, Any]:
        return {
            "score": self.score,
            "granularity": self.granularity,
            "warmup_epochs": self.warmup_epochs,
            "selected": bool(state.get("selected", False)),
            "selected_at_epoch": int(state.get("epoch", -1)),
            "ne": dict(state.get("ne", {})),
            "deactivated": {k: list(v) for k, v in state.get("deactivated", {}).items()},
            "num_deactivated": sum(len(v) for v in state.get("deactivated", {}).values()),
            "scores": {k: [float(x) for x in v] for k, v in state.get("scores", {}).items()},
        }


def deactivate_heads(model: nn.Module, deactivated: dict[str, list[int]]) -> ParamMap:
    """Drop the B rows of {layer path: deactivated heads} in every head layer (absent layers: none).

    Returns {new B: (old B, 1, kept rows)} for every B that was replaced (for optimizer-state carry-over).
    """
    mapping: ParamMap = {}
    for name, layer in head_layers(model).items():
        replaced = layer.set_heads(deactivated.get(name, []))
        if replaced is not None:
            old, kept_rows = replaced
            mapping[layer.lora_B] = (old, 1, kept_rows)
    return mapping
