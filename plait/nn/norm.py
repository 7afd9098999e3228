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


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        # Scale in float32, then cast (the Gemma / M3 order).
        return (h * (1.0 + weight.float())).to(x.dtype)
    # Cast, then scale in the weight's dtype (the Llama / MiMo order).
    return weight * h.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm that saves its input and the per-row 1/rms only: autograd on the plain ops would also
    keep the normalised tensor, one more copy of every normalised activation. The forward runs the
    reference ops, so outputs are bitwise equal."""

    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset = unit_offset
        n = h * rstd
        if unit_offset:
            return (n * (1.0 + weight.float())).to(x.dtype)
        return weight * n.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd
        dy = grad_out.float()
        if ctx.unit_offset:
            grad_n = dy * (1.0 + weight.float())
            grad_w = (dy * n).reshape(-1, n.shape[-1]).sum(0)
        else:
            grad_n = (grad_out * weight).float()
            grad_w = (grad_out * n.to(x.dtype)).float().reshape(-1, n.shape[-1]).sum(0)
        grad_x = rstd * (grad_n - n * (grad_n * n).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None, None


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
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps, self.unit_offset)
        return rms_norm_reference(x, self.weight, self.eps, self.unit_offset)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"
