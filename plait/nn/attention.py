"""One attention module for every plait model, configured per layer.

It covers grouped-query attention with a per-layer KV-head count, a V head dim that differs from the
Q/K head dim, a value scale, per-head QK norm, partial RoPE, a sliding window, learnable attention
sinks, logit softcapping, and causal + padding + packed-document masking.

Who may attend to whom is one rule, applied by every backend:

    key j is visible to query i  iff  pos_j <= pos_i                (causal; vision towers turn it off)
                                 and pos_i - pos_j < window        (sliding window; counts i itself)
                                 and doc_j == doc_i                (packed documents)
                                 and key j is not padding
                                 and key j's block is in query i's KeyBlocks when given
                                                                   (MiniMax-M3's lightning indexer)

`AttentionMask` carries the positions, padding and documents of one forward; it is built once per
forward and shared by all layers, each of which adds its own window.

Backends (`attend`):
- "eager": the reference. Materialises the (B, H, Sq, Sk) float32 scores; tests compare against it.
- "sdpa": PyTorch's fused attention kernels, CPU and GPU, laid out by the plans in `plait.nn.sdpa`.
  Plain causal layers use `is_causal` (no mask is built). Sliding-window layers run block-local:
  queries in blocks of `window - 1` tokens attend to their own block and the previous one, so the
  cost is O(S * window), not O(S^2). Under key-block selection the queries run in tiles, each over
  the union of the key blocks its queries picked (never a future block), so the work shrinks with
  the selection. On CPU the flash kernel's forward and backward run in one autograd Function that
  saves only the layer's q, k, v, output and log-sum-exp, and sinks enter as out * sigmoid(lse - sink).
  On GPU `F.scaled_dot_product_attention` runs the same plans, and a sink becomes one extra key:
  queries get a constant-1 extra dim, the sink key carries `sink / scale` there and a zero value, so
  its score is exactly the sink logit.
- "flex": FlexAttention (compiled) on GPU; the sink enters as out * sigmoid(lse - sink), which is
  the softmax with the sink in its denominator. Without a GPU it falls back to SDPA when gradients
  are needed (FlexAttention has no CPU backward).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from plait.nn.norm import RMSNorm
from plait.nn.rope import apply_rotary
from plait.nn.sdpa import (BlockGatherPlan, BlockLocalPlan, TilePlan, WholePlan, flash_attention_cpu, pad_head_dims,
                           pad_last_dim)

BACKENDS = ("sdpa", "flex", "eager")


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


@dataclass
class AttentionMask:
    """Positions, padding and documents of the tokens a forward feeds in (the queries, and the keys
    they add). A KV cache supplies the earlier keys' positions and padding itself.

    positions: (S,) int64 index of each new token in its row's stream (0.. without a cache).
    valid: (B, S) bool, False on padding; None when nothing is padded.
    documents: (B, S) int document id per token for packed rows; None for one document per row.
    """

    positions: torch.Tensor
    valid: torch.Tensor | None = None
    documents: torch.Tensor | None = None
    causal: bool = True
    _flex_cache: dict = field(default_factory=dict, repr=False, compare=False)
    _real_tokens: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        batch_size: int,
        seq_len: int,
        device: torch.device | str,
        *,
        position_ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_length: int = 0,
        causal: bool = True,
    ) -> AttentionMask:
        """From the usual model inputs.

        padding_mask: (B, past_length + S), 1 on real tokens (the transformers `attention_mask`).
        Packed documents come from `cu_seqlens` (offsets into the flattened B * S stream) or, without
        it, from `position_ids` restarting at 0 inside a row. Packing needs past_length == 0."""
        positions = torch.arange(past_length, past_length + seq_len, device=device)
        valid = None
        if padding_mask is not None:
            if padding_mask.shape != (batch_size, past_length + seq_len):
                raise ValueError(
                    f"attention_mask: expected shape {[batch_size, past_length + seq_len]} (batch, past + new tokens), "
                    f"got {list(padding_mask.shape)}"
                )
            if padding_mask.dtype != torch.bool and bool(((padding_mask != 0) & (padding_mask != 1)).any()):
                raise ValueError(f"attention_mask: expected 1 on real tokens and 0 on padding, got values "
                                 f"{torch.unique(padding_mask)[:8].tolist()}")
            valid = padding_mask[:, past_length:].to(device=device, dtype=torch.bool)
            if bool(valid.all()):
                valid = None
        documents = None
        if cu_seqlens is not None:
            documents = documents_from_cu_seqlens(cu_seqlens, batch_size, seq_len).to(device)
        elif position_ids is not None and past_length == 0:  # with padding too: pads are invalid keys either way
            if position_ids.shape[-1] != seq_len:
                raise ValueError(f"position_ids: expected {seq_len} positions per row, got shape {list(position_ids.shape)}")
            pos = position_ids.expand(batch_size, seq_len) if position_ids.ndim == 2 else position_ids.view(1, -1).expand(batch_size, -1)
            if bool((pos[:, 1:] == 0).any()):  # a restart inside a row: packed documents
                documents = torch.cumsum(pos == 0, dim=1).to(device)
        if documents is not None and past_length:
            raise ValueError("packed documents (cu_seqlens or restarting position_ids) cannot be combined with a KV cache")
        return cls(positions, valid, documents, causal)

    def real_tokens(self) -> torch.Tensor | None:
        """Flat indices (into B x S) of the new tokens that are not padding, what the feed-forward layers compute
        (`plait.nn.mlp.on_tokens`); None when nothing is padded. Made once per forward, for all its layers (on a
        GPU, that is one host sync)."""
        if self.valid is None:
            return None
        if self._real_tokens is None:
            self._real_tokens = self.valid.reshape(-1).nonzero().squeeze(1)
        return self._real_tokens

    def dense(
        self,
        window: int | None,
        k_positions: torch.Tensor | None = None,
        k_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B or 1, 1, Sq, Sk) bool, True where the key is visible."""
        if k_positions is None:  # the keys are the new tokens
            k_positions, k_valid = self.positions, self.valid
        return self._visible(window, self.positions, k_positions, k_valid, self.documents, self.documents)

    def dense_tile(self, window: int | None, q_lo: int, q_hi: int, k_index: torch.Tensor) -> torch.Tensor:
        """`dense` for queries q_lo:q_hi and the keys at `k_index`, all new tokens (no KV cache):
        (B or 1, 1, q_hi - q_lo, len(k_index)) bool."""
        valid = None if self.valid is None else self.valid[:, k_index]
        docs = self.documents
        return self._visible(window, self.positions[q_lo:q_hi], self.positions[k_index], valid,
                             None if docs is None else docs[:, q_lo:q_hi], None if docs is None else docs[:, k_index])

    def _visible(self, window, q_pos, k_pos, k_valid, q_docs, k_docs) -> torch.Tensor:
        """The module docstring's rule, less the key-block selection."""
        if self.causal:
            allowed = k_pos[None, :] <= q_pos[:, None]
        else:
            allowed = torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)
        if window is not None:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        allowed = allowed[None, None]  # (1, 1, Sq, Sk)
        if k_valid is not None:
            allowed = allowed & k_valid[:, None, None, :]
        if q_docs is not None:
            allowed = allowed & (q_docs[:, None, :, None] == k_docs[:, None, None, :])
        return allowed


def document_ranks(real: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
    """Each slot's count of the real tokens before it in its document: a real token's index among its document's
    real tokens. real (B, K) bool or 0/1 (padding 0), documents (B, K) ids or None (one per row) -> (B, K) int64."""
    real = real.long()
    before = real.cumsum(dim=1) - real  # real tokens of the row before each slot
    if documents is not None:  # counted from the document's first slot
        before = before - torch.where(document_starts(documents), before, 0).cummax(dim=1).values
    return before


def document_starts(documents: torch.Tensor) -> torch.Tensor:
    """(B, K) document ids -> (B, K) bool, True on each document's first slot (every row's first included)."""
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return starts


def documents_from_cu_seqlens(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """cu_seqlens (D + 1,) offsets into the flattened (B * S) stream -> (B, S) document ids."""
    cu = cu_seqlens.to(torch.long).cpu()
    total = batch_size * seq_len
    if cu.ndim != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens: expected increasing offsets from 0 to batch * seq_len = {total}, got {cu.tolist()}"
        )
    lengths = cu[1:] - cu[:-1]
    ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return ids.view(batch_size, seq_len)


@dataclass
class KeyBlocks:
    """Which blocks of keys each query may attend: a block-sparse restriction of the mask rule.

    keep: (B, h, Sq, n_blocks) bool. h divides the query heads, and query head i reads row i // (heads / h)
    (MiniMax-M3's indexer heads). Key slot j lies in block j // block_size, or, when `key_block` is given, in
    block key_block[b, j]: (B, Sk) int64, non-decreasing along each row, so that every block is a run of
    consecutive slots (blocks that follow documents and skip padding rather than the row's slots).
    Kept at block level so no backend needs the (B, H, Sq, Sk) dense mask unless it asks for it."""

    keep: torch.Tensor
    block_size: int
    key_block: torch.Tensor | None = None

    def dense(self, num_heads: int, n_keys: int) -> torch.Tensor:
        """(B, num_heads, Sq, n_keys) bool."""
        if self.key_block is None:
            per_key = self.keep.repeat_interleave(self.block_size, dim=-1)[..., :n_keys]
        else:
            B, h, Sq, _ = self.keep.shape
            per_key = self.keep.gather(-1, self.key_block.view(B, 1, 1, n_keys).expand(B, h, Sq, n_keys))
        return per_key.repeat_interleave(num_heads // self.keep.shape[1], dim=1)

    def bounds(self, n_keys: int) -> tuple[list[list[int]], list[list[int]]]:
        """Per row and block, its first key slot and one past its last (equal for a block with no keys)."""
        B, n_blocks = self.keep.shape[0], self.keep.shape[-1]
        if self.key_block is None:
            starts = [min(j * self.block_size, n_keys) for j in range(n_blocks)]
            ends = [min((j + 1) * self.block_size, n_keys) for j in range(n_blocks)]
            return [starts] * B, [ends] * B
        blocks = torch.arange(n_blocks, device=self.key_block.device).expand(B, n_blocks).contiguous()
        starts = torch.searchsorted(self.key_block, blocks, right=False)
        ends = torch.searchsorted(self.key_block, blocks, right=True)
        return starts.tolist(), ends.tolist()


# --------------------------------------------------------------------------------------------
# Backends: q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> (B, H, Sq, Dv)
# --------------------------------------------------------------------------------------------


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    *,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    backend: str = "sdpa",
    k_positions: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    restrict: KeyBlocks | None = None,
) -> torch.Tensor:
    """Attention under the rule in the module docstring. `k_positions` / `k_valid` describe the keys
    when they are not just the new tokens (a KV cache); `restrict` narrows what each query may see to
    the key blocks it picked."""
    _check_shapes(q, k, v, mask, sinks, k_positions, restrict)
    if backend == "eager":
        return eager_attention(q, k, v, mask, scale=scale, window=window, sinks=sinks, softcap=softcap,
                               k_positions=k_positions, k_valid=k_valid, restrict=restrict)
    if backend == "flex":
        if q.device.type != "cpu":
            return flex_attention(q, k, v, mask, scale=scale, window=window, sinks=sinks, softcap=softcap,
                                  k_positions=k_positions, k_valid=k_valid, restrict=restrict)
        if not torch.is_grad_enabled():  # CPU FlexAttention refuses inputs that require grad
            detached_sinks = sinks.detach() if sinks is not None else None
            return flex_attention(q.detach(), k.detach(), v.detach(), mask, scale=scale, window=window,
                                  sinks=detached_sinks, softcap=softcap, k_positions=k_positions, k_valid=k_valid, restrict=restrict)
        backend = "sdpa"  # FlexAttention has no CPU backward
    if backend != "sdpa":
        raise ValueError(f"attention backend: expected one of {BACKENDS}, got {backend!r}")
    if softcap is not None:
        # SDPA cannot cap logits; the eager path is exact (use "flex" on GPU for speed).
        return eager_attention(q, k, v, mask, scale=scale, window=window, sinks=sinks, softcap=softcap,
                               k_positions=k_positions, k_valid=k_valid, restrict=restrict)
    return sdpa_attention(q, k, v, mask, scale=scale, window=window, sinks=sinks,
                          k_positions=k_positions, k_valid=k_valid, restrict=restrict)


def _check_shapes(q, k, v, mask, sinks, k_positions, restrict=None) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: expected 4-D q, k, v (B, H, S, D), got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not fit together")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if mask.positions.shape[0] != q.shape[2]:
        raise ValueError(f"attention mask: {mask.positions.shape[0]} positions for {q.shape[2]} queries")
    n_keys = mask.positions.shape[0] if k_positions is None else k_positions.shape[0]
    if n_keys != k.shape[2]:
        raise ValueError(f"attention mask: {n_keys} key positions for {k.shape[2]} keys")
    if sinks is not None and sinks.shape != (q.shape[1],):
        raise ValueError(f"attention sinks: expected shape [{q.shape[1]}] (one per query head), got {list(sinks.shape)}")
    if restrict is not None:
        B, H, Sq = q.shape[:3]
        keep, key_block = restrict.keep, restrict.key_block
        if key_block is None:
            n_blocks = -(-k.shape[2] // restrict.block_size)
            layout = f"{k.shape[2]} keys in blocks of {restrict.block_size}"
        else:
            if key_block.shape != (B, k.shape[2]) or key_block.dtype != torch.int64:
                raise ValueError(f"attention key blocks: expected key_block of int64 [{B}, {k.shape[2]}] (one block id "
                                 f"per key), got {key_block.dtype} {list(key_block.shape)}")
            n_blocks = keep.shape[-1] if keep.ndim == 4 else -1
            layout = "key_block ids"
        if (keep.dtype != torch.bool or keep.ndim != 4 or keep.shape[0] != B or keep.shape[2:] != (Sq, n_blocks)
                or H % keep.shape[1]):
            raise ValueError(f"attention key blocks: expected a bool tensor [{B}, heads dividing {H}, {Sq}, {n_blocks}] "
                             f"({layout}), got {keep.dtype} {list(keep.shape)}")


def eager_attention(q, k, v, mask, *, scale, window=None, sinks=None, softcap=None, k_positions=None, k_valid=None,
                    restrict=None):
    """Reference: full float32 scores, masked, optional softcap and sink column."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    dt = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = mask.dense(window, k_positions, k_valid)
    if restrict is not None:
        allowed = allowed & restrict.dense(q.shape[1], k.shape[2])
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_col = sinks.to(dt).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # rows with nothing visible
    probs = torch.exp(scores - top)
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def _append_sink_key(q, k, v, sinks, scale):
    """Sinks as one extra key per head: q gets a constant-1 dim, the sink key carries sink / scale
    there (score = sink exactly) and a zero value. K and V are expanded to one head per query head,
    because each query head has its own sink. Returns q, k, v with the sink key last."""
    B, H, _, _ = q.shape
    groups = H // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    q = F.pad(q, (0, 1), value=1.0)
    k = F.pad(k, (0, 1), value=0.0)
    sink_logit = (sinks.to(k.dtype) / scale).view(1, H, 1, 1).expand(B, H, 1, 1)
    sink_k = torch.cat([k.new_zeros(B, H, 1, k.shape[-1] - 1), sink_logit], dim=-1)  # (B, H, 1, D + 1)
    k = torch.cat([k, sink_k], dim=2)
    v = torch.cat([v, v.new_zeros(B, H, 1, v.shape[-1])], dim=2)
    return q, k, v


def sdpa_attention(q, k, v, mask, *, scale, window=None, sinks=None, k_positions=None, k_valid=None, restrict=None):
    Sq = q.shape[2]
    no_cache = k_positions is None
    block_sparse = restrict is not None and no_cache and Sq > restrict.block_size
    block_local = no_cache and restrict is None and mask.causal and window is not None and Sq > 2 * window
    if q.device.type == "cpu":
        if block_sparse:
            plan = BlockGatherPlan(mask, window, restrict, q.shape[1])
        elif block_local:
            plan = BlockLocalPlan(mask, window, Sq)
        elif _plain(mask, window, Sq, k_positions, restrict):
            plan = WholePlan(is_causal=mask.causal)
        else:
            plan = WholePlan(False, lambda: _allowed(mask, window, k_positions, k_valid, restrict, q.shape[1], k.shape[2]))
        return flash_attention_cpu(q, k, v, plan, scale=scale, sinks=sinks)
    if block_sparse and sinks is None:
        return _block_sparse_attention(q, k, v, mask, restrict, scale=scale, window=window)
    if sinks is not None:
        q, k, v = _append_sink_key(q, k, v, sinks, scale)
    q, k, v, dv = pad_head_dims(q, k, v)
    gqa = q.shape[1] != k.shape[1]
    if block_local:
        out = _block_local_attention(q, k, v, mask, window=window, scale=scale, has_sink=sinks is not None)
    elif sinks is None and _plain(mask, window, Sq, k_positions, restrict):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, scale=scale, enable_gqa=gqa)
    else:
        allowed = _allowed(mask, window, k_positions, k_valid, restrict, q.shape[1], k.shape[2] - (sinks is not None))
        if sinks is not None:
            allowed = F.pad(allowed, (0, 1), value=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    return out[..., :dv]


def _plain(mask, window, n_queries, k_positions, restrict) -> bool:
    """Whether the causal flag (or no mask at all) says everything: no cache, padding, documents, key
    selection, and a window (if any) that every causal row fits in."""
    if k_positions is not None or restrict is not None or mask.valid is not None or mask.documents is not None:
        return False
    return window is None or (mask.causal and window >= n_queries)


def _allowed(mask, window, k_positions, k_valid, restrict, heads, n_keys):
    allowed = mask.dense(window, k_positions, k_valid)  # (B | 1, 1, Sq, Sk) bool
    return allowed if restrict is None else allowed & restrict.dense(heads, n_keys)


def _block_sparse_attention(q, k, v, mask, blocks: KeyBlocks, *, scale, window):
    """`TilePlan` through `F.scaled_dot_product_attention` (autograd saves each tile's operands)."""
    B, H, S, _ = q.shape
    q, k, v, dv = pad_head_dims(q, k, v)
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for rows, k_index, prefix, allowed in TilePlan(mask, window, blocks, H).tiles(S, k.shape[2], q.device):
        if k_index is None:  # nothing visible: zeros, as the other backends give
            outs.append(q.new_zeros(B, H, rows.stop - rows.start, v.shape[-1]))
            continue
        outs.append(F.scaled_dot_product_attention(q[:, :, rows], TilePlan.keys(k, k_index, prefix),
                                                   TilePlan.keys(v, k_index, prefix), attn_mask=allowed, scale=scale,
                                                   enable_gqa=gqa))
    return torch.cat(outs, dim=2)[..., :dv]


def _block_local_attention(q, k, v, mask, *, window, scale, has_sink):
    """`BlockLocalPlan` through `F.scaled_dot_product_attention`; k, v may end with one sink key, which every
    block gets."""
    B, H, S, _ = q.shape
    if has_sink:
        k, sink_k = k[:, :, :-1], k[:, :, -1:]
        v, sink_v = v[:, :, :-1], v[:, :, -1:]
    plan = BlockLocalPlan(mask, window, S)
    kb, vb = plan.key_blocks(k), plan.key_blocks(v)
    allowed = plan.allowed(B, q.device)
    if has_sink:
        kb = torch.cat([kb, sink_k.repeat_interleave(plan.n, dim=0)], dim=2)
        vb = torch.cat([vb, sink_v.repeat_interleave(plan.n, dim=0)], dim=2)
        allowed = F.pad(allowed, (0, 1), value=True)
    out = F.scaled_dot_product_attention(plan.query_blocks(q), kb, vb, attn_mask=allowed, scale=scale,
                                         enable_gqa=H != k.shape[1])
    return plan.from_query_blocks(out)


_compiled_flex = None


def flex_attention(q, k, v, mask, *, scale, window=None, sinks=None, softcap=None, k_positions=None, k_valid=None,
                   restrict=None):
    """FlexAttention: the mask rule as a mask_mod, softcap as a score_mod, sinks from the logsumexp.
    Compiled on GPU; run uncompiled (inference only) elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex

    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    q_pos = mask.positions
    k_pos = mask.positions if k_positions is None else k_positions
    valid = mask.valid if k_positions is None else k_valid
    docs = mask.documents
    causal = mask.causal
    if restrict is not None:
        keep_blocks, block_size, key_block = restrict.keep, restrict.block_size, restrict.key_block
        head_group = H // keep_blocks.shape[1]

    def mask_mod(b, h, qi, ki):
        ok = k_pos[ki] <= q_pos[qi] if causal else qi >= 0
        if restrict is not None:
            block = ki // block_size if key_block is None else key_block[b, ki]
            ok = ok & keep_blocks[b, h // head_group, qi, block]
        if window is not None:
            ok = ok & (q_pos[qi] - k_pos[ki] < window)
        if valid is not None:
            ok = ok & valid[b, ki]
        if docs is not None:
            ok = ok & (docs[b, qi] == docs[b, ki])
        return ok

    key = (window, Sq, Sk)
    cacheable = k_positions is None and restrict is None
    block_mask = mask._flex_cache.get(key) if cacheable else None
    if block_mask is None:
        batch = B if (valid is not None or docs is not None or restrict is not None) else None
        heads = H if restrict is not None else None
        block_mask = create_block_mask(mask_mod, batch, heads, Sq, Sk, device=q.device)
        if cacheable:
            mask._flex_cache[key] = block_mask
    def capped(score, b, h, qi, ki):
        return softcap * torch.tanh(score / softcap)

    score_mod = capped if softcap is not None else None

    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                  return_aux=AuxRequest(lse=True))
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(_flex, dynamic=False)
        # its kernels need head dims of at least 16: zero dims change neither the scores (the scale is explicit)
        # nor the output's first dv columns
        d, dv = q.shape[-1], v.shape[-1]
        q, k, v = pad_last_dim(q, max(d, 16)), pad_last_dim(k, max(d, 16)), pad_last_dim(v, max(dv, 16))
        out, aux = _compiled_flex(q, k, v, **kwargs)
        out = out[..., :dv]
    else:
        with warnings.catch_warnings():  # uncompiled on CPU (inference, tests): slow by design
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out, aux = _flex(q, k, v, **kwargs)
    if sinks is not None:
        # softmax with the sink in the denominator = plain softmax * sigmoid(lse - sink)
        out = out * torch.sigmoid(aux.lse - sinks.float().view(1, H, 1)).unsqueeze(-1).to(out.dtype)
    # queries with no visible key: flex leaves lse = -inf and output 0, as the other backends do
    return out


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """x (B, S, hidden) -> (B, S, hidden).

    Weights: q_proj, k_proj, v_proj, o_proj (nn.Linear, HF layout), q_norm / k_norm (per head, when
    `qk_norm` is set), sinks (n_heads,) when `sinks=True`."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        value_scale: float = 1.0,
        sliding_window: int | None = None,
        sinks: bool = False,
        softcap: float | None = None,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        scale: float | None = None,
        backend: str = "sdpa",
    ):
        super().__init__()
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"attention heads: num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window: expected a positive token count or None, got {sliding_window}")
        if qk_norm not in (None, "rms", "rms_unit_offset"):
            raise ValueError(f"qk_norm: expected None, 'rms' or 'rms_unit_offset', got {qk_norm!r}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend: expected one of {BACKENDS}, got {backend!r}")
        if not math.isfinite(value_scale):
            raise ValueError(f"attention value scale: expected a finite number, got {value_scale!r}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.value_scale = value_scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.scale = scale if scale is not None else head_dim**-0.5
        self.backend = backend
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.v_head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, hidden_size, bias=o_bias)
        if qk_norm is not None:
            self.q_norm = RMSNorm(head_dim, norm_eps, unit_offset=qk_norm == "rms_unit_offset")
            self.k_norm = RMSNorm(head_dim, norm_eps, unit_offset=qk_norm == "rms_unit_offset")
        else:
            self.q_norm = self.k_norm = None
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        kv_cache=None,
        restrict: KeyBlocks | None = None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)  # (B, S, H*D) -> (B, S, H, D)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.v_head_dim)
        if self.value_scale != 1.0:
            v = v * self.value_scale
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # -> (B, H, S, D)
        k_positions = k_valid = None
        if kv_cache is not None:
            k, v, k_positions, k_valid = kv_cache.update(k, v, mask)
        out = attend(q, k, v, mask, scale=self.scale, window=self.sliding_window, sinks=self.sinks,
                     softcap=self.softcap, backend=self.backend, k_positions=k_positions, k_valid=k_valid,
                     restrict=restrict)
        out = out.transpose(1, 2).reshape(B, S, self.num_heads * self.v_head_dim)
        return self.o_proj(out)

    def extra_repr(self) -> str:
        parts = [f"heads={self.num_heads}", f"kv_heads={self.num_kv_heads}", f"head_dim={self.head_dim}"]
        if self.v_head_dim != self.head_dim:
            parts.append(f"v_head_dim={self.v_head_dim}")
        if self.sliding_window is not None:
            parts.append(f"window={self.sliding_window}")
        if self.sinks is not None:
            parts.append("sinks")
        parts.append(f"backend={self.backend}")
        return ", ".join(parts)


class KVCache:
    """A model's generation cache: one `LayerKVCache` per attention layer, plus how many tokens the
    model has consumed (sliding-window layers hold fewer).

    `spare` extra tokens are kept beyond a sliding window so that `crop` can take back that many
    tokens (speculative decoding's rejected drafts) and still leave the window full."""

    def __init__(self, spare: int = 0):
        if spare < 0:
            raise ValueError(f"KVCache spare: expected >= 0 tokens, got {spare}")
        self.layers: dict[str, LayerKVCache] = {}
        self.seen = 0
        self.spare = spare

    def layer(self, key: str, window: int | None) -> LayerKVCache:
        return self.layers.setdefault(key, LayerKVCache(window, self.spare))

    def crop(self, length: int) -> None:
        """Forget every token from stream slot `length` on, as if the model had consumed only `length`."""
        if not 0 <= length <= self.seen:
            raise ValueError(f"KVCache.crop: expected a length in [0, {self.seen}], got {length}")
        for layer in self.layers.values():
            layer.crop(length)
        self.seen = length


class LayerKVCache:
    """One layer's keys and values during generation. A sliding-window layer keeps only the last
    `window - 1 + spare` tokens after each step: the next query can see nothing older."""

    def __init__(self, window: int | None = None, spare: int = 0):
        self.window, self.spare = window, spare
        self.k = self.v = self.positions = self.valid = None
        self.index_keys = None  # the lightning indexer's keys (MiniMax-M3 sparse layers), one per stream slot

    def slots_with(self, mask: AttentionMask, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream slots (Sk,) and padding (B, Sk) of the cached keys followed by the new tokens', nothing stored."""
        new_valid = mask.valid if mask.valid is not None else torch.ones(
            batch_size, mask.positions.numel(), dtype=torch.bool, device=mask.positions.device)
        if self.positions is None:
            return mask.positions, new_valid
        return torch.cat([self.positions, mask.positions]), torch.cat([self.valid, new_valid], dim=1)

    def update(self, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask):
        positions, valid = self.slots_with(mask, k.shape[0])
        if self.k is None:
            keys, values = k, v
        else:
            keys = torch.cat([self.k, k], dim=2)
            values = torch.cat([self.v, v], dim=2)
        start = 0 if self.window is None else max(keys.shape[2] - (self.window - 1 + self.spare), 0)
        keep = slice(start, None)
        self.k, self.v = keys[:, :, keep], values[:, :, keep]
        self.positions, self.valid = positions[keep], valid[:, keep]
        return keys, values, positions, valid

    def crop(self, length: int) -> None:
        if self.k is not None:
            keep = int((self.positions < length).sum())  # positions increase along the cache
            self.k, self.v = self.k[:, :, :keep], self.v[:, :, :keep]
            self.positions, self.valid = self.positions[:keep], self.valid[:, :keep]
        if self.index_keys is not None:
            self.index_keys = self.index_keys[:, :, :length]

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


def num_flops_attention(batch: int, heads: int, seq: int, head_dim: int, v_head_dim: int, window: int | None) -> float:
    """Useful forward FLOPs of causal (optionally windowed) attention: QK^T and PV over visible pairs."""
    if window is None or window >= seq:
        pairs = seq * (seq + 1) / 2
    else:
        pairs = window * (window + 1) / 2 + (seq - window) * window
    return 2.0 * batch * heads * pairs * (head_dim + v_head_dim)
