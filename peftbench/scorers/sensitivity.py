"""SPT's parameter sensitivity (He et al., ICCV 2023, Algorithm 1): s_n = sum over samples of g_n^2.

g_n is the gradient of the cross-entropy loss w.r.t. parameter entry n. Two modes:

* ``per_sample`` (the paper, Alg. 1): one gradient per sample, squared, summed over the C samples. Computed
  with ``torch.func.vmap(grad(...))`` in chunks of ``chunk_size`` samples (memory: chunk_size x candidates).
* ``per_batch`` (the authors' code): the gradient of the batch-MEAN loss, squared, summed over batches;
  C = 512 as 16 batches of 32 comes from the ``scoring:`` block of conf/train.yaml.

Candidates (the authors' code): the q, k, v (row slices of the fused qkv), proj, fc1, fc2 weight matrices of every
block, plus every 1-D parameter (norm weights/biases, linear biases); parameters whose name starts with an
``exclude`` entry (cls_token, patch_embed, pos_embed, ...) and the classifier head are never scored. When
``patch_embed`` is not excluded, the patch-embedding conv weight is a matrix candidate too, scored as the
(C, 3*P*P) matrix :func:`~peftbench.backbones.anatomy.patch_embedding_matrix` (GPS's authors select its rows). The model
is scored as given: ``prepare_model`` hands it over with its freshly initialised head, as the authors' code does.
Gradients come from ``torch.func`` on detached copies, so no ``.grad`` is touched; modes are restored by
:class:`~peftbench.scorers.base.Pristine`. Randomness (drop-path in train mode) is seeded from ``seed`` inside
a forked RNG, so scores are bit-identical across calls on CPU and the global RNG is left untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from peftbench.backbones import anatomy
from peftbench.errors import ConfigError
from peftbench.scorers.base import Pristine, matrix_key, patch_key

MODES = ("per_sample", "per_batch")
MODEL_MODES = ("train", "eval")


def matrix_scores(
    acc: dict[str, torch.Tensor], matrices: dict[str, tuple[str, torch.Tensor | None]]
) -> dict[str, torch.Tensor]:
    """{matrix key: (d, c) score} from per-parameter accumulators: q/k/v row slices, conv weights as matrices."""
    out = {}
    for key, (name, rows) in matrices.items():
        a = anatomy.patch_embedding_matrix(acc[name]) if acc[name].ndim > 2 else acc[name]  # conv: (C, 3*P*P)
        out[key] = a if rows is None else a[rows]
    return out


class Sensitivity:
    """Accumulated squared gradients of the candidate parameters (SPT Alg. 1).

    Args:
        mode: ``per_batch`` (authors' code, default) or ``per_sample`` (the paper).
        model_mode: ``train`` (drop-path/dropout active, as the authors' code) or ``eval``.
        targets: matrices to score, any of q, k, v, proj, fc1, fc2.
        vectors: whether to score 1-D parameters (norms and biases).
        exclude: parameter-name prefixes (first dotted component or full name) never scored.
        chunk_size: samples per vmap call in ``per_sample`` mode.
        seed: seeds drop-path/dropout randomness during scoring.

    Returns (from ``__call__``): {key: score tensor}, key = :func:`matrix_key` for matrices (a q/k/v score has
    the slice's shape (C, C)), the parameter name for vectors; float32, on the model's device.
    """

    def __init__(
        self,
        mode: str = "per_batch",
        model_mode: str = "train",
        targets: Sequence[str] = anatomy.TARGETS,
        vectors: bool = True,
        exclude: Sequence[str] = ("cls_token", "reg_token", "pos_embed", "patch_embed"),
        chunk_size: int = 8,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown sensitivity mode {mode!r}; choose from {list(MODES)}")
        if model_mode not in MODEL_MODES:
            raise ConfigError(f"unknown model_mode {model_mode!r}; choose from {list(MODEL_MODES)}")
        self.mode, self.model_mode, self.targets = mode, model_mode, tuple(targets)
        self.vectors, self.exclude = bool(vectors), tuple(exclude)
        self.chunk_size, self.seed = int(chunk_size), int(seed)

    def _excluded(self, model: nn.Module, name: str) -> bool:
        return anatomy.is_head_param(model, name) or name in self.exclude or name.split(".")[0] in self.exclude

    def candidates(self, model: nn.Module) -> tuple[dict[str, tuple[str, torch.Tensor | None]], list[str]]:
        """({matrix key: (parameter name, rows or None)}, [vector parameter names])."""
        name_of = {id(p): n for n, p in model.named_parameters()}
        matrices: dict[str, tuple[str, torch.Tensor | None]] = {}
        for block, target in anatomy.iter_linear_targets(model, self.targets):
            name = name_of[id(block.linear(target).weight)]
            if not self._excluded(model, name):
                matrices[matrix_key(block, target)] = (name, block.rows(target))
        conv = anatomy.patch_embedding(model)
        if conv is not None and not self._excluded(model, name := name_of[id(conv.weight)]):
            matrices[patch_key(model)] = (name, None)  # its score is the (C, 3*P*P) matrix view
        vectors = []
        if self.vectors:
            vectors = [n for n, p in model.named_parameters() if p.ndim == 1 and not self._excluded(model, n)]
        return matrices, vectors

    def __call__(self, model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
        matrices, vectors = self.candidates(model)
        wanted = {name for name, _ in matrices.values()} | set(vectors)
        params = {n: p.detach() for n, p in model.named_parameters() if n in wanted}  # differentiated copies
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}  # sum of g^2 per param

        def loss(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, ps, (x,)), y)  # x (B,3,H,W), y (B,): mean over B

        def sample_loss(ps: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss(ps, x.unsqueeze(0), y.unsqueeze(0))  # x (3,H,W), y (): one sample

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
        devices = [model_device] if (model_device := next(model.parameters()).device).type == "cuda" else []
        with Pristine(model), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            # vmap over SDPA falls back to a per-sample loop inside torch; exact, only slower: keep quiet
            warnings.filterwarnings("ignore", message="There is a performance drop")
            torch.manual_seed(self.seed)
            model.train(self.model_mode == "train")
            for x, y in batches:
                if self.mode == "per_batch":  # authors' code (default); per_sample is the paper's Alg. 1
                    # plain autograd on leaf copies: the same gradient as torch.func.grad, without its per-op
                    # wrapping (1.7x faster on vit_micro); {name: grad of the batch-mean loss}, shaped like the param
                    leaves = {n: p.requires_grad_(True) for n, p in params.items()}
                    g = dict(zip(leaves, torch.autograd.grad(loss(leaves, x, y), list(leaves.values()))))
                    for n in acc:
                        acc[n].addcmul_(g[n], g[n])
                else:
                    for xc, yc in zip(x.split(self.chunk_size), y.split(self.chunk_size)):
                        g = per_sample(params, xc, yc)  # {name: (chunk, *param shape)}
                        for n in acc:
                            acc[n] += g[n].float().square().sum(0)
        scores = matrix_scores(acc, matrices)
        scores.update({n: acc[n] for n in vectors})
        return {key: value.detach() for key, value in scores.items()}  # plain tensors, no autograd history
