"""RMSNorm, in the two forms plait's models use.

`unit_offset=False` (Llama, MiMo-V2-Flash): weight initialised to 1, output = weight * normed.
`unit_offset=True` (Gemma, MiniMax-M3): weight initialised to 0, output = (1 + weight) * normed, so a
freshly initialised or weight-decayed norm is the identity scale.

Both compute the statistics in float32 whatever the input dtype. Per-head QK norm is this module
applied to (..., heads, head_dim) tensors with `dim=head_dim`: one weight shared by every head.
"""

from __future__ import annotations

import math

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


# Below this, a scale is treated as zero: the normalised value it multiplies cannot be read back from the output.
_SMALLEST_INVERTIBLE_SCALE = 1e-20


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm that keeps one activation and the per-row 1/rms for its backward, not also the normalised tensor
    (as autograd on the plain ops would).

    The activation kept is the output when every scale is invertible (`keep_output`): the layers after a norm keep
    that same tensor for their own backward (a linear keeps its input), so it costs nothing more, and the
    normalised values are read back as output / scale (apex's memory-efficient norm does the same). A norm with a
    zero scale keeps its input instead. The forward runs the reference ops, so outputs are bitwise equal."""

    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset, keep_output):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        n = h * rstd
        out = (n * (1.0 + weight.float())).to(x.dtype) if unit_offset else weight * n.to(x.dtype)
        ctx.save_for_backward(out if keep_output else x, weight, rstd)
        ctx.unit_offset, ctx.keep_output = unit_offset, keep_output
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kept, weight, rstd = ctx.saved_tensors
        scale = (1.0 + weight.float()) if ctx.unit_offset else weight.float()
        n = kept.float() / scale if ctx.keep_output else kept.float() * rstd
        dy = grad_out.float()
        if ctx.unit_offset:
            grad_n = dy * scale
            grad_w = (dy * n).reshape(-1, n.shape[-1]).sum(0)
        else:
            grad_n = (grad_out * weight).float()
            grad_w = (grad_out * n.to(kept.dtype)).float().reshape(-1, n.shape[-1]).sum(0)
        grad_x = rstd * (grad_n - n * (grad_n * n).mean(-1, keepdim=True))
        return grad_x.to(kept.dtype), grad_w.to(weight.dtype), None, None, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm dim: expected a positive size, got {dim}")
        if not (eps >= 0 and math.isfinite(eps)):  # a negative eps can take the root of a negative mean square
            raise ValueError(f"RMSNorm eps (rms_norm_eps): expected a finite number >= 0, got {eps!r}")
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self._invertible: tuple = ((), False)  # accelerators: ((weight id, address, version), verdict)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm input: expected last dim {self.weight.shape[0]}, got shape {list(x.shape)}")
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps, self.unit_offset, self._scale_invertible())
        return rms_norm_reference(x, self.weight, self.eps, self.unit_offset)

    def _scale_invertible(self) -> bool:
        """Whether every scale is far enough from zero to read the normalised values back from the output. On the
        CPU checked at every call (microseconds). On an accelerator the check waits for the device, so it is made
        once per weight tensor and version (each optimizer step, load or in-place update makes a new one; writes
        through `weight.data`, which bypass the version counter, are not seen)."""
        if torch.compiler.is_compiling():
            # a compiled graph cannot branch on a value: keep the input, which is right for any scale
            return False
        w = self.weight
        if w.device.type != "cpu":
            key, verdict = self._invertible
            if key == (id(w), w.data_ptr(), w._version):
                return verdict
        scale = (1.0 + w.detach().float()) if self.unit_offset else w.detach().float()
        verdict = bool(scale.abs().min() >= _SMALLEST_INVERTIBLE_SCALE)
        if w.device.type != "cpu":
            self._invertible = ((id(w), w.data_ptr(), w._version), verdict)
        return verdict

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"
