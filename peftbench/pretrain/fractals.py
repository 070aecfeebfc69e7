"""FractalDB-style formula-driven images: random IFS categories rendered by a vectorised chaos game.

A *category* is an iterated function system of 2-4 affine maps ``x -> A_k x + b_k`` (Kataoka et al., 2020).
The linear parts are sampled through their singular values so that the attractor is neither a dust nor a
blob (Anderson & Farrell, 2022: ``sum_k sigma1_k + 2 sigma2_k`` in ``[(5+N)/2, (6+N)/2]``), and a category is
kept only when its attractor covers enough of the canvas (FractalDB's filling-rate check). Each *image* of a
category perturbs the maps slightly (FractalDB's instance augmentation), flips it, places it at a random scale
and offset and colours each map's points with a random colour on a random dark background.

Everything is numpy, batched over images and chains, and deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_MAPS = 4  # maps per IFS: 2..MAX_MAPS
DENSITY = 2.0  # points per pixel at which coverage reaches 1 - 1/e


@dataclass
class IFS:
    """A batch of iterated function systems, zero-padded to ``MAX_MAPS`` maps (padding has probability 0)."""

    A: np.ndarray  # (C, MAX_MAPS, 2, 2) float64 linear parts
    b: np.ndarray  # (C, MAX_MAPS, 2) float64 offsets
    p: np.ndarray  # (C, MAX_MAPS) float64 map probabilities, rows sum to 1

    def __len__(self) -> int:
        return len(self.A)

    def take(self, index: np.ndarray) -> IFS:
        """Rows ``index`` (e.g. the category of every image in a batch)."""
        return IFS(self.A[index], self.b[index], self.p[index])


def _rotation(theta: np.ndarray) -> np.ndarray:
    """(..., 2, 2) rotation matrices for angles ``theta`` (...)."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _sample_one(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One IFS with singular values scaled to a sigma factor in ``[(5+N)/2, (6+N)/2]``."""
    n = int(rng.integers(2, MAX_MAPS + 1))
    while True:
        alpha = rng.uniform((5 + n) / 2, (6 + n) / 2)
        s1 = rng.uniform(0.2, 1.0, n)
        s2 = s1 * rng.uniform(0.1, 1.0, n)
        scale = alpha / np.sum(s1 + 2 * s2)
        s1, s2 = s1 * scale, s2 * scale
        if s1.max() < 0.98:
            break
    signs = np.where(rng.random((n, 2)) < 0.5, -1.0, 1.0)
    sigma = np.zeros((n, 2, 2))
    sigma[:, 0, 0], sigma[:, 1, 1] = s1 * signs[:, 0], s2 * signs[:, 1]
    A = _rotation(rng.uniform(0, 2 * np.pi, n)) @ sigma @ _rotation(rng.uniform(0, 2 * np.pi, n))
    b = rng.uniform(-1, 1, (n, 2))
    det = np.abs(np.linalg.det(A)) + 1e-3
    pad = MAX_MAPS - n
    A = np.concatenate([A, np.zeros((pad, 2, 2))])
    b = np.concatenate([b, np.zeros((pad, 2))])
    p = np.concatenate([det / det.sum(), np.zeros(pad)])
    return A, b, p


def filling_rate(ifs: IFS, size: int = 32, points: int = 4096, seed: int = 0) -> np.ndarray:
    """Fraction of a ``size`` x ``size`` canvas covered by each IFS's attractor, fitted to the canvas: (C,)."""
    rng = np.random.default_rng(seed)
    pts, _ = chaos_game(ifs, rng, chains=64, steps=8 + points // 64)  # (C, 2, M)
    c = len(ifs)
    ij = _to_pixels(pts, np.ones((c, 1, 1), np.float32), np.zeros((c, 2, 1), np.float32), size)
    hits = np.bincount((np.arange(c)[:, None] * size * size + ij).ravel(), minlength=c * size * size)
    return (hits.reshape(c, -1) > 0).mean(1)


def _to_pixels(pts: np.ndarray, span: np.ndarray, offset: np.ndarray, size: int) -> np.ndarray:
    """Flat pixel index (C, M) of points (C, 2, M) fitted into a canvas.

    The longer side of each point cloud's bounding box covers ``span`` (C, 1, 1) of the canvas; ``offset``
    (C, 2, 1) in [0, 1] places the box in the room left over (0.5 = centred).
    """
    lo, hi = pts.min(2, keepdims=True), pts.max(2, keepdims=True)  # (C, 2, 1)
    extent = (hi - lo).max(1, keepdims=True) + 1e-9  # (C, 1, 1): keep the aspect ratio
    room = 1 - span * (hi - lo) / extent  # (C, 2, 1) free space along x and y
    xy = ((pts - lo) * (span / extent) + offset * room) * (size - 1)  # (C, 2, M) pixel coordinates
    ij = np.clip(xy + 0.5, 0, size - 1e-3).astype(np.int64)
    return ij[:, 1] * size + ij[:, 0]


def sample_categories(num: int, seed: int, min_fill: float = 0.12) -> IFS:
    """``num`` random IFS categories whose attractors fill at least ``min_fill`` of the canvas."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    while len(kept) < num:
        cand = [_sample_one(rng) for _ in range(max(16, 2 * (num - len(kept))))]
        batch = IFS(*(np.stack(x) for x in zip(*cand, strict=True)))
        fill = filling_rate(batch, seed=int(rng.integers(2**31)))
        kept += [c for c, f in zip(cand, fill, strict=True) if f >= min_fill]
    A, b, p = (np.stack(x) for x in zip(*kept[:num], strict=True))
    return IFS(A, b, p)


def chaos_game(
    ifs: IFS, rng: np.random.Generator, chains: int = 64, steps: int = 48, burn_in: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``chains`` chaos-game chains per IFS.

    Returns points (C, 2, chains * (steps - burn_in)) float32 and the map that produced each point
    (C, chains * (steps - burn_in)) int64.
    """
    c = len(ifs)
    a = [ifs.A[:, :, i, j].astype(np.float32) for i in (0, 1) for j in (0, 1)]  # 4 x (C, K)
    b = [ifs.b[:, :, i].astype(np.float32) for i in (0, 1)]  # 2 x (C, K)
    cum = np.cumsum(ifs.p, axis=1)[:, :-1, None]  # (C, K-1, 1) thresholds between maps
    x = rng.uniform(-1, 1, (c, chains)).astype(np.float32)  # (C, P)
    y = rng.uniform(-1, 1, (c, chains)).astype(np.float32)
    kept = steps - burn_in
    pts = np.empty((c, 2, kept, chains), np.float32)
    which = np.empty((c, kept, chains), np.int64)
    for t in range(steps):
        u = rng.random((c, 1, chains))
        k = (u >= cum).sum(1)  # (C, P) map index, drawn with probabilities p
        g = [np.take_along_axis(v, k, 1) for v in a + b]  # 6 x (C, P)
        x, y = g[0] * x + g[1] * y + g[4], g[2] * x + g[3] * y + g[5]
        if t >= burn_in:
            pts[:, 0, t - burn_in], pts[:, 1, t - burn_in], which[:, t - burn_in] = x, y, k
    return pts.reshape(c, 2, -1), which.reshape(c, -1)


def perturb(ifs: IFS, rng: np.random.Generator, strength: float = 0.08) -> IFS:
    """Instance variation: jitter every map's parameters, keep every map contractive."""
    A = ifs.A * (1 + strength * rng.standard_normal(ifs.A.shape))
    norm = np.linalg.norm(A, ord=2, axis=(-2, -1))[..., None, None]  # spectral norm (C, K, 1, 1)
    A = np.where(norm > 0.98, A * 0.98 / np.maximum(norm, 1e-9), A)
    b = ifs.b + strength * rng.standard_normal(ifs.b.shape) * (ifs.p[..., None] > 0)
    return IFS(A, b, ifs.p)


def render(
    ifs: IFS, seed: int, size: int = 32, chains: int = 64, steps: int = 40, variation: bool = True
) -> np.ndarray:
    """Render one image per IFS row: uint8 (C, 3, size, size).

    ``variation`` applies FractalDB-style instance augmentation (parameter jitter, flip, scale, offset,
    colours); without it every image is drawn centred, unflipped, white on black.
    """
    rng = np.random.default_rng(seed)
    c = len(ifs)
    if variation:
        ifs = perturb(ifs, rng)
    pts, which = chaos_game(ifs, rng, chains=chains, steps=steps)  # (C, 2, M), (C, M)
    if variation:
        flip = rng.random(c) < 0.5
        pts[flip, 0] *= -1
        span = rng.uniform(0.55, 1.0, (c, 1, 1)).astype(np.float32)
        offset = rng.uniform(0, 1, (c, 2, 1)).astype(np.float32)
    else:
        span, offset = np.full((c, 1, 1), 0.9, np.float32), np.full((c, 2, 1), 0.5, np.float32)
    pix = _to_pixels(pts, span, offset, size)  # (C, M)
    flat = ((np.arange(c)[:, None] * size * size + pix) * MAX_MAPS + which).ravel()
    counts = np.bincount(flat, minlength=c * size * size * MAX_MAPS).reshape(c, size * size, MAX_MAPS)
    counts = counts.astype(np.float32)  # (C, size*size, K) points of each map in each pixel
    if variation:
        colours = rng.uniform(0.25, 1.0, (c, MAX_MAPS, 3)).astype(np.float32)  # a colour per map, per image
        background = rng.uniform(0.0, 0.35, (c, 1, 3)) * rng.uniform(0, 1, (c, 1, 1))
    else:
        colours, background = np.ones((c, MAX_MAPS, 3), np.float32), np.zeros((c, 1, 3))
    hits = counts.sum(-1, keepdims=True)  # (C, size*size, 1)
    rgb = np.matmul(counts, colours) / np.maximum(hits, 1)  # mean colour of a pixel's points
    cover = 1 - np.exp(-hits / DENSITY)  # soft coverage: dense parts of the measure are brighter
    img = (rgb * cover + background * (1 - cover)).reshape(c, size, size, 3)  # in [0, 1]
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)


def render_dataset(
    categories: IFS, per_category: int, seed: int, size: int = 32, batch: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """``per_category`` varied images of every category: uint8 (C*per_category, 3, size, size), int64 labels."""
    labels = np.repeat(np.arange(len(categories)), per_category)
    images = np.empty((len(labels), 3, size, size), np.uint8)
    for i, start in enumerate(range(0, len(labels), batch)):
        stop = min(start + batch, len(labels))
        images[start:stop] = render(categories.take(labels[start:stop]), seed=seed * 100_003 + i, size=size)
    return images, labels
