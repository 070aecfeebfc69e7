"""GPS's gradient scores (Zhang et al., "Gradient-based Parameter Selection for Efficient Fine-Tuning", CVPR 2024,
arXiv:2312.10136): |gradient of a supervised-contrastive loss, summed over one pass of the training split|.

    s_n = | sum over batches of d L_supcon(two views of the batch) / d w_n |

As the authors' code: every image of a batch gives two random views (:mod:`peftbench.scorers.views`), both go
through the model in one forward (2B images); L_supcon (Khosla et al., 2020) is computed on the L2-normalised
pre-logit features (the classifier head's input, captured with a forward pre-hook on :func:`anatomy.head`, so no
freshly initialised head is involved) with temperature ``temperature``: for each of the 2B anchors i,
-1/|P(i)| sum_p log(exp(z_i.z_p/T) / sum_{a != i} exp(z_i.z_a/T)) over its positives P(i) (its other view and
every view of a same-label image), averaged over the anchors. Gradients are summed over the batches, as
``loss.backward()`` without ``zero_grad`` over the pass, then the magnitude is taken.

Data: the ``scoring:`` block; conf/scorer/contrastive.yaml sets it to GPS's pass: every training image
(``n_samples: null``) in batches of 16 (the authors' batch on 11 of the 19 VTAB tasks; 32 on the other 8).
The authors shuffle and drop the last partial batch; here the data module's file order is used and every image
counts. Model in ``eval`` mode by default: the authors score in train mode with drop-path 0, which is the same
for a ViT (no dropout, no batch norm); ``train`` keeps drop-path active.

Candidates and output keys are the sensitivity scorer's (:meth:`Sensitivity.candidates`, reused); with
``patch_embedding`` not excluded the patch-embedding conv is scored as its (C, 3*P*P) matrix (GPS's default here).
``augment=false`` scores the images as given (one view each; a batch without a same-label pair contributes 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.scorers.base import Pristine
from peftbench.scorers.sensitivity import MODEL_MODES, Sensitivity, matrix_scores
from peftbench.scorers.views import two_views


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised-contrastive loss of ``features`` (B, D) with ``labels`` (B,); 0 when no positive pair exists."""
    z = F.normalize(features.float(), dim=-1)  # (B, D)
    logits = z @ z.T / temperature  # (B, B)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)  # (B, B)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (B, B), -inf on the diagonal
    pos = (labels[:, None] == labels[None, :]) & ~self_mask  # (B, B)
    n_pos = pos.sum(1)  # (B,)
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(1) / n_pos.clamp(min=1)  # (B,)
    has = n_pos > 0
    return (per_anchor * has).sum() / has.sum().clamp(min=1)


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of ``data.normalize`` = ``name`` (:data:`peftbench.data.base.NORMALIZE`)."""
    from peftbench.data.base import NORMALIZE

    if name not in NORMALIZE:
        raise ConfigError(f"contrastive scorer: normalize={name!r} is unknown; choose one of {sorted(NORMALIZE)}")
    return NORMALIZE[name]


class Contrastive:
    """|sum over batches of the SupCon gradient| of the candidate parameters (GPS's selection scores).

    Args:
        temperature: SupCon temperature (0.07, Khosla et al.; the authors' code).
        model_mode: ``eval`` (default) or ``train``.
        augment: two random views per image (the authors' code); False: the images as given.
        normalize: ``data.normalize`` of the batches (the views are made in [0, 1] pixel space).
        targets, vectors, exclude: candidates, as :class:`~peftbench.scorers.sensitivity.Sensitivity`
            (default here: the block matrices and the patch embedding, no vectors: GPS ranks weight rows).
        seed: seeds the views and, in ``train`` mode, drop-path.

    Returns (from ``__call__``): {key: score tensor} with the sensitivity scorer's keys and shapes, float32.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        model_mode: str = "eval",
        augment: bool = True,
        normalize: str = "imagenet",
        targets: Sequence[str] = anatomy.TARGETS,
        vectors: bool = False,
        exclude: Sequence[str] = ("class_token", "register_tokens", "position_embedding"),
        seed: int = 0,
    ) -> None:
        if model_mode not in MODEL_MODES:
            raise ConfigError(f"unknown model_mode {model_mode!r}; choose from {list(MODEL_MODES)}")
        self.temperature, self.model_mode, self.seed = float(temperature), model_mode, int(seed)
        self.augment = bool(augment)
        self.mean, self.std = normalization(normalize) if self.augment else ((0.0,) * 3, (1.0,) * 3)
        self.candidates = Sensitivity(targets=targets, vectors=vectors, exclude=exclude).candidates

    def __call__(self, model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
        matrices, vectors = self.candidates(model)
        wanted = {name for name, _ in matrices.values()} | set(vectors)
        params = {n: p.detach() for n, p in model.named_parameters() if n in wanted}
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}  # sum of gradients
        captured: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple) -> None:
            captured.append(args[0])  # (B, D) pre-logit features

        def loss(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            functional_call(model, ps, (x,))
            return supcon_loss(captured.pop(), y, self.temperature)

        views = torch.Generator().manual_seed(self.seed)  # CPU generator: the same views on every device
        devices = [dev] if (dev := next(model.parameters()).device).type == "cuda" else []
        handle = anatomy.head(model).register_forward_pre_hook(grab)
        try:
            with Pristine(model), torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                model.train(self.model_mode == "train")
                for x, y in batches:
                    if self.augment:
                        x, y = two_views(x, self.mean, self.std, views), torch.cat([y, y])  # (2B, 3, H, W), (2B,)
                    g = grad(loss)(params, x, y)  # {name: gradient, shaped like the parameter}
                    for n in acc:
                        acc[n] += g[n].detach().float()  # other params (embeddings...) still require grad
        finally:
            handle.remove()
        acc = {n: a.abs() for n, a in acc.items()}
        scores = matrix_scores(acc, matrices)
        scores.update({n: acc[n] for n in vectors})
        return scores
