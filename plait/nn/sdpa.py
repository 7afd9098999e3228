"""How SDPA kernel calls cover plait's attention, and CPU attention that saves only what its backward needs.

`F.scaled_dot_product_attention` saves its operands as the kernel sees them, and for plait's layers those are
bigger than the layer's own q, k, v: K and V repeated once per query head (the CPU backward runs about 2x
slower on grouped heads), V zero-padded to the Q/K head dim (the kernel takes one head dim), the keys of a
sliding window unfolded into overlapping blocks (each key twice), a float mask. Here the kernel's forward and
backward ops run inside one autograd Function that saves the layer's q, k, v, its output (in the layout the
output projection reads, so the two share one buffer) and the log-sum-exp, and builds the kernel's operands
again in backward: copies, cheap beside the attention they feed.

A plan says how kernel calls cover the attention; the GPU path of `attention.sdpa_attention` feeds the same
plans' blocks, tiles and masks to `F.scaled_dot_product_attention`:
- `WholePlan`: one call, with the causal flag or a mask built from the `AttentionMask`;
- `BlockLocalPlan`: sliding windows in O(S * window): query blocks of window - 1 tokens against their own
  block and the previous one, which hold every key in their window, batched into one call;
- `TilePlan`: block-sparse key selection: query tiles, each over the union of the key blocks its queries
  picked (blocks nobody picked, the future ones among them, cost nothing).

Sinks: a softmax with one more logit s_h in its denominator and a zero value gives out' = c * out, where
c = sigmoid(lse - s_h) and out, lse are the attention over the real keys. Its backward is the kernel's own,
fed the rescaled gradient c * g and the rescaled output out': the kernel's row term sum(dO * O) then is
c^2 (g . out), which is the plain term c (g . out) less the gradient that reaches lse. The sink itself gets
d s_h = -sum over queries of (1 - c) (g . out').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# queries per tile of the block-sparse plan: enough rows for efficient matmuls, few enough that a tile's
# queries share most of their key blocks
SPARSE_TILE_QUERIES = 128


def flash_attention_cpu(q, k, v, plan, *, scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv) -> (B, H, Sq, Dv), laid out as (B, Sq, H, Dv)."""
    if torch.is_autocast_enabled("cpu"):  # what autocast does for scaled_dot_product_attention
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast("cpu", enabled=False):
        return _FlashAttention.apply(q, k, v, sinks, plan, scale)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, plan, scale):
        qk, kk, vk = _kernel_operands(q, k, v)
        out, lse = plan.forward(qk, kk, vk, scale)
        if sinks is not None:
            out = out * _sink_factor(lse, sinks).unsqueeze(-1).to(out.dtype)
        # compact, and in the (B, S, H, Dv) layout that the output projection reads without a copy
        result = out[..., : v.shape[-1]].transpose(1, 2).contiguous().transpose(1, 2)
        ctx.save_for_backward(q, k, v, result, lse, sinks)
        ctx.plan, ctx.scale = plan, scale
        return result

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        qk, kk, vk = _kernel_operands(q, k, v)
        grad_sinks = None
        if sinks is not None:
            c = _sink_factor(lse, sinks)
            grad_sinks = -((grad.float() * out.float()).sum(-1) * (1 - c)).sum(dim=(0, 2)).to(sinks.dtype)
            grad = grad * c.unsqueeze(-1).to(grad.dtype)
        width = qk.shape[-1]
        grad_q, grad_k, grad_v = ctx.plan.backward(pad_last_dim(grad, width), qk, kk, vk, pad_last_dim(out, width), lse,
                                                   ctx.scale)
        return (grad_q[..., : q.shape[-1]], _fold_heads(grad_k, k.shape[1])[..., : k.shape[-1]],
                _fold_heads(grad_v, v.shape[1])[..., : v.shape[-1]], grad_sinks, None, None)


def _sink_factor(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """c = sigmoid(lse - sink) per (batch, head, query), float32."""
    return torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))


def pad_head_dims(q, k, v):
    """SDPA's fast CPU kernel needs one head dim for q, k and v: zero-pad the smaller side (extra zero
    dims change neither the scores nor the output). Returns q, k, v and the true V head dim."""
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        v = F.pad(v, (0, d - dv))
    elif d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    return q, k, v, dv


def _kernel_operands(q, k, v):
    """The kernel takes one head dim and (for a fast backward) one K/V head per query head."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return pad_head_dims(q, k, v)[:3]


def pad_last_dim(t: torch.Tensor, width: int) -> torch.Tensor:
    """t's last dim zero-padded to `width` (F.pad copies even when there is nothing to pad)."""
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def _fold_heads(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, S, D) gradient of K or V repeated per query head -> (B, kv_heads, S, D)."""
    B, H, S, D = grad.shape
    return grad if H == kv_heads else grad.view(B, kv_heads, H // kv_heads, S, D).sum(dim=2)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool visibility -> the kernel's additive mask (0 where visible, -inf elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class WholePlan:
    """One kernel call over all queries and keys: the causal flag alone when the rule needs nothing more,
    otherwise `allowed()` (a (B | 1, H | 1, Sq, Sk) bool mask, built again in backward rather than saved)."""

    def __init__(self, is_causal: bool, allowed=None):
        self.is_causal, self.allowed = is_causal, allowed

    def _mask(self, dtype):
        return None if self.allowed is None else _additive(self.allowed(), dtype)

    def forward(self, q, k, v, scale):
        return _flash_forward(q, k, v, 0.0, self.is_causal, attn_mask=self._mask(q.dtype), scale=scale)

    def backward(self, grad, q, k, v, out, lse, scale):
        return _flash_backward(grad, q, k, v, out, lse, 0.0, self.is_causal, attn_mask=self._mask(q.dtype),
                               scale=scale)


class BlockLocalPlan:
    """Causal sliding-window attention in O(S * window): query block n (b = window - 1 tokens) sees key
    blocks n - 1 and n, which hold every key within its window; all blocks run as one batched call."""

    def __init__(self, mask, window: int, seq_len: int):
        self.mask, self.window, self.S = mask, window, seq_len
        self.b = max(window - 1, 1)
        self.n = -(-seq_len // self.b)
        self.pad = self.n * self.b - seq_len

    def query_blocks(self, t):  # (B, H, S, d) -> (B * n, H, b, d)
        B, H, _, d = t.shape
        t = F.pad(t, (0, 0, 0, self.pad))
        return t.view(B, H, self.n, self.b, d).transpose(1, 2).reshape(B * self.n, H, self.b, d)

    def from_query_blocks(self, t):  # (B * n, H, b, d) -> (B, H, S, d)
        _, H, b, d = t.shape
        B = t.shape[0] // self.n
        return t.view(B, self.n, H, b, d).transpose(1, 2).reshape(B, H, self.n * b, d)[:, :, : self.S]

    def key_blocks(self, t):  # (B, H, S, d) -> (B * n, H, 2b, d): one zero block in front, then unfold
        B, H, _, d = t.shape
        t = F.pad(t, (0, 0, self.b, self.pad))
        return t.unfold(2, 2 * self.b, self.b).permute(0, 2, 1, 4, 3).reshape(B * self.n, H, 2 * self.b, d)

    def from_key_blocks(self, t):  # adjoint of key_blocks: each key's gradient from both blocks that hold it
        _, H, two_b, d = t.shape
        B, b, n = t.shape[0] // self.n, self.b, self.n
        t = t.view(B, n, H, 2, b, d)
        out = t.new_zeros(B, H, (n + 1) * b, d)
        out[:, :, : n * b].view(B, H, n, b, d).add_(t[:, :, :, 0].transpose(1, 2))
        out[:, :, b:].view(B, H, n, b, d).add_(t[:, :, :, 1].transpose(1, 2))
        return out[:, :, b : b + self.S]

    def lse_blocks(self, lse):  # (B, H, S) -> (B * n, H, b); padded rows get 0 (their gradients are 0)
        B, H, _ = lse.shape
        return F.pad(lse, (0, self.pad)).view(B, H, self.n, self.b).transpose(1, 2).reshape(B * self.n, H, self.b)

    def allowed(self, batch: int, device) -> torch.Tensor:
        """(B * n, 1, b, 2b) bool."""
        # visibility per block, from stream positions: query (n, r) sits at n*b + r, key (n, c) at (n-1)*b + c
        n, b, S, mask = self.n, self.b, self.S, self.mask
        blk = torch.arange(n, device=device).view(n, 1, 1)
        q_pos = blk * b + torch.arange(b, device=device).view(1, b, 1)
        k_pos = (blk - 1) * b + torch.arange(2 * b, device=device).view(1, 1, 2 * b)
        allowed = (k_pos <= q_pos) & (q_pos - k_pos < self.window) & (k_pos >= 0) & (k_pos < S)  # (n, b, 2b)
        allowed = allowed.unsqueeze(0)  # (1, n, b, 2b)
        k_index = k_pos.clamp(0, S - 1).expand(n, 1, 2 * b).reshape(-1)
        if mask.valid is not None:
            allowed = allowed & mask.valid[:, k_index].view(batch, n, 1, 2 * b)
        if mask.documents is not None:
            q_doc = F.pad(mask.documents, (0, self.pad), value=-1).view(batch, n, b, 1)
            allowed = allowed & (q_doc == mask.documents[:, k_index].view(batch, n, 1, 2 * b))
        return allowed.expand(batch, n, b, 2 * b).reshape(batch * n, 1, b, 2 * b)

    def forward(self, q, k, v, scale):
        B = q.shape[0]
        out, lse = _flash_forward(self.query_blocks(q), self.key_blocks(k), self.key_blocks(v), 0.0, False,
                                  attn_mask=_additive(self.allowed(B, q.device), q.dtype), scale=scale)
        lse = lse.view(B, self.n, -1, self.b).transpose(1, 2).reshape(B, -1, self.n * self.b)[:, :, : self.S]
        return self.from_query_blocks(out), lse

    def backward(self, grad, q, k, v, out, lse, scale):
        B = q.shape[0]
        gq, gk, gv = _flash_backward(self.query_blocks(grad), self.query_blocks(q), self.key_blocks(k),
                                     self.key_blocks(v), self.query_blocks(out), self.lse_blocks(lse), 0.0, False,
                                     attn_mask=_additive(self.allowed(B, q.device), q.dtype), scale=scale)
        return self.from_query_blocks(gq), self.from_key_blocks(gk), self.from_key_blocks(gv)


class TilePlan:
    """Attention restricted to per-query key blocks (`KeyBlocks`), without a (Sq, Sk) mask: queries run in
    tiles, each against the union of the key blocks its queries picked; inside a tile the usual rule and
    each query's own picks apply."""

    def __init__(self, mask, window: int | None, blocks, heads: int):
        self.mask, self.window, self.blocks, self.heads = mask, window, blocks, heads
        bs = blocks.block_size
        self.tile = bs * max(1, SPARSE_TILE_QUERIES // bs)

    def tiles(self, n_queries: int, n_keys: int, device):
        """Per tile: (query slice, key index (None when no key is visible), the key count when the keys are
        blocks 0..j (a view, no copy) or None, (B | 1, H | 1, t, nk) bool mask)."""
        bs, key_block = self.blocks.block_size, self.blocks.key_block
        in_block = torch.arange(bs, device=device)
        for lo in range(0, n_queries, self.tile):
            hi = min(lo + self.tile, n_queries)
            keep = self.blocks.keep[:, :, lo:hi]  # (B, h, t, n_blocks)
            if key_block is None:
                picked = keep.any(dim=2).any(dim=1).any(dim=0).nonzero().squeeze(1)  # ascending block ids
                if picked.numel() == 0:
                    yield slice(lo, hi), None, None, None
                    continue
                k_index = (picked[:, None] * bs + in_block).flatten()
                k_index = k_index[k_index < n_keys]  # only the last block can be partial, and it sorts last
                prefix = k_index.numel() if int(picked[-1]) + 1 == picked.numel() else None  # blocks 0..j: a view
                chosen = keep.index_select(-1, picked).repeat_interleave(bs, dim=-1)[..., : k_index.numel()]
            else:  # blocks of each row's own slots: the union is taken over keys
                B, h, t, _ = keep.shape
                per_key = keep.gather(-1, key_block.view(B, 1, 1, n_keys).expand(B, h, t, n_keys))
                k_index = per_key.any(dim=2).any(dim=1).any(dim=0).nonzero().squeeze(1)
                if k_index.numel() == 0:
                    yield slice(lo, hi), None, None, None
                    continue
                prefix = k_index.numel() if int(k_index[-1]) + 1 == k_index.numel() else None
                chosen = per_key.index_select(-1, k_index)
            allowed = self.mask.dense_tile(self.window, lo, hi, k_index)  # (B | 1, 1, t, nk)
            if keep.shape[1] > 1:  # one indexer head broadcasts over the query heads; several are repeated
                chosen = chosen.repeat_interleave(self.heads // keep.shape[1], dim=1)
            yield slice(lo, hi), k_index, prefix, allowed & chosen

    @staticmethod
    def keys(t, k_index, prefix):
        return t[:, :, :prefix] if prefix is not None else t.index_select(2, k_index)

    def forward(self, q, k, v, scale):
        B, H, S, D = q.shape
        out = q.new_zeros(B, H, S, v.shape[-1])  # a tile with nothing visible stays 0, as other backends give
        lse = q.new_zeros(B, H, S, dtype=torch.promote_types(q.dtype, torch.float32))  # the kernel's lse dtype
        for rows, k_index, prefix, m in self.tiles(S, k.shape[2], q.device):
            if k_index is None:
                continue
            o, l = _flash_forward(q[:, :, rows], self.keys(k, k_index, prefix), self.keys(v, k_index, prefix),
                                  0.0, False, attn_mask=_additive(m, q.dtype), scale=scale)
            out[:, :, rows], lse[:, :, rows] = o, l
        return out, lse

    def backward(self, grad, q, k, v, out, lse, scale):
        gq, gk, gv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for rows, k_index, prefix, m in self.tiles(q.shape[2], k.shape[2], q.device):
            if k_index is None:
                continue
            dq, dk, dv = _flash_backward(grad[:, :, rows], q[:, :, rows], self.keys(k, k_index, prefix),
                                         self.keys(v, k_index, prefix), out[:, :, rows], lse[:, :, rows], 0.0,
                                         False, attn_mask=_additive(m, q.dtype), scale=scale)
            gq[:, :, rows] = dq
            if prefix is not None:
                gk[:, :, :prefix] += dk
                gv[:, :, :prefix] += dv
            else:
                gk.index_add_(2, k_index, dk)
                gv.index_add_(2, k_index, dv)
        return gq, gk, gv


class BlockGatherPlan:
    """Block-sparse key selection on the CPU, each query against exactly the key blocks it picked: for every
    (row, indexer head, key block), one kernel call over the queries that picked that block, and the partial
    results merged by their log-sum-exp (as flash-decoding merges its key splits).

    `TilePlan` runs each tile of queries over the union of its queries' picks, which for unrelated picks is
    nearly every earlier block: a (2048 tokens, 8 of 16 blocks) layer there computes more (query, key) pairs
    than full causal attention. Here the work is the pairs the selection keeps. The backward needs no merge:
    given the layer's final output and log-sum-exp, the kernel's backward over one block's keys gives exactly
    that block's share of dq and its keys' dk, dv.

    Under the plain causal rule (no padding, documents or window) a block's keys are all visible to the
    queries after it, which run without a mask, and a block's own queries see it causally from its start,
    which is the kernel's causal flag when all of them picked it. Such diagonal blocks of one size, side by
    side, run as one call, each block a batch entry of the kernel: one (block x block) causal call is mostly
    the kernel's fixed cost (about a quarter of its matmul rate at 128). Otherwise each call carries its rule
    mask and drops the queries that see none of the block."""

    def __init__(self, mask, window: int | None, blocks, heads: int):
        self.mask, self.window, self.blocks, self.heads = mask, window, blocks, heads
        self._calls = None

    def calls(self, n_queries: int, n_keys: int, device) -> list[tuple]:
        """Per kernel call: (row, first head, last head + 1, first key, last key + 1, queries (a slice or an int64
        index, ascending), causal block, additive-mask source (bool (1, 1, n, keys)) or None). A causal block c
        (else None) says the queries are the keys' own slots and run as (keys / c) blocks of c, each over its own
        keys with the causal flag. Made once, for the forward and the backward."""
        if self._calls is None:
            self._calls = self._plan(n_queries, n_keys, device)
        return self._calls

    def _plan(self, S: int, n_keys: int, device) -> list[tuple]:
        keep, mask = self.blocks.keep, self.mask
        B, h, _, n_blocks = keep.shape
        per_head = self.heads // h
        simple = mask.causal and mask.valid is None and mask.documents is None and self.window is None
        starts, ends = self.blocks.bounds(n_keys)  # per row and block: its key slots starts[b][j]:ends[b][j]
        # every pick as (row, head, block, query), grouped by (row, head, block), queries ascending
        picks = keep.permute(0, 1, 3, 2).nonzero()
        group = (picks[:, 0] * h + picks[:, 1]) * n_blocks + picks[:, 2]
        n_groups = B * h * n_blocks
        counts = torch.bincount(group, minlength=n_groups)
        queries = picks[:, 3]
        first_key = torch.tensor(starts, device=device)[picks[:, 0], picks[:, 2]]
        end_key = torch.tensor(ends, device=device)[picks[:, 0], picks[:, 2]]
        # queries before their block see none of it, inside it part of it (causally), after it all of it
        before = torch.bincount(group[queries < first_key], minlength=n_groups)
        inside = torch.bincount(group[(queries >= first_key) & (queries < end_key)], minlength=n_groups)
        calls, diagonal, start = [], {}, 0  # diagonal: per (row, heads), the blocks that run causally whole
        for gid, (n, n_before, n_inside) in enumerate(zip(counts.tolist(), before.tolist(), inside.tolist())):
            if n == 0:
                continue
            b, rest = divmod(gid, h * n_blocks)
            g, j = divmod(rest, n_blocks)
            k_lo, k_hi = starts[b][j], ends[b][j]
            heads = (b, g * per_head, (g + 1) * per_head, k_lo, k_hi)
            q = queries[start : start + n]
            start += n
            if k_hi == k_lo:  # a block id this row has no keys for
                continue
            if not simple:
                allowed = self._allowed(b, q, k_lo, k_hi)
                sees = allowed.any(dim=-1).view(-1)
                if not bool(sees.all()):
                    q, allowed = q[sees], allowed[:, :, sees]
                if q.numel():
                    calls.append((*heads, q, None, allowed))
                continue
            q_inside, q_after = q[n_before : n_before + n_inside], q[n_before + n_inside :]
            if n_inside == k_hi - k_lo:  # all of the block's own queries (picks are distinct)
                diagonal.setdefault(heads[:3], []).append((k_lo, k_hi))
            elif n_inside:
                calls.append((*heads, q_inside, None, self._allowed(b, q_inside, k_lo, k_hi)))
            if q_after.numel():
                calls.append((*heads, q_after, None, None))
        return _diagonal_runs(diagonal) + calls

    def _allowed(self, b: int, q: torch.Tensor, k_lo: int, k_hi: int) -> torch.Tensor:
        """The mask rule for row b's queries `q` against keys k_lo:k_hi: (1, 1, len(q), k_hi - k_lo) bool."""
        mask, keys = self.mask, slice(k_lo, k_hi)
        valid = None if mask.valid is None else mask.valid[b : b + 1, keys]
        docs = mask.documents
        return mask._visible(self.window, mask.positions[q], mask.positions[keys], valid,
                             None if docs is None else docs[b : b + 1, q], None if docs is None else docs[b : b + 1, keys])

    @staticmethod
    def _rows(t: torch.Tensor, queries) -> torch.Tensor:
        """The rows (dim 0) of a token-major t (S, ...) that `queries` lists. Token-major because gathering and
        scattering whole rows along dim 0 is a contiguous copy per row, where the same along dim 2 of a
        (B, H, S, D) view goes element-strided: several times slower at these sizes."""
        return t[queries] if isinstance(queries, slice) else t.index_select(0, queries)

    @staticmethod
    def _kernel_rows(t: torch.Tensor, block: int | None) -> torch.Tensor:
        """(n, H, ...) token-major rows -> the kernel's (n / block, H, block, ...) view of them, without a copy
        (block None: all n rows, one batch entry)."""
        return t.unflatten(0, (-1, block or t.shape[0])).transpose(1, 2)

    @staticmethod
    def _kernel_keys(t: torch.Tensor, b: int, heads: slice, k_lo: int, k_hi: int, block: int | None) -> torch.Tensor:
        """Row b's keys k_lo:k_hi of (B, H, S, D) t -> the kernel's ((k_hi - k_lo) / block, H, block, D) view."""
        return t[b, heads, k_lo:k_hi].unflatten(1, (-1, block or k_hi - k_lo)).transpose(0, 1)

    @staticmethod
    def _token_rows(t: torch.Tensor) -> torch.Tensor:
        """The kernel's (n / block, H, block, ...) -> (n, H, ...) token-major (a view for the kernel's own outputs)."""
        return t.transpose(1, 2).flatten(0, 1)

    def forward(self, q, k, v, scale):
        B, H, S, _ = q.shape
        lse_dtype = torch.promote_types(q.dtype, torch.float32)  # the kernel's lse dtype
        q_tokens = _token_major(q)
        # merged in float32 at least, token-major (the layout the kernel writes and the output projection reads);
        # a query that picked nothing it can see keeps 0, as other backends give
        out = q.new_zeros(B, S, H, v.shape[-1], dtype=lse_dtype)
        lse = q.new_full((B, S, H), float("-inf"), dtype=lse_dtype)
        for b, h0, h1, k_lo, k_hi, rows, block, allowed in self.calls(S, k.shape[2], q.device):
            heads = slice(h0, h1)
            o, l = _flash_forward(self._kernel_rows(self._rows(q_tokens[b, :, heads], rows), block),
                                  self._kernel_keys(k, b, heads, k_lo, k_hi, block),
                                  self._kernel_keys(v, b, heads, k_lo, k_hi, block), 0.0, block is not None,
                                  attn_mask=None if allowed is None else _additive(allowed, q.dtype), scale=scale)
            o, l = self._token_rows(o), self._token_rows(l)  # token-major: (n, heads, Dv), (n, heads)
            out_rows, lse_rows = out[b, :, heads], lse[b, :, heads]
            seen, seen_out = self._rows(lse_rows, rows), self._rows(out_rows, rows)  # a slice: views, merged in place
            merged = torch.logaddexp(seen, l)
            # the weights exp(seen - merged) and exp(l - merged) add up to 1: out + w (o - out), one fused lerp; a row's
            # first block (seen = -inf) has w = 1, which lerp makes exactly o
            mixed = seen_out.lerp_(o, (l - merged).exp_().unsqueeze(-1))
            if isinstance(rows, slice):
                lse_rows[rows] = merged
            else:
                out_rows.index_copy_(0, rows, mixed)
                lse_rows.index_copy_(0, rows, merged)
        return out.to(q.dtype).transpose(1, 2), lse.transpose(1, 2)

    def backward(self, grad, q, k, v, out, lse, scale):
        B, H, S, D = q.shape
        grad_q = q.new_zeros(B, S, H, D)  # token-major, like the gathers below
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        tokens = [_token_major(t) for t in (grad, q, out, lse)]
        for b, h0, h1, k_lo, k_hi, rows, block, allowed in self.calls(S, k.shape[2], q.device):
            heads = slice(h0, h1)
            g, q_rows, o, l = (self._kernel_rows(self._rows(t[b, :, heads], rows), block) for t in tokens)
            dq, dk, dv = _flash_backward(g, q_rows, self._kernel_keys(k, b, heads, k_lo, k_hi, block),
                                         self._kernel_keys(v, b, heads, k_lo, k_hi, block), o, l, 0.0, block is not None,
                                         attn_mask=None if allowed is None else _additive(allowed, q.dtype), scale=scale)
            dq = self._token_rows(dq)
            if isinstance(rows, slice):
                grad_q[b, rows, heads] += dq
            else:
                grad_q[b, :, heads].index_add_(0, rows, dq)
            grad_k[b, heads, k_lo:k_hi] += dk.transpose(0, 1).flatten(1, 2)
            grad_v[b, heads, k_lo:k_hi] += dv.transpose(0, 1).flatten(1, 2)
        return grad_q.transpose(1, 2), grad_k, grad_v


def _diagonal_runs(diagonal: dict) -> list[tuple]:
    """BlockGatherPlan calls for the blocks each (row, first head, last head + 1) runs causally whole
    (`diagonal`: their (first key, last key + 1), ascending): one call per run of side-by-side blocks of one size."""
    calls = []
    for heads, blocks in diagonal.items():
        run_lo, run_hi, size = *blocks[0], blocks[0][1] - blocks[0][0]
        for k_lo, k_hi in blocks[1:] + [(None, None)]:
            if k_lo == run_hi and k_hi - k_lo == size:
                run_hi = k_hi
                continue
            calls.append((*heads, run_lo, run_hi, slice(run_lo, run_hi), size, None))
            if k_lo is not None:
                run_lo, run_hi, size = k_lo, k_hi, k_hi - k_lo
    return calls


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, ...) -> (B, S, H, ...) contiguous: a view for the kernel's own layouts (q from its projection,
    the output, lse), a copy otherwise."""
    return t.transpose(1, 2).contiguous()
