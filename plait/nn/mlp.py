"""Feed-forward blocks: activations and the (gated) MLP.

Gated activations take the concatenated [gate | up] projection (gate half first, the layout of HF's
fused `gate_up_proj`) and return the hidden activation:
- "silu" (SwiGLU):  silu(gate) * up
- "swigluoai":      gate = min(gate, limit); up = clamp(up, -limit, limit);
                    gate * sigmoid(alpha * gate) * (up + 1)        (MiniMax-M3, gpt-oss style)
- any plain activation below: act(gate) * up, as transformers' gated MLPs run whatever `hidden_act` names
  ("gelu", "gelu_tanh": GeGLU; "relu": ReGLU; ...).
Plain (non-gated) MLPs, as in vision towers, take "gelu", "gelu_tanh", "quick_gelu", "silu", "relu", "relu2",
"relu6", "leaky_relu", "sigmoid", "tanh", "mish", "hardswish", "gelu_10" or "linear"; transformers' other names for
these ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate", "gelu_python", "swish") are accepted too.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# the element-wise functions of transformers' ACT2FN that have no parameters, under one name each
_PLAIN_FUNCTIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_10": lambda x: F.gelu(x).clamp(-10.0, 10.0),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,  # nn.LeakyReLU's default slope, 0.01, as ACT2FN builds it
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "linear": lambda x: x,
}
PLAIN_ACTIVATIONS = tuple(_PLAIN_FUNCTIONS)
GATED_ACTIVATIONS = ("swigluoai", *PLAIN_ACTIVATIONS)
# transformers' names (ACT2FN) for the same functions: the tanh approximation of gelu four times over, gelu in
# Python, and swish
HF_ACTIVATION_NAMES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                       "gelu_accurate": "gelu_tanh", "gelu_python": "gelu", "gelu_python_tanh": "gelu_tanh",
                       "swish": "silu"}


@dataclass(frozen=True)
class Activation:
    """Which activation, with the swigluoai constants (`alpha`, `limit`) when it is that one."""

    name: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0
    # per float dtype of the gate's backward, the open interval (low, high) in which swigluoai's clamps pass their
    # gradient: -limit and limit moved one float outward, made here once rather than in every (compiled) backward
    clamp_gradient_bounds: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "name", HF_ACTIVATION_NAMES.get(self.name, self.name))
        if self.name not in set(GATED_ACTIVATIONS) | set(PLAIN_ACTIVATIONS):
            raise ValueError(f"activation: expected one of {sorted(set(GATED_ACTIVATIONS) | set(PLAIN_ACTIVATIONS))}, got {self.name!r}")
        object.__setattr__(self, "clamp_gradient_bounds", {
            dtype: (_next_float(-self.limit, dtype, up=False), _next_float(self.limit, dtype, up=True))
            for dtype in (torch.float32, torch.float64)})

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        if self.name not in _PLAIN_FUNCTIONS:
            raise ValueError(f"activation {self.name!r} is gated-only")
        return _PLAIN_FUNCTIONS[self.name](x)

    def gated(self, gate: torch.Tensor, up: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """act(gate, up), each row times `row_scale` (N,) when given (an MoE's routing weights: the down
        projection is linear, so scaling its input is scaling its output)."""
        if torch.is_grad_enabled() and (
                gate.requires_grad or up.requires_grad or (row_scale is not None and row_scale.requires_grad)):
            if self.name in _FUSED_GATES:
                return _FusedGate.apply(gate, up, row_scale, self)
            out = self.gated_reference(gate, up)
            return out if row_scale is None else _scale_rows(out, row_scale)
        return _gated_values(self, gate, up, row_scale)

    def gated_reference(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The gated activation as plain tensor ops (autograd keeps every intermediate)."""
        if self.name == "swigluoai":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return gate * torch.sigmoid(gate * self.alpha) * (up + 1.0)
        if self.name not in GATED_ACTIVATIONS:
            raise ValueError(f"activation {self.name!r} cannot gate; expected one of {GATED_ACTIVATIONS}")
        return self.plain(gate) * up


_FUSED_GATES = ("silu", "swigluoai")


def _scale_rows(out: torch.Tensor, row_scale: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """out times its row's scale, the product in float32 at least (routing weights are float32), rounded once to
    the activation's dtype. `inplace`: out is a temporary of the caller's, and a float32 one is scaled in place."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    if inplace and out.dtype == dtype:
        return out.mul_(row_scale.unsqueeze(-1))
    return (out.to(dtype) * row_scale.unsqueeze(-1)).to(out.dtype)


def _gated_values(act: Activation, gate: torch.Tensor, up: torch.Tensor,
                  row_scale: torch.Tensor | None) -> torch.Tensor:
    """act(gate, up) * row_scale outside autograd, bitwise equal to `Activation.gated_reference` (then
    `_scale_rows`): the same operations, but each written over a buffer made here, so the (tokens x intermediate)
    work allocates one or two buffers instead of one per operation. On a CPU each fresh buffer is page faults and
    a pass over cold memory; this work runs in every MLP's forward and again in its backward."""
    if act.name == "swigluoai":
        g = gate.clamp(max=act.limit)
        out = torch.mul(g, act.alpha).sigmoid_().mul_(g)  # g * sigmoid(g * alpha): products commute bitwise
        u = torch.clamp(up, min=-act.limit, max=act.limit, out=g).add_(1.0)  # g is done with
        out.mul_(u)
    elif act.name == "silu":
        out = F.silu(gate).mul_(up)
    else:
        out = act.gated_reference(gate, up)
    return out if row_scale is None else _scale_rows(out, row_scale, inplace=True)


class _FusedGate(torch.autograd.Function):
    """silu / swigluoai gating, optionally times a per-row scale, that saves only its inputs and recomputes
    the rest in backward.

    Autograd on the plain ops keeps four more (tokens x intermediate) tensors per MLP (the clamped
    gate, the sigmoid, and two products), and with a row scale the unscaled output too; in an MoE layer
    that is most of its activation memory. The forward runs the same ops as `Activation.gated_reference`,
    so outputs are bitwise equal."""

    @staticmethod
    def forward(ctx, gate, up, row_scale, act: Activation):
        ctx.act = act
        ctx.save_for_backward(gate, up, row_scale)
        return _gated_values(act, gate, up, row_scale)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, row_scale = ctx.saved_tensors
        grad_gate, grad_up, grad_scale = _gate_backward(ctx.act, gate, up, row_scale, grad_out, ctx.needs_input_grad[2])
        return grad_gate, grad_up, grad_scale, None


def _gate_backward(act: Activation, gate, up, row_scale, grad_out, need_scale: bool):
    """Gradients of act(gate, up) * row_scale for gate, up and (when `need_scale`) row_scale."""
    dtype = torch.promote_types(gate.dtype, torch.float32)  # float32 at least; float64 stays (gradcheck)
    g, u, dy = gate.to(dtype), up.to(dtype), grad_out.to(dtype)
    # Both gates are x * sigmoid(a x) = silu(a x) / a of x = g (silu, a = 1) or x = min(g, limit) (swigluoai),
    # whose derivative is silu'(a x): aten's fused silu kernels do the element-wise work in one pass each.
    if act.name == "silu":  # silu(g) * u
        ax, a, u1 = g, 1.0, u
    else:  # min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, -limit, limit) + 1)
        ax, a = g.clamp(max=act.limit).mul_(act.alpha), act.alpha
        u1 = u.clamp(-act.limit, act.limit).add_(1.0)
    # The backward of a wide dense MLP is a peak of the training step, so each (tokens x intermediate) buffer
    # counts: the results go over the buffers this function made itself (swigluoai's clamps), never over its inputs.
    grad_scale = gs = None
    if row_scale is not None:
        if need_scale:
            gs = F.silu(ax)
            if a != 1.0:
                gs.div_(a)
            grad_scale = torch.mul(dy, gs).mul_(u1).sum(dim=-1).to(row_scale.dtype)
        dy = dy * row_scale.unsqueeze(-1)
    dyu = u1.mul_(dy) if u1 is not u else dy * u1
    grad_gate = torch.ops.aten.silu_backward.grad_input(dyu, ax, grad_input=dyu)  # silu'(ax) * dy * u1
    if gs is None:  # else the routing weights' gradient has made it already
        gs = F.silu(ax, inplace=ax is not g)  # ax is done with
        if a != 1.0:
            gs.div_(a)
    grad_up = gs.mul_(dy)  # silu(ax) / a * dy
    if act.name == "swigluoai":  # the clamps pass the gradient only inside their bounds, the bounds included
        below, above = act.clamp_gradient_bounds[dtype]
        _pass_inside(grad_gate, g, float("-inf"), above)
        _pass_inside(grad_up, u, below, above)
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype), grad_scale


def _pass_inside(grad: torch.Tensor, x: torch.Tensor, low: float, high: float) -> None:
    """grad = 0 where x <= low or x >= high, in place: aten's hardtanh backward, one fused pass, where a bool mask
    and masked_fill take two passes and a temporary (ten times slower on a CPU at MoE sizes)."""
    torch.ops.aten.hardtanh_backward.grad_input(grad, x, low, high, grad_input=grad)


def _next_float(value: float, dtype: torch.dtype, up: bool) -> float:
    """The float32 or float64 number next to `value` (a number of that dtype), up or down: hardtanh's backward
    excludes its bounds, a clamp's gradient includes them. Plain Python, no tensors: models are often built under a
    meta device."""
    if dtype == torch.float64:
        return math.nextafter(value, math.inf if up else -math.inf)
    if dtype != torch.float32:
        raise ValueError(f"next float: expected float32 or float64, got {dtype}")
    if value == 0.0:
        return math.copysign(2.0**-149, 1.0 if up else -1.0)  # the smallest float32 subnormal
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    bits += 1 if (value > 0) == up else -1  # one step in magnitude, outward or inward
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x and weight runs in: autocast's where it is on, else the weight's. Functions
    whose backward runs outside autocast cast to it themselves."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class DenseDown:
    """The down projection of a dense MLP for `gated_down`: h @ weight.T. `differentiable` is the autograd
    version; `forward` / `backward` run inside `_GatedDown`, outside autocast, in `dtype`."""

    @staticmethod
    def differentiable(h, weight):
        return F.linear(h, weight)

    @staticmethod
    def forward(h, weight, dtype):
        return h.to(dtype) @ weight.to(dtype).t()

    @staticmethod
    def backward(grad, h, weight, dtype, need_h: bool, need_w: bool):
        grad, h = grad.to(dtype), h.to(dtype)
        grad_h = grad @ weight.to(dtype) if need_h else None
        grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ h.reshape(-1, h.shape[-1])).to(weight.dtype) if need_w else None
        return grad_h, grad_w


def gated_down(act: Activation, gate, up, row_scale, weight, down=DenseDown) -> torch.Tensor:
    """down(act(gate, up) * row_scale) with `down` (`DenseDown`, or the MoE's expert matmul) on `weight`, saving
    gate, up and row_scale but not the activation, which the backward recomputes (one element-wise pass)."""
    if act.name not in _FUSED_GATES or not torch.is_grad_enabled():
        return down.differentiable(act.gated(gate, up, row_scale), weight)
    dtype = matmul_dtype(gate, weight)
    with torch.autocast(gate.device.type, enabled=False):  # the backward runs outside autocast: one dtype for both
        return _GatedDown.apply(gate, up, row_scale, weight, act, down, dtype)


class _GatedDown(torch.autograd.Function):
    """The down projection's weight gradient needs its input, the (tokens x intermediate) activation, which
    autograd would keep beside the gate and up it is made from. The forward runs the ops of `_FusedGate`
    and then `down`, so outputs are bitwise equal to the unfused path."""

    @staticmethod
    def forward(ctx, gate, up, row_scale, weight, act, down, dtype):
        ctx.save_for_backward(gate, up, row_scale, weight)
        ctx.act, ctx.down, ctx.dtype = act, down, dtype
        return down.forward(_gated_values(act, gate, up, row_scale), weight, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, row_scale, weight = ctx.saved_tensors
        act = ctx.act
        h = _gated_values(act, gate, up, row_scale)
        grad_h, grad_w = ctx.down.backward(grad_out, h, weight, ctx.dtype, True, ctx.needs_input_grad[3])
        del h
        grad_gate, grad_up, grad_scale = _gate_backward(act, gate, up, row_scale, grad_h, ctx.needs_input_grad[2])
        return grad_gate, grad_up, grad_scale, grad_w, None, None, None


def on_tokens(ffn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A feed-forward on some tokens only: `ffn` ((N, H) -> (N, H')) on the rows of x (..., H) that `tokens` lists
    (int64 flat indices over x's leading dims, `AttentionMask.real_tokens`), zeros on the other rows. The others are
    padding, which no loss and no real token reads: skipped, they cost no compute and (in an MoE) count toward no
    expert's load."""
    if tokens.dtype != torch.int64 or tokens.ndim != 1:
        raise ValueError(f"tokens: expected 1-D int64 row indices, got {tokens.dtype} of shape {list(tokens.shape)}")
    flat = x.reshape(-1, x.shape[-1])
    out = ffn(flat.index_select(0, tokens))
    whole = out.new_zeros(flat.shape[0], out.shape[-1]).index_copy(0, tokens, out)
    return whole.view(*x.shape[:-1], out.shape[-1])


class MLP(nn.Module):
    """Gated: down(act(gate(x), up(x))) with gate_proj / up_proj / down_proj (the activation is recomputed in
    backward, see `gated_down`). Plain: fc2(act(fc1(x))) with fc1 / fc2 (vision towers)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: Activation | str = "silu",
                 gated: bool = True, bias: bool = False):
        super().__init__()
        if hidden_size <= 0 or intermediate_size <= 0:
            raise ValueError(f"MLP sizes: expected positive hidden and intermediate sizes, got {hidden_size}, {intermediate_size}")
        self.act = Activation(activation) if isinstance(activation, str) else activation
        self.gated = gated
        if gated:
            if self.act.name not in GATED_ACTIVATIONS:
                raise ValueError(f"gated MLP activation: expected one of {GATED_ACTIVATIONS}, got {self.act.name!r}")
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        else:
            if self.act.name not in PLAIN_ACTIVATIONS:
                raise ValueError(f"plain MLP activation: expected one of {PLAIN_ACTIVATIONS}, got {self.act.name!r}")
            self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=bias)
            self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., H) -> (..., H); with `tokens`, only those rows are computed (`on_tokens`)."""
        if tokens is not None:
            return on_tokens(self.forward, x, tokens)
        if not self.gated:
            return self.fc2(self.act.plain(self.fc1(x)))
        gate, up = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        if down.bias is not None or down._forward_hooks or down._forward_pre_hooks:  # the module as it is
            return down(self.act.gated(gate, up))
        return gated_down(self.act, gate, up, None, down.weight)
