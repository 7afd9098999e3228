"""RMSNorm, in the two forms plait's models use.

`unit_offset=False` (Llama, MiMo-V2-Flash): weight initialised to 1, output = weight * normed.
`unit_offset=True` (Gemma, MiniMax-M3): weight initialised to 0, output = (1 + weight) * normed, so a
freshly initialised or weight-decayed norm is the identity scale.

Both compute the statistics in float32 whatever the input dtype. Per-head QK norm is this module
applied to (..., heads, head_dim) tensors with `dim=head_dim`: one weight shared by every head.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm dim: expected a positive size, got {dim}")
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm input: expected last dim {self.weight.shape[0]}, got shape {list(x.shape)}")
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            # Scale in float32, then cast (the Gemma / M3 order).
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        # Cast, then scale in the weight's dtype (the Llama / MiMo order).
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"
