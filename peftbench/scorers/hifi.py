"""HiFi's head importance (Gui & Xiao, "HiFi: High-Information Attention Heads Hold for Parameter-Efficient
Model Adaptation", ACL 2023; Eq. 1-10, Alg. 1-2), applied to ViT heads (the paper is NLP-only).

Per block (layer), from the per-head outputs O_h(x) (N x D, tokens x head width; :mod:`peftbench.backbones.heads`):

* Information richness (Eq. 2-3): I_h(x) = smallest t with sum_{i<=t} sigma_i / sum_j sigma_j >= xi over the
  singular values of O_h(x); I_h = mean over the n scoring samples. Batched ``torch.linalg.svdvals``.
* Correlation (Eq. 4-7): O'_h = O_h averaged over the token (sequence) axis, a D-vector; r(x) = |unbiased
  covariance over the D entries of O'_h and O'_h'| (divide by D-1), diagonal 0; R = mean over samples of r(x)
  (the absolute value is taken per sample, before averaging, as Eq. 5 then Eq. 7 say).
* PageRank (Eq. 8-10, Alg. 2): P(0) = I / sum(I); m_{h,h'} = r_{h,h'} / sum_{h''!=h} r_{h,h''} is "the
  probability of moving from h to h'" (each row of M sums to 1). A probability-preserving Markov step moves mass
  along those edges, p_{h'} <- d * sum_h m_{h,h'} p_h + teleport: we iterate with M^T (Eq. 10's "M P" read with
  M's rows as out-edges; R is symmetric, so M^T = R normalised by column). This is networkx.pagerank's
  convention on the weighted graph R, used as the test reference. Iterate until ||P(t+1) - P(t)||_1 <= eps or
  ``max_iter`` steps.

  ``teleport=uniform`` (faithful Eq. 10): teleport (1-d)/H. Its fixed point does not depend on P(0) (a damped
  Markov chain with d < 1 has one stationary distribution), so I_h changes the result only through early
  stopping. ``teleport=information``: teleport (1-d) * I / sum(I) (personalised PageRank; I_h >= 1 always, so
  the normalisation is a plain sum).
  A head whose correlations are all 0 (dangling node) jumps by the teleport vector, as networkx does.

Choices where the paper is silent: the model is scored in eval mode (no dropout / drop-path) under no_grad;
every token (cls and patches) counts as a sequence position; d = 0.85 (standard PageRank; the paper sweeps d
without stating its default); all samples the ``scoring:`` block provides are used (the paper: n ~ 300).
Hierarchical backbones (Swin, new here): attention runs per window, so ``proj`` sees (B * windows, N_w, H*D);
every window is one sequence and I_h, R are averaged over all windows of all images (stage by stage, each with
its own head count).

Returns per attention block ``<block path>.attn:pagerank`` (H,) p*_h (what ``method=hifi`` ranks),
``<block path>.attn:info`` (H,) mean I_h, ``<block path>.attn:corr`` (H, H) R; float32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from peftbench.backbones import anatomy
from peftbench.backbones.heads import capture_heads
from peftbench.errors import ConfigError
from peftbench.scorers.base import Pristine

TELEPORTS = ("uniform", "information")


def head_key(block: anatomy.BlockView, what: str = "pagerank") -> str:
    """Score key of a block's per-head quantity ``what`` (pagerank, info, corr)."""
    return f"{block.path}.attn:{what}"


def information_richness(o: torch.Tensor, xi: float = 0.9) -> torch.Tensor:
    """Eq. 2 per sample and head: o (B, N, H, D) -> I (B, H) int64 in [1, min(N, D)]."""
    s = torch.linalg.svdvals(o.transpose(1, 2).double())  # (B, H, T), T = min(N, D), descending
    total = s.sum(-1, keepdim=True)  # (B, H, 1)
    ratio = s.cumsum(-1) / total.clamp_min(torch.finfo(s.dtype).tiny)  # (B, H, T)
    t = (ratio < xi).sum(-1) + 1  # smallest t with ratio_t >= xi (ratio is non-decreasing)
    return t.clamp(max=s.shape[-1])


def head_correlation(o: torch.Tensor) -> torch.Tensor:
    """Eq. 5-6 per sample: o (B, N, H, D) -> |unbiased cov| (B, H, H) over the D entries of the token mean, diag 0."""
    m = o.double().mean(1)  # (B, H, D): O'_h, averaged over the sequence axis
    c = m - m.mean(-1, keepdim=True)  # (B, H, D) centred over the D entries
    r = (c @ c.transpose(1, 2)).abs() / (o.shape[-1] - 1)  # (B, H, H)
    return r * (1 - torch.eye(o.shape[2], dtype=r.dtype, device=r.device))  # r_{h,h} = 0


def pagerank(
    info: torch.Tensor,
    corr: torch.Tensor,
    d: float = 0.85,
    eps: float = 1e-6,
    max_iter: int = 100,
    teleport: str = "uniform",
) -> tuple[torch.Tensor, int]:
    """Eq. 8-10 / Alg. 2 for one layer: info (H,), corr (H, H) -> (P* (H,) summing to 1, iterations run)."""
    if teleport not in TELEPORTS:
        raise ConfigError(f"unknown teleport {teleport!r}; choose from {list(TELEPORTS)}")
    info, corr = info.double().flatten(), corr.double()
    h = info.numel()
    p0 = info / info.sum()  # Eq. 8, (H,)
    v = p0 if teleport == "information" else torch.full_like(p0, 1.0 / h)  # teleport distribution (H,)
    out = corr.sum(1, keepdim=True)  # (H, 1) sum_{h''!=h} r_{h,h''} (diagonal is 0)
    m = torch.where(out > 0, corr / out.clamp_min(torch.finfo(corr.dtype).tiny), v.unsqueeze(0))  # Eq. 9 rows
    step = m.T  # (H, H) column-stochastic: step[h', h] = m_{h,h'}, mass moving h -> h'
    p1 = d * step @ p0 + (1 - d) * v  # Eq. 10 (uniform: (1-d)/H * 1)
    iters = 1
    while float((p1 - p0).abs().sum()) > eps and iters < max_iter:  # Alg. 2, L1 norm
        p0, p1 = p1, d * step @ p1 + (1 - d) * v
        iters += 1
    return p1, iters


class HiFi:
    """HiFi head scores per attention block (see the module docstring).

    Args:
        xi: singular-value mass threshold of Eq. 2 (0.9 in the paper).
        d: PageRank damping factor.
        eps: L1 tolerance of Alg. 2's stopping rule.
        max_iter: cap on PageRank iterations.
        teleport: ``uniform`` (faithful Eq. 10) or ``information`` (normalised I_h as personalisation vector).
    """

    def __init__(
        self, xi: float = 0.9, d: float = 0.85, eps: float = 1e-6, max_iter: int = 100, teleport: str = "uniform"
    ) -> None:
        if teleport not in TELEPORTS:
            raise ConfigError(f"unknown teleport {teleport!r}; choose from {list(TELEPORTS)}")
        if not 0 < xi <= 1:
            raise ConfigError(f"xi must lie in (0, 1], got {xi}")
        self.xi, self.d, self.eps = float(xi), float(d), float(eps)
        self.max_iter, self.teleport = int(max_iter), teleport

    def statistics(self, model: nn.Module, batches: Iterable) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Alg. 1: {block index: (mean I_h (H,), mean R (H, H))} over every sample of ``batches``."""
        views = {b.index: b for b in anatomy.blocks(model) if b.attn is not None}
        sums: dict[int, list[torch.Tensor]] = {}
        sequences: dict[int, int] = {}  # per block: images (ViT) or windows of all images (Swin)
        device = next(model.parameters()).device
        with Pristine(model), torch.no_grad():
            model.eval()
            for x, _ in batches:
                with capture_heads(model) as captured:
                    model(x.to(device))
                for i, outs in captured.items():
                    o = outs[0]  # (S, N, H, D): S = B sequences (ViT) or B * windows (Swin)
                    info = information_richness(o, self.xi).double().sum(0)  # (H,)
                    corr = head_correlation(o).sum(0)  # (H, H)
                    if i in sums:
                        sums[i][0] += info
                        sums[i][1] += corr
                    else:
                        sums[i] = [info, corr]
                    sequences[i] = sequences.get(i, 0) + o.shape[0]
        if not sequences:
            raise ConfigError("hifi scorer got no samples: check the scoring block (scoring.n_samples)")
        return {i: (s[0] / sequences[i], s[1] / sequences[i]) for i, s in sums.items() if i in views}

    def __call__(self, model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
        views = {b.index: b for b in anatomy.blocks(model) if b.attn is not None}
        scores: dict[str, torch.Tensor] = {}
        for i, (info, corr) in self.statistics(model, batches).items():
            p, _ = pagerank(info, corr, self.d, self.eps, self.max_iter, self.teleport)
            b = views[i]
            scores[head_key(b, "pagerank")] = p.float().cpu()
            scores[head_key(b, "info")] = info.float().cpu()
            scores[head_key(b, "corr")] = corr.float().cpu()
        return scores
