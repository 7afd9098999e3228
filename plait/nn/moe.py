"""Mixture of experts: router, dropless grouped experts, shared experts, load balancing.

    x (T, H) -> Router -> top-k experts and weights per token
             -> GroupedExperts: tokens sorted by expert, one grouped matmul per projection
             -> + shared experts (always on)

Router: softmax or sigmoid scores in float32; optional group-limited top-k (experts split into
`n_group` groups, a group scores as the sum of its top-2 experts, only the best `topk_group` groups
compete); optional score-correction bias that changes *which* experts are picked but not their
weights (auxiliary-loss-free balancing, DeepSeek-V3); optional normalisation of the top-k weights;
`routed_scaling_factor` on the routed output.

Balancing: every MoE counts the tokens each expert received (`tokens_per_expert`, outside autograd).
After each optimizer step the trainer calls `update_expert_bias`, which all-reduces the counts over
data-parallel ranks, nudges each bias by `bias_update_rate * sign(mean_load - load)` (centred), and
returns the per-layer load for logging. An optional Switch-style auxiliary loss
(`aux_loss_coef * E * sum_e f_e * P_e`) is left on the module as `aux_loss` for the model to add.

Experts are stacked 3-D weights, `gate_up_proj` (E, 2I, H) with the gate half first and
`down_proj` (E, H, I), the in-memory layout of transformers. "grouped" runs them with
`torch.nn.functional.grouped_mm`; "loop" runs one matmul per expert on the same sorted tokens, each
writing into its rows of one output; "auto" (default) takes grouped_mm wherever torch has it for the device
and the dtype the matmuls run in (CPU; CUDA bf16 on sm80+, float32 weights under bf16 autocast included), the
loop elsewhere. On CPU the two measured within 10% of each other
from 8 large to 64 small experts, grouped_mm ahead by its fewer calls on many small ones.
Both are deterministic at a fixed thread count: the sort is stable and every scatter writes each row once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from plait.nn.mlp import MLP, Activation, gated_down, matmul_dtype, on_tokens

EXPERT_IMPLS = ("auto", "grouped", "loop")


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    num_experts: int
    top_k: int
    intermediate_size: int
    activation: Activation = field(default_factory=Activation)
    score_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False
    bias_update_rate: float = 0.0
    aux_loss_coef: float = 0.0
    shared_intermediate_size: int = 0
    experts_impl: str = "auto"
    dtype: torch.dtype | None = None  # of the MoE's parameters (None: torch's default); its buffers stay float32

    def __post_init__(self):
        def bad(key, expected, got):
            raise ValueError(f"MoE {key}: expected {expected}, got {got!r}")

        if self.num_experts < 1:
            bad("num_experts", "a positive count", self.num_experts)
        if not 1 <= self.top_k <= self.num_experts:
            bad("top_k", f"1..num_experts ({self.num_experts})", self.top_k)
        if self.score_func not in ("softmax", "sigmoid"):
            bad("score_func", "'softmax' or 'sigmoid'", self.score_func)
        if self.n_group < 1 or self.num_experts % self.n_group:
            bad("n_group", f"a divisor of num_experts ({self.num_experts})", self.n_group)
        if not 1 <= self.topk_group <= self.n_group:
            bad("topk_group", f"1..n_group ({self.n_group})", self.topk_group)
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            bad("top_k", f"at most topk_group * experts per group ({self.topk_group * self.num_experts // self.n_group})", self.top_k)
        if self.experts_impl not in EXPERT_IMPLS:
            bad("experts_impl", f"one of {EXPERT_IMPLS}", self.experts_impl)
        if self.bias_update_rate < 0 or (self.bias_update_rate > 0 and not self.score_correction_bias):
            bad("bias_update_rate", "0, or > 0 together with score_correction_bias", self.bias_update_rate)
        if self.aux_loss_coef < 0:
            bad("aux_loss_coef", ">= 0", self.aux_loss_coef)
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            bad("dtype", "a floating torch.dtype or None", self.dtype)


@dataclass
class Routing:
    weights: torch.Tensor  # (T, K) float32, routed_scaling_factor included
    indices: torch.Tensor  # (T, K) int64
    logits: torch.Tensor  # (T, E) float32


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        if cfg.score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())  # (T, E), float32 whatever the model dtype
        scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if cfg.n_group > 1:
            T, per_group = choice.shape[0], cfg.num_experts // cfg.n_group
            grouped = choice.view(T, cfg.n_group, per_group)
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # (T, n_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, cfg.num_experts)
        indices = choice.topk(cfg.top_k, dim=-1).indices  # (T, K)
        weights = scores.gather(1, indices)  # the bias picks experts; weights come from unbiased scores
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * cfg.routed_scaling_factor, indices, logits)


def grouped_mm_available(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether torch's grouped_mm runs these expert weights in `dtype` (the matmul dtype, `matmul_dtype`:
    autocast's where it is on, else the weights'): a kernel for the device and dtype (none for float64; on
    CUDA bf16 on sm80+ only, so float32 weights under bf16 autocast take it too), and row strides that are
    multiples of 16 bytes (hidden and intermediate sizes; tiny configs often miss)."""
    if not hasattr(F, "grouped_mm"):
        return False
    dtype = dtype or gate_up_proj.dtype
    if any(dim * dtype.itemsize % 16 for dim in down_proj.shape[1:]):
        return False
    if gate_up_proj.device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(gate_up_proj.device) >= (8, 0)
    return gate_up_proj.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: Activation,
                 impl: str = "auto"):
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"experts impl: expected one of {EXPERT_IMPLS}, got {impl!r}")
        self.num_experts, self.impl, self.act = num_experts, impl, activation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    # eager inside a compiled layer (plait.compile): grouped_mm has no float32 fake-tensor kernel in torch 2.13,
    # and the row counts per expert are data
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H), indices / weights (T, K) -> (T, H)."""
        T, K = indices.shape
        flat = indices.reshape(-1)  # (T*K,) slot t*K + k
        order = torch.argsort(flat, stable=True)  # row r of the expert-sorted layout holds slot order[r]
        counts = torch.bincount(flat, minlength=self.num_experts)
        token_of_row = order // K
        row_of_slot = torch.empty_like(order)
        row_of_slot[order] = torch.arange(order.numel(), device=order.device)
        grouped = self.impl != "loop" and grouped_mm_available(self.gate_up_proj, self.down_proj,
                                                               matmul_dtype(x, self.gate_up_proj))
        plan = (_ExpertRows(None, torch.cumsum(counts, dim=0, dtype=torch.int32)) if grouped
                else _ExpertRows(counts.tolist(), None))  # the loop needs the sizes on the host (a sync on GPU)
        # (T*K, 2I): each token once per chosen expert, grouped by expert, through its expert's gate/up
        gate, up = _GatherExpertLinear.apply(x, self.gate_up_proj, token_of_row, row_of_slot, K, plan).chunk(2, dim=-1)
        # the routing weight scales each row's activation, before the (linear) down projection: the weight
        # gradient then needs only what the activation saves anyway, not a saved (T*K, H) expert output;
        # the activation runs once over every expert's rows, and backward recomputes it rather than keep it
        ys = gated_down(self.act, gate, up, weights.reshape(-1)[order], self.down_proj, _ExpertDown(plan))  # (T*K, H)
        return _FromExpertRows.apply(ys, token_of_row, row_of_slot, K).to(x.dtype)

    def extra_repr(self) -> str:
        E, H, I = self.down_proj.shape
        return f"experts={E}, hidden={H}, intermediate={I}, act={self.act.name}, impl={self.impl}"


def _sum_rows_per_token(rows: torch.Tensor, row_of_slot: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T*K, H) expert-sorted rows -> (T, H): each token's K rows, gathered back to slot order and summed in a
    fixed order (deterministic, no scatter-add)."""
    return rows.index_select(0, row_of_slot).view(-1, top_k, rows.shape[-1]).sum(dim=1)


class _FromExpertRows(torch.autograd.Function):
    """The adjoint of `_GatherExpertLinear`'s gather: (T*K, H) expert rows -> (T, H) per-token sums; its backward
    hands each row its token's gradient (one gather, where autograd's index_select backward zero-fills and adds)."""

    @staticmethod
    def forward(ctx, rows, token_of_row, row_of_slot, top_k):
        ctx.save_for_backward(token_of_row)
        return _sum_rows_per_token(rows, row_of_slot, top_k)

    @staticmethod
    def backward(ctx, grad_tokens):
        (token_of_row,) = ctx.saved_tensors
        return grad_tokens.index_select(0, token_of_row), None, None, None


@dataclass(frozen=True)
class _ExpertRows:
    """How rows are grouped by expert, in expert order: for torch's grouped_mm the `offsets` (cumulative row
    counts, int32, on the device), for the per-expert loop the `sizes` (row counts, on the host)."""

    sizes: list[int] | None
    offsets: torch.Tensor | None


def _expert_matmul(x: torch.Tensor, weight: torch.Tensor, plan: _ExpertRows, dtype: torch.dtype) -> torch.Tensor:
    """x (N, in), rows grouped by expert -> (N, out): x[rows of e] @ weight[e].T for each expert e, in `dtype`
    (`matmul_dtype`; grouped_mm is not autocast-aware, so both operands are cast here)."""
    if plan.offsets is not None:
        return F.grouped_mm(x.to(dtype), weight.to(dtype).transpose(-2, -1), offs=plan.offsets)
    x, weight = x.to(dtype), weight.to(dtype)
    out = x.new_empty(x.shape[0], weight.shape[1])
    with torch.autocast(x.device.type, enabled=False):
        start = 0
        for e, n in enumerate(plan.sizes):
            if n:  # one matmul per expert, straight into its rows: no concatenation
                torch.mm(x[start : start + n], weight[e].t(), out=out[start : start + n])
            start += n
    return out


def _expert_matmul_backward(grad_out, x, weight, plan: _ExpertRows, dtype: torch.dtype, need_x: bool, need_w: bool):
    """Gradients of `_expert_matmul` for x (N, in) and the 3-D weight (E, out, in). The loop writes each
    expert's weight gradient into its slice: autograd on per-expert slices would instead stack E weight
    gradients, which it gets transposed from the matmul backward (a strided copy of every expert weight)."""
    grad_out = grad_out.contiguous()
    if plan.offsets is not None:
        grad_out = grad_out.to(dtype)
        grad_x = F.grouped_mm(grad_out, weight.to(dtype), offs=plan.offsets).to(x.dtype) if need_x else None
        grad_w = F.grouped_mm(grad_out.t(), x.to(dtype), offs=plan.offsets).to(weight.dtype) if need_w else None
        return grad_x, grad_w
    grad_out, xc, wc = grad_out.to(dtype), x.to(dtype), weight.to(dtype)
    grad_x = torch.empty_like(xc) if need_x else None
    grad_w = torch.empty_like(wc) if need_w else None
    with torch.autocast(x.device.type, enabled=False):
        start = 0
        for e, n in enumerate(plan.sizes):
            rows = slice(start, start + n)
            if grad_x is not None and n:
                torch.mm(grad_out[rows], wc[e], out=grad_x[rows])
            if grad_w is not None:
                if n:
                    torch.mm(grad_out[rows].t(), xc[rows], out=grad_w[e])
                else:
                    grad_w[e].zero_()
            start += n
    return (grad_x.to(x.dtype) if grad_x is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None)


@dataclass(frozen=True)
class _ExpertDown:
    """The experts' down projection for `gated_down`: `_expert_matmul` under `plan`."""

    plan: _ExpertRows

    def differentiable(self, h, weight):
        return _ExpertLinear.apply(h, weight, self.plan)

    def forward(self, h, weight, dtype):
        return _expert_matmul(h, weight, self.plan, dtype)

    def backward(self, grad, h, weight, dtype, need_h: bool, need_w: bool):
        return _expert_matmul_backward(grad, h, weight, self.plan, dtype, need_h, need_w)


class _ExpertLinear(torch.autograd.Function):
    """`_expert_matmul` with its backward (the down projection)."""

    @staticmethod
    def forward(ctx, x, weight, plan: _ExpertRows):
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.dtype = plan, matmul_dtype(x, weight)  # backward runs outside autocast: keep its dtype
        return _expert_matmul(x, weight, plan, ctx.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = _expert_matmul_backward(grad_out, x, weight, ctx.plan, ctx.dtype, *ctx.needs_input_grad[:2])
        return grad_x, grad_w, None


class _GatherExpertLinear(torch.autograd.Function):
    """Tokens (T, H) -> expert rows (T*K, H), row r a copy of token `token_of_row[r]` -> `_expert_matmul` (the
    gate/up projection). It saves the tokens, not their K-fold copy, and gathers that again in backward; the
    tokens' gradient sums each token's K row gradients with `_sum_rows_per_token` (plain indexing would
    scatter-add them)."""

    @staticmethod
    def forward(ctx, x, weight, token_of_row, row_of_slot, top_k, plan: _ExpertRows):
        ctx.save_for_backward(x, weight, token_of_row, row_of_slot)
        ctx.top_k, ctx.plan, ctx.dtype = top_k, plan, matmul_dtype(x, weight)
        return _expert_matmul(x.index_select(0, token_of_row), weight, plan, ctx.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, token_of_row, row_of_slot = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_rows, grad_w = _expert_matmul_backward(grad_out, x.index_select(0, token_of_row), weight, ctx.plan,
                                                    ctx.dtype, need_x, need_w)
        grad_x = _sum_rows_per_token(grad_rows, row_of_slot, ctx.top_k) if need_x else None
        return grad_x, grad_w, None, None, None, None


class MoE(nn.Module):
    """x (..., H) -> (..., H). Submodules: gate (Router), experts (GroupedExperts), shared_experts (MLP)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.activation,
                                      cfg.experts_impl)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.shared_intermediate_size, cfg.activation)
                               if cfg.shared_intermediate_size else None)
        if cfg.dtype is not None:
            for param in self.parameters():
                param.data = param.data.to(cfg.dtype)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        # None: the aux loss is left in `aux_loss` for the model's loss. A number: the trainer's way, see
        # `route_aux_loss_through_backward`; `aux_loss_logged` then sums weight x aux loss for the log.
        self.aux_loss_weight: float | None = None
        self.aux_loss_logged = 0.0
        # set by a model whose loss pools every layer's router logits (transformers' output_router_logits):
        # the forward then leaves its (T, E) logits in `router_logits`; off, nothing outlives the backward
        self.keep_router_logits = False
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., H) -> (..., H). With `tokens` (flat indices of the real tokens, `AttentionMask.real_tokens`)
        only those are routed (`on_tokens`): padding takes no expert's compute, counts toward no expert's load
        and is left out of the aux loss (as transformers' load-balancing loss leaves out masked tokens); its
        rows of the output are zeros."""
        shape = x.shape
        if shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"MoE input: expected last dim {self.cfg.hidden_size}, got shape {list(shape)}")
        if tokens is not None:
            return on_tokens(self.forward, x, tokens)
        x = x.reshape(-1, shape[-1])  # (B, S, H) -> (T, H)
        if x.shape[0] == 0:  # nothing to route (every token is padding): no expert runs, no load, no aux loss
            self.aux_loss = self.router_logits = None
            return (x * 0.0).reshape(shape)  # empty, but in the graph, so the caller's backward still runs
        routing = self.gate(x)
        self.router_logits = routing.logits if self.keep_router_logits else None
        out = self.experts(x, routing.indices, routing.weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        # only training forwards count (evaluation must not move the balancing biases; shape inference on
        # meta tensors has nothing to count)
        if self.training and x.device.type != "meta":
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(routing.indices.reshape(-1), minlength=self.cfg.num_experts)
        self.aux_loss = None
        if self.training and self.cfg.aux_loss_coef > 0:
            aux = self.cfg.aux_loss_coef * load_balancing_loss(routing.logits, routing.indices)
            if self.aux_loss_weight is None:
                self.aux_loss = aux
            else:
                out = _AuxLossInBackward.apply(out, aux, self.aux_loss_weight)
                self.aux_loss_logged += self.aux_loss_weight * float(aux.detach())
        return out.view(shape)


class _AuxLossInBackward(torch.autograd.Function):
    """Identity on the MoE output whose backward also gives the aux loss the gradient `weight`: the aux loss
    joins the backward pass wherever this layer's output gradient arrives, even on a pipeline stage that
    never sees the loss (Megatron-Core's MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.weight = weight
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.weight), None


def route_aux_loss_through_backward(model: nn.Module, weight: float | None) -> None:
    """Make every MoE layer of `model` add `weight` x its aux loss to the gradients itself (the trainer passes
    1 / forwards per optimizer step, so the step minimises the mean aux loss of its micro-batches, as
    Megatron-Core does); None gives the aux loss back to the model's own loss."""
    for m in moe_layers(model).values():
        m.aux_loss_weight = weight


def pop_logged_aux_loss(model: nn.Module) -> float:
    """Sum of weight x aux loss since the last call, over `model`'s MoE layers (0.0 without an aux loss)."""
    total = 0.0
    for m in moe_layers(model).values():
        total, m.aux_loss_logged = total + m.aux_loss_logged, 0.0
    return total


def load_balancing_loss(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_e f_e * P_e, as transformers computes it: f_e the share of
    top-k slots given to expert e (summing to K), P_e the mean softmax probability of e."""
    T, E = logits.shape
    f = torch.bincount(indices.reshape(-1), minlength=E).float() / T
    P = logits.float().softmax(dim=-1).mean(dim=0)
    return E * torch.sum(f * P)


def pooled_load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor | None:
    """transformers' `load_balancing_loss_func` (what `output_router_logits=True` adds to an M3 loss): the Switch
    balance loss E * sum_e f_e * P_e over the tokens of every layer pooled together (not a mean of per-layer
    losses), f_e the share of the top-k slots of softmax(logits) given to expert e, whatever experts the router
    actually picked, P_e the mean softmax probability of e. Each entry is one layer's (T, E) logits of its real
    tokens (padding is never routed, as transformers leaves masked tokens out); None without any."""
    router_logits = [x for x in router_logits if x.shape[0] > 0]
    if not router_logits:
        return None
    logits = torch.cat(router_logits)  # (sum of T, E): pooling the layers is one Switch loss over all their rows
    return load_balancing_loss(logits, logits.detach().float().softmax(dim=-1).topk(top_k, dim=-1).indices)


@contextmanager
def router_logits_kept(module: nn.Module | None) -> Iterator[list[MoE]]:
    """Inside the block the MoE layers of `module` leave each forward's router logits in `router_logits` (None:
    no layer, and no walk over the modules); after it, also when it raised, they keep none."""
    layers = list(moe_layers(module).values()) if module is not None else []
    for m in layers:
        m.keep_router_logits = True
    try:
        yield layers
    finally:
        for m in layers:
            m.keep_router_logits, m.router_logits = False, None


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    losses = [m.aux_loss for m in moe_layers(model).values() if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


@torch.no_grad()
def update_expert_bias(model: nn.Module, all_reduce: Callable[[torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
    """After an optimizer step: sum each MoE's expert counts over ranks, move its correction bias toward
    balance (bias += rate * sign(mean - load), centred), reset the counts. Returns {layer: load (E,)}
    for logging. `all_reduce` sums a tensor in place across data-parallel ranks (None: one process)."""
    layers = moe_layers(model)
    if not layers:
        return {}
    loads = torch.cat([m.tokens_per_expert for m in layers.values()])
    if all_reduce is not None:
        all_reduce(loads)
    out, start = {}, 0
    for name, m in layers.items():
        E = m.cfg.num_experts
        load = loads[start : start + E]
        start += E
        bias = m.gate.e_score_correction_bias
        if bias is not None and m.cfg.bias_update_rate > 0 and load.sum() > 0:
            delta = m.cfg.bias_update_rate * torch.sign(load.mean() - load)
            bias += delta - delta.mean()
        m.tokens_per_expert.zero_()
        out[name] = load.clone()
    return out


def load_imbalance(loads: dict[str, torch.Tensor]) -> float:
    """Largest max-load / mean-load over layers (1.0 = perfectly balanced)."""
    ratios = [float(load.max() / load.mean()) for load in loads.values() if load.sum() > 0]
    return max(ratios) if ratios else 1.0
