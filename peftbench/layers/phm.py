"""Parameterised hypercomplex multiplication (PHM) layers (Zhang et al., 2021; Compacter, Karimi Mahabadi et al., 2021).

    y = x W^T + b,   W = sum_{i=1..n} A_i ⊗ B_i   (out, in),   A_i: (n, n),  B_i: (out/n, in/n)

* PHM: A_i and B_i are free parameters of the layer: n^3 + out*in/n weights.
* Compacter (PHM with low-rank B): B_i = s_i t_i^T with s_i: (out/n, r), t_i: (r, in/n): n*r*(out + in)/n
  = r*(out + in) weights, and the "rule" {A_i} (n^3) is shared by every layer (passed in).

Both add the bias b (out). ``zero=True`` zero-initialises B (PHM) or s (Compacter) and the bias, so W = 0
and the layer outputs exactly 0 at step 0 (the up-projection of an adapter); gradients still flow because
A and t are non-zero.
Initialisation (the papers do not fix it): A_i ~ N(0, 1/n); B_i, s_i, t_i ~ N(0, sigma^2) with sigma chosen so
that entries of W have the variance of nn.Linear's default init, 1 / (3 * in).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.errors import ConfigError
from peftbench.layers.base import MATRIX, VECTOR


def new_rule(n: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Parameter:
    """The PHM "rule" {A_i}: a (n, n, n) parameter, A_i ~ N(0, 1/n)."""
    return nn.Parameter(torch.randn(n, n, n, device=device, dtype=dtype) / math.sqrt(n))


def kron_sum(rule: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """sum_i A_i ⊗ B_i for rule (n, n, n) and factors (n, p, q): a (n*p, n*q) matrix."""
    n, p, q = factors.shape
    return torch.einsum("iab,ipq->apbq", rule, factors).reshape(n * p, n * q)  # row a*p + u, column b*q + v


class PHMLinear(nn.Module):
    """A linear layer whose (out, in) weight is a sum of n Kronecker products.

    Args:
        n_in, n_out: widths; both must be divisible by ``phm_dim``.
        phm_dim: n, the number of Kronecker terms and the size of each A_i.
        rule: a shared (n, n, n) rule parameter (Compacter); None creates a free one for this layer (PHM).
        rank: None: full B_i (PHM); r >= 1: B_i = s_i t_i^T of rank r (Compacter uses r = 1).
        zero: zero-init B (or s) and the bias, so the layer outputs 0 at step 0.
    """

    #: the Kronecker factors build the weight matrix (decayed); the bias is a vector. phm_B or phm_s/phm_t exist.
    param_roles = {"phm_rule": MATRIX, "phm_B": MATRIX, "phm_s": MATRIX, "phm_t": MATRIX, "bias": VECTOR}

    def __init__(
        self,
        n_in: int,
        n_out: int,
        phm_dim: int,
        rule: nn.Parameter | None = None,
        rank: int | None = None,
        zero: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = phm_dim
        if n < 1 or n_in % n or n_out % n:
            raise ConfigError(f"PHM dimension {n} must divide both widths (in={n_in}, out={n_out})")
        self.n_in, self.n_out, self.phm_dim, self.rank = n_in, n_out, n, rank
        p, q = n_out // n, n_in // n
        self.phm_rule = rule if rule is not None else new_rule(n, device, dtype)  # (n, n, n); shared when given
        factory = dict(device=device, dtype=dtype)
        if rank is None:
            std = (1.0 / (3 * n_in)) ** 0.5  # n terms of var 1/n * std^2 -> var(W) = 1 / (3 in)
            b = torch.zeros(n, p, q, **factory) if zero else torch.randn(n, p, q, **factory) * std
            self.phm_B = nn.Parameter(b)  # (n, out/n, in/n)
        else:
            std = (1.0 / (3 * n_in * rank)) ** 0.25  # var(W) = n * (1/n) * rank * std^4 = 1 / (3 in)
            s = torch.zeros(n, p, rank, **factory) if zero else torch.randn(n, p, rank, **factory) * std
            self.phm_s = nn.Parameter(s)  # (n, out/n, r)
            self.phm_t = nn.Parameter(torch.randn(n, rank, q, **factory) * std)  # (n, r, in/n)
        self.bias = nn.Parameter(torch.zeros(n_out, **factory))  # (out,)

    def factors(self) -> torch.Tensor:
        """B_i for all i: (n, out/n, in/n)."""
        return self.phm_B if self.rank is None else torch.bmm(self.phm_s, self.phm_t)

    def dense_weight(self) -> torch.Tensor:
        """The dense (out, in) weight sum_i A_i ⊗ B_i."""
        return kron_sum(self.phm_rule, self.factors())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        kind = "phm" if self.rank is None else f"low-rank {self.rank}"
        return f"in={self.n_in}, out={self.n_out}, phm_dim={self.phm_dim}, {kind}"
