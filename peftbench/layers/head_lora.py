"""LoRA on q/k/v row groups of a fused qkv whose up-projection exists only for the active attention heads.

    y = qkv(x);  y[..., rows_g(active heads)] += scale * dropout(x) @ A_g^T @ B_g^T

Heart-LoRA deactivates heads (its mask P on the adapter output, Alg. 1's ``mask[:, :, i, :, :] = 0``). Here a
deactivated head's rows are DROPPED: :meth:`HeadLoRALinear.set_heads` replaces ``B`` (G, H * head_dim, r) by the
rows of the active heads, (G, H_active * head_dim, r), and restricts the row index the delta is added at. Its delta
is therefore exactly zero in the forward, in ``delta_weight``/merge and for the gradient of ``A``, its rows neither
train nor drift under weight decay, and neither the parameter count nor the task file holds them. ``A`` is shared
by all heads of a group and stays (frozen only if no head of the layer is left).
"""

from __future__ import annotations

import torch
from torch import nn

from peftbench.errors import ConfigError
from peftbench.layers.lora import LoRALinear


class HeadLoRALinear(LoRALinear):
    """A :class:`LoRALinear` over q/k/v row groups whose ``B`` rows exist only for the active attention heads.

    Args:
        base_layer: the frozen fused qkv nn.Linear(C, 3C).
        rank: LoRA rank r.
        row_groups: one index tensor per target (q, k, v rows of qkv, each of size C, head-major).
        num_heads: H; each group's C rows split into H consecutive slices of C / H rows.
        scale: s.
        dropout: dropout on the adapter's input.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        row_groups: list[torch.Tensor],
        num_heads: int,
        scale: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer, rank, row_groups, scale=scale, dropout=dropout)
        out_g = self.lora_B.shape[1]
        if out_g % num_heads:
            raise ConfigError(f"{out_g} rows per group do not split into {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, out_g // num_heads
        self.active_heads: list[int] = list(range(num_heads))  # the heads whose rows B holds, in row order

    def set_heads(self, deactivated: list[int] | torch.Tensor) -> tuple[nn.Parameter, torch.Tensor] | None:
        """Drop the ``B`` rows of the ``deactivated`` heads (those still active); the delta must not be merged.

        Returns ``(old B, kept rows along B's dim 1)`` when ``B`` was replaced (for optimizer-state carry-over),
        else None.
        """
        if self.merged:
            raise RuntimeError("unmerge before changing the active heads")
        dead = {int(h) for h in (deactivated.tolist() if isinstance(deactivated, torch.Tensor) else deactivated)}
        keep = [i for i, h in enumerate(self.active_heads) if h not in dead]
        if len(keep) == len(self.active_heads):
            return None
        old = self.lora_B
        starts = torch.tensor(keep, dtype=torch.long, device=old.device)[:, None] * self.head_dim  # (H_keep, 1)
        kept_rows = (starts + torch.arange(self.head_dim, device=old.device)).flatten()  # (H_keep * head_dim,)
        groups = old.shape[0]
        self.lora_rows = self.lora_rows.view(groups, -1)[:, kept_rows].flatten()  # (G * H_keep * head_dim,)
        self.lora_B = nn.Parameter(old.detach()[:, kept_rows].clone(), requires_grad=old.requires_grad)
        self.active_heads = [self.active_heads[i] for i in keep]
        if not keep:  # no head left: A no longer reaches the output
            self.lora_A.requires_grad_(False)
        return old, kept_rows

    def deactivated(self) -> list[int]:
        """Indices of the deactivated heads."""
        return sorted(set(range(self.num_heads)) - set(self.active_heads))

    def head_view(self, t: torch.Tensor) -> torch.Tensor:
        """A (G, rows, r) tensor (B or its gradient) seen per active head: (G, H_active, head_dim, r)."""
        groups, rows, rank = t.shape
        return t.reshape(groups, rows // self.head_dim, self.head_dim, rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.num_heads}, deactivated={self.deactivated()}"
