"""LoRA whose factors are binarised to 1 bit in the forward (Bi-LoRA: Jie et al., ICCV 2023).

    A_b = offset_A + scale_A * sign(A - offset_A),  B_b likewise, one (scale, offset) per matrix
    y[..., rows_g] += s * dropout(x @ A_b,g^T) @ B_b,g^T         for each row group g (q, v of a fused qkv)

Quantizers: ``gaussian`` (default, the authors' code: offset mean(W), scale Phi^-1(0.75) * std(W), the 1-bit
quantile code of a normalised Gaussian weight) and ``mean_abs`` (offset 0, scale mean|W|, XNOR-Net style).
Gradients reach the latent float factors through a straight-through estimator on the standardised weight, as the
authors write it (their ``QLinear``):

    w_n = (W - mean) / (std + 1e-5);   W_b = (q(w_n) + w_n - sg(w_n)) * std + mean,   q(z) = +-Phi^-1(0.75)

with the LIVE mean and std, so the gradient also flows through the per-matrix statistics
(dW_b/dW = I + (q - w_n) dstd/dW, up to the 1e-5). ``mean_abs`` uses the plain identity STE (its scale is a
constant in the backward). ``pack()`` stores the signs at 1 bit per weight plus float32 scales (and offsets);
``load_packed()`` makes the layer use exactly the decoded factors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.errors import ConfigError
from peftbench.layers.lora import LoRALinear

GAUSS_1BIT = 0.6744897501960817  # Phi^-1(0.75): the authors' 1-bit code for a standardised weight is +-this
QUANTIZERS = ("mean_abs", "gaussian")


def binary_code(w: torch.Tensor, quantizer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-matrix 1-bit code of a stack of matrices ``w`` (G, a, b): bits (G, a, b) bool, scale (G,), offset (G,)."""
    flat = w.detach().flatten(1)  # (G, a*b)
    if quantizer == "mean_abs":
        offset, scale = torch.zeros_like(flat[:, 0]), flat.abs().mean(1)
    elif quantizer == "gaussian":
        offset, scale = flat.mean(1), flat.std(1) * GAUSS_1BIT
    else:
        raise ConfigError(f"unknown quantizer {quantizer!r}; choose from {list(QUANTIZERS)}")
    bits = flat >= offset[:, None]  # True = +1, False = -1
    return bits.view_as(w), scale, offset


def decode(bits: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """offset + scale * (+-1) per matrix: bits (G, a, b), scale (G,), offset (G,) -> (G, a, b)."""
    signs = bits.to(scale.dtype) * 2 - 1
    return offset[:, None, None] + scale[:, None, None] * signs


def ste_binarise(w: torch.Tensor, quantizer: str) -> torch.Tensor:
    """The binarised stack ``w`` (G, a, b) in value (exactly ``decode(*binary_code(w, quantizer))``) with the
    quantizer's straight-through backward (see the module docstring)."""
    if quantizer != "gaussian":
        return decode(*binary_code(w, quantizer)) + (w - w.detach())  # identity backward; w - sg(w) is exactly 0
    flat = w.flatten(1)  # (G, a*b)
    mean, std = flat.mean(1)[:, None, None], flat.std(1)[:, None, None]  # (G, 1, 1), live
    w_n = (w - mean) / (std + 1e-5)  # standardised, (G, a, b)
    q = GAUSS_1BIT * ((w_n.detach() >= 0).to(w.dtype) * 2 - 1)  # the 1-bit code +-0.674, no gradient
    return (q + (w_n - w_n.detach())) * std + mean


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 (ceil(numel / 8),), most significant bit first."""
    flat = F.pad(bits.flatten().to(torch.uint8), (0, -bits.numel() % 8))  # (8k,)
    weights = 2 ** torch.arange(7, -1, -1, device=bits.device)  # 128 ... 1
    return (flat.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (k,) -> bool tensor of ``shape``."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed[:, None] >> shifts) & 1  # (k, 8)
    return bits.flatten()[: shape.numel()].view(shape).bool()


class BinaryLoRALinear(LoRALinear):
    """A LoRA adapter (see :class:`LoRALinear`) with 1-bit factors; merge/unmerge fold the binarised delta.

    Args:
        base_layer, rank, row_groups, scale: as LoRALinear.
        dropout: dropout on the rank-r hidden ``x @ A_b^T`` (the authors' code; their adapter has no activation).
        init: ``trunc_normal`` (B ~ N(0, 1e-3^2) truncated to +-2e-3, the authors' binary variant: the step-0
            delta is not zero) or ``zeros`` (B = 0: exact identity at step 0). A keeps LoRA's Kaiming-uniform init.
        quantizer: ``gaussian`` (the authors') or ``mean_abs`` (see the module docstring).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        row_groups: list[torch.Tensor] | None = None,
        scale: float = 1.0,
        dropout: float = 0.1,
        init: str = "trunc_normal",
        quantizer: str = "gaussian",
    ) -> None:
        super().__init__(base_layer, rank, row_groups, scale=scale, dropout=dropout)
        if quantizer not in QUANTIZERS:
            raise ConfigError(f"unknown quantizer {quantizer!r}; choose from {list(QUANTIZERS)}")
        if init == "trunc_normal":
            nn.init.trunc_normal_(self.lora_B, std=1e-3, a=-2e-3, b=2e-3)
        elif init != "zeros":
            raise ConfigError(f"unknown Bi-LoRA init {init!r}; choose trunc_normal or zeros")
        self.quantizer = quantizer
        self.register_buffer("lora_A_bin", None, persistent=False)  # decoded factors after load_packed()
        self.register_buffer("lora_B_bin", None, persistent=False)

    def binary_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_b (G, r, in) and B_b (G, out_g, r): decoded from a pack if loaded, else binarised with the STE."""
        if self.lora_A_bin is not None:
            return self.lora_A_bin, self.lora_B_bin
        return ste_binarise(self.lora_A, self.quantizer), ste_binarise(self.lora_B, self.quantizer)

    factors = binary_factors  # LoRALinear's forward, delta_weight and merge then use the 1-bit factors

    def hidden(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(..., G, r): dropout acts on the rank-r hidden here, as in the authors' code."""
        return self.lora_dropout((x @ a.flatten(0, 1).T).unflatten(-1, a.shape[:2]))

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        """1-bit storage: ``{A,B}_bits`` uint8 (ceil(numel / 8),), ``{A,B}_scale`` (G,) and, if gaussian,
        ``{A,B}_offset`` (G,)."""
        packed = {}
        for name, w in (("A", self.lora_A), ("B", self.lora_B)):
            bits, scale, offset = binary_code(w, self.quantizer)
            packed[f"{name}_bits"], packed[f"{name}_scale"] = pack_bits(bits), scale.clone()
            if self.quantizer == "gaussian":
                packed[f"{name}_offset"] = offset.clone()
        return packed

    @torch.no_grad()
    def load_packed(self, packed: dict[str, torch.Tensor]) -> None:
        """Compute with the factors decoded from :meth:`pack` from now on (deployment; set ``lora_A_bin = None``
        and ``lora_B_bin = None`` to binarise the latent factors again)."""
        for name, w in (("A", self.lora_A), ("B", self.lora_B)):
            scale = packed[f"{name}_scale"].to(w.device)
            offset = packed[f"{name}_offset"].to(w.device) if f"{name}_offset" in packed else torch.zeros_like(scale)
            bits = unpack_bits(packed[f"{name}_bits"].to(w.device), w.shape)
            setattr(self, f"lora_{name}_bin", decode(bits, scale, offset))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantizer={self.quantizer}, bits=1"
