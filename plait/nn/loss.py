"""Causal-LM cross-entropy as a *sum* over target tokens, so the trainer can divide by the number of
target tokens in the whole optimizer step (across gradient-accumulation micro-batches and ranks),
not by each micro-batch's own count, which would weight short micro-batches more."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Unshifted labels (B, S) -> the target of each position (B, S); the last position has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, S, V), unshifted labels (B, S) with -100 ignored -> summed float32 loss."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels: expected shape {list(logits.shape[:2])} to match logits, got {list(labels.shape)}")
    targets = shift_labels(labels)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    return int((shift_labels(labels) != IGNORE_INDEX).sum())


def micro_batch_loss_sums(replica: torch.nn.Module, loss_from_hidden: bool, inputs: dict, model_inputs: dict,
                          labels: torch.Tensor, labels_per_depth: list[torch.Tensor]
                          ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """One micro-batch's forward (training or held-out): the summed main cross-entropy, the summed CE of each
    MTP depth (`labels_per_depth`: each depth's labels, `plait.mtp.mtp_labels`), and the router balance term
    (`router_aux_term`; None unless the model pools one).

    A native model takes the labels and computes its cross-entropies from the hidden states, chunk by chunk
    (below): the step never holds the (tokens x vocab) logits, nor their gradient. Its losses are means over the
    micro-batch's own targets, made sums again here by their target counts (the counts the model divided by) so
    the caller can normalise over the whole step or held-out set. Other models (transformers', MIMO compositions)
    return logits, and the sums are taken from them."""
    if loss_from_hidden:
        out = replica(**inputs, labels=labels, use_cache=False, return_logits=False, **model_inputs)
        per_depth = _one_per_depth(out.mtp_losses, labels_per_depth, "losses")
        return (out.lm_loss * count_targets(labels),
                [x * count_targets(y) for x, y in zip(per_depth, labels_per_depth)], router_aux_term(out, replica))
    if labels_per_depth:
        inputs = {**inputs, "return_mtp_logits": True}
    out = replica(**inputs, use_cache=False, **model_inputs)
    per_depth = _one_per_depth(out.mtp_logits if labels_per_depth else None, labels_per_depth, "logits")
    return (causal_lm_loss_sum(out.logits, labels), [causal_lm_loss_sum(x, y) for x, y in zip(per_depth, labels_per_depth)],
            router_aux_term(out, replica))


def router_aux_term(out, model: torch.nn.Module) -> torch.Tensor | None:
    """`router_aux_loss_coef` x the pooled load-balancing loss a forward returned in `aux_loss` (transformers'
    `output_router_logits`, on native M3 and stock MoE models alike; what their own loss adds); None without."""
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        return None
    config = getattr(getattr(model, "module", model), "config", None)  # through a DDP wrapper
    config = getattr(config, "text_config", None) or config
    return getattr(config, "router_aux_loss_coef", 0.0) * aux


def _one_per_depth(outputs: list | None, labels_per_depth: list, what: str) -> list:
    """The model's per-depth outputs, exactly one per depth the caller has labels for."""
    outputs = list(outputs or [])
    if len(outputs) != len(labels_per_depth):
        raise ValueError(f"MTP: expected per-depth {what} for {len(labels_per_depth)} depths (the run's "
                         f"mtp.num_layers) from the model, got {len(outputs)}")
    return outputs


# ---------------------------------------------------------------------------------------------
# Memory-lean loss: the LM head and the cross-entropy fused and run in sequence chunks
# ---------------------------------------------------------------------------------------------

# Logits of one chunk stay under this many bytes (float32): 256 MiB is ~330 tokens at a 200k vocabulary.
CHUNK_BYTES = 1 << 28


def default_chunk_size(vocab_size: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab_size))


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum over targets of CE(hidden @ weight.T, target), chunk by chunk; optionally also the logits.

    The forward computes each chunk's float32 logits, its loss, and at once its gradients
    (d loss / d logits = softmax - onehot), then drops the logits: the (N, V) logits never exist
    whole, in the forward or the backward, and nothing is recomputed. The backward only scales the
    stored gradients by the incoming one.

    Without `keep_logits`, only the rows that have a target go through the LM head: a prompt, image
    placeholders, padding and each row's last token cost no head matmul, forward or backward (their loss
    and gradient are 0 either way).

    With `keep_logits` the logits are also returned, from the same matmul: a caller that wants both the
    loss and the logits pays for one LM-head matmul, not two. A gradient that reaches those logits (a loss
    of the caller's own on them) adds its two matmuls in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, keep_logits):
        ctx.set_materialize_grads(False)  # unused logits send no gradient, and cost no backward matmul
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        all_hidden, rows = hidden, None
        if not keep_logits:  # after this every row left has a target, and no chunk needs an ignore mask
            has_target = targets != ignore_index
            if not bool(has_target.all()):
                rows = has_target.nonzero().squeeze(1)
                hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kept = None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            keep = t != ignore_index if keep_logits else None
            safe_t = t if keep is None else t.masked_fill(~keep, 0)
            linear = F.linear(h, weight)
            if keep_logits:
                if kept is None:
                    kept = linear.new_empty(hidden.shape[0], weight.shape[0])
                kept[start : start + chunk_size] = linear
            logits = linear.float()  # (c, V): the only chunk-sized buffer
            target_logit = logits.gather(1, safe_t.unsqueeze(1)).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: logsumexp would allocate a second (c, V) buffer
            norm = probs.sum(dim=-1, keepdim=True)
            lse = (top + norm.log()).squeeze(1)
            total += (lse - target_logit).sum() if keep is None else ((lse - target_logit) * keep).sum()
            if need_grad:
                grad = probs.div_(norm)  # softmax
                if keep is None:
                    grad.scatter_add_(1, safe_t.unsqueeze(1), grad.new_full((len(t), 1), -1.0))
                else:
                    grad.scatter_add_(1, safe_t.unsqueeze(1), -keep.unsqueeze(1).to(grad.dtype))
                    grad.mul_(keep.unsqueeze(1))  # an ignored row's gradient is 0
                grad = grad.to(h.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = grad @ weight
                if grad_weight is not None:
                    grad_weight.addmm_(grad.t().float(), h.float())
            del logits, probs, linear
        if rows is not None and grad_hidden is not None:  # the rows without a target get a zero gradient
            grad_hidden = torch.zeros_like(all_hidden).index_copy_(0, rows, grad_hidden)
        ctx.save_for_backward(grad_hidden, grad_weight, *((hidden, weight) if keep_logits else ()))
        return total, kept

    @staticmethod
    def backward(ctx, grad_output, grad_logits):
        grad_hidden, grad_weight, *inputs = ctx.saved_tensors
        # Scaled in place: these buffers exist only for this backward, and a copy of the (V, H)
        # weight gradient would be the largest allocation of the whole loss.
        scale = grad_output if grad_output is not None else 0.0
        if grad_hidden is not None:
            grad_hidden.mul_(scale.to(grad_hidden.dtype) if torch.is_tensor(scale) else scale)
        if grad_weight is not None:
            grad_weight.mul_(scale)
        if grad_logits is not None:
            hidden, weight = inputs
            g = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden.add_(g @ weight)
            if grad_weight is not None:
                grad_weight.addmm_(g.t().float(), hidden.float())
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    return_logits: bool = False,
):
    """Summed float32 cross-entropy of `hidden @ weight.T` against `targets`, without materialising the
    logits. hidden (..., H), weight (V, H), targets (...) with `ignore_index` skipped. With `return_logits`,
    (loss, logits (..., V)) from the one matmul."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets: expected shape {list(hidden.shape[:-1])} to match hidden states, got {list(targets.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm head weight: expected shape [vocab, {hidden.shape[-1]}], got {list(weight.shape)}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive token count, got {chunk_size}")
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    loss, logits = _LinearCrossEntropySum.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                                chunk, ignore_index, return_logits)
    if not return_logits:
        return loss
    return loss, logits.view(*hidden.shape[:-1], weight.shape[0])


def causal_lm_chunked_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_size: int | None = None, return_logits: bool = False):
    """`causal_lm_loss_sum` from final hidden states (B, S, H) and the LM head weight (V, H); with
    `return_logits`, (loss, logits (B, S, V))."""
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"labels: expected shape {list(hidden.shape[:2])} to match hidden states, got {list(labels.shape)}")
    return linear_cross_entropy_sum(hidden, weight, shift_labels(labels), chunk_size=chunk_size,
                                    return_logits=return_logits)
