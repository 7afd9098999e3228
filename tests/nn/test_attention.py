import itertools

import pytest
import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import (
    MiMoV2FlashAttention,
    MiMoV2FlashRotaryEmbedding,
)
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLAttention, MiniMaxM3VLRotaryEmbedding

from plait.nn import attention as attention_module
from plait.nn import sdpa as sdpa_module
from plait.nn.attention import (
    Attention,
    AttentionMask,
    KeyBlocks,
    LayerKVCache,
    attend,
    documents_from_cu_seqlens,
)
from plait.nn.rope import RotaryEmbedding, rotary_per_layer_type
from tests.nn.reference import assert_close, assert_grads_close, m3_text_config, mimo_config, randomize_


def _inputs(B, H, Hk, S, D, Dv, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g).to(device).requires_grad_()
    k = torch.randn(B, Hk, S, D, generator=g).to(device).requires_grad_()
    v = torch.randn(B, Hk, S, Dv, generator=g).to(device).requires_grad_()
    return q, k, v


def _mask(kind, B, S, device="cpu"):
    if kind == "plain":
        return AttentionMask.build(B, S, device)
    if kind == "padded":  # left padding in row 0, right padding in row 1
        pad = torch.ones(B, S, dtype=torch.long)
        pad[0, :4] = 0
        pad[-1, -3:] = 0
        return AttentionMask.build(B, S, device, padding_mask=pad.to(device))
    if kind == "packed":  # three documents per row, marked by restarting position ids
        cut1, cut2 = S // 4, S // 2 + 1
        pos = torch.cat([torch.arange(cut1), torch.arange(cut2 - cut1), torch.arange(S - cut2)])
        return AttentionMask.build(B, S, device, position_ids=pos.expand(B, S).to(device))
    raise AssertionError(kind)


def _run(backend, q, k, v, mask, sinks, **kw):
    return _run_fn(lambda q, k, v: attend(q, k, v, mask, sinks=sinks, backend=backend, **kw), q, k, v, sinks)


def _run_fn(fn, q, k, v, sinks=None):
    """fn(q, k, v) and the gradients of a fixed weighting of its output."""
    for t in (q, k, v, sinks):
        if t is not None:
            t.grad = None
    out = fn(q, k, v)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out * weight).sum().backward()
    grads = {n: t.grad.clone() for n, t in zip("qkvs", (q, k, v, sinks)) if t is not None}
    return out.detach(), grads


CASES = list(itertools.product(
    ["plain", "padded", "packed"],
    [None, 1, 4, 9, 64],  # window (64 >= S: same as full)
    [False, True],  # sinks
    [(4, 2, 16, 16), (4, 1, 24, 16), (2, 2, 8, 12)],  # heads, kv heads, qk dim, v dim
))


@pytest.mark.parametrize("mask_kind, window, with_sinks, dims", CASES)
def test_sdpa_matches_eager_reference(mask_kind, window, with_sinks, dims):
    H, Hk, D, Dv = dims
    B, S = 2, 37
    q, k, v = _inputs(B, H, Hk, S, D, Dv)
    sinks = torch.randn(H).requires_grad_() if with_sinks else None
    mask = _mask(mask_kind, B, S)
    out_ref, g_ref = _run("eager", q, k, v, mask, sinks, scale=D**-0.5, window=window)
    out, g = _run("sdpa", q, k, v, mask, sinks, scale=D**-0.5, window=window)
    assert_close(out, out_ref, tol=1e-5)
    assert_grads_close(g, g_ref)


def _random_key_blocks(B, h, S, block, picks, seed=0, own_block=True, device="cpu"):
    """Each query keeps `picks` random blocks among those that start at or before it, plus its own (when
    `own_block`; otherwise some queries leave out the block they sit in)."""
    g = torch.Generator().manual_seed(seed)
    own = (torch.arange(S) // block).view(1, 1, S, 1)
    return KeyBlocks(_random_picks(g, B, h, S, -(-S // block), own, picks, own_block).to(device), block)


def _random_picks(g, B, h, S, n_blocks, own, picks, own_block=True):
    """(B, h, S, n_blocks) bool: up to `picks` random blocks at or before each query's own block `own`
    ((B | 1, 1, S, 1)), plus the own block when `own_block`."""
    scores = torch.rand(B, h, S, n_blocks, generator=g).masked_fill(torch.arange(n_blocks) > own, -1.0)
    keep = torch.zeros(B, h, S, n_blocks, dtype=torch.bool)
    keep.scatter_(-1, scores.topk(min(picks, n_blocks), dim=-1).indices, True)
    keep &= scores >= 0
    if own_block:
        keep.scatter_(-1, own.expand(B, h, S, 1), True)
    return keep


@pytest.mark.parametrize("mask_kind", ["plain", "padded", "packed"])
@pytest.mark.parametrize("dims, index_heads", [((4, 1, 16, 16), 1), ((4, 2, 16, 12), 2), ((2, 2, 8, 8), 2)])
@pytest.mark.parametrize("own_block, window", [(True, None), (False, None), (True, 6)])
def test_key_block_selection_matches_eager(monkeypatch, mask_kind, dims, index_heads, own_block, window):
    # the CPU runs each block over exactly the queries that picked it (BlockGatherPlan)
    H, Hk, D, Dv = dims
    B, S = 2, 45
    q, k, v = _inputs(B, H, Hk, S, D, Dv)
    mask = _mask(mask_kind, B, S)
    blocks = _random_key_blocks(B, index_heads, S, block=4, picks=3, own_block=own_block)
    _check_key_blocks_against_eager(monkeypatch, q, k, v, mask, blocks, window)


def _check_key_blocks_against_eager(monkeypatch, q, k, v, mask, blocks, window):
    """sdpa (the CPU's block-gather plan), the GPU's query-tile plan and flex against eager under `blocks`:
    outputs within 1e-5 and gradients, and the selection does narrow attention."""
    D = q.shape[-1]
    out_ref, g_ref = _run("eager", q, k, v, mask, None, scale=D**-0.5, window=window, restrict=blocks)
    out, g = _run("sdpa", q, k, v, mask, None, scale=D**-0.5, window=window, restrict=blocks)
    assert_close(out, out_ref, tol=1e-5)
    assert_grads_close(g, g_ref)
    # the GPU's SDPA path (query tiles over the union of their picks, `TilePlan`) runs on the CPU too: small
    # tiles, so a sequence runs in several of them and each tile gathers its own union of blocks
    monkeypatch.setattr(sdpa_module, "SPARSE_TILE_QUERIES", 8)
    out_tiles, g_tiles = _run_fn(lambda q, k, v: attention_module._block_sparse_attention(
        q, k, v, mask, blocks, scale=D**-0.5, window=window), q, k, v)
    assert_close(out_tiles, out_ref, tol=1e-5)
    assert_grads_close(g_tiles, g_ref)
    with torch.no_grad():  # and the selection does narrow attention
        full = attend(q, k, v, mask, scale=D**-0.5, window=window, backend="eager")
        flex = attend(q, k, v, mask, scale=D**-0.5, window=window, backend="flex", restrict=blocks)
    assert (full - out_ref).abs().max() > 1e-3
    assert_close(flex, out_ref, tol=1e-5)


def _random_id_blocks(B, h, S, picks, seed=0):
    """KeyBlocks by block ids: each row cut into runs of 1-6 consecutive keys (rows differ), each query keeping
    its own run and up to `picks` random runs that start at or before it."""
    g = torch.Generator().manual_seed(seed)
    key_block = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        sizes = torch.randint(1, 7, (S,), generator=g)
        key_block[b] = torch.repeat_interleave(torch.arange(S), sizes)[:S]
    keep = _random_picks(g, B, h, S, int(key_block.max()) + 1, key_block.view(B, 1, S, 1), picks)
    return KeyBlocks(keep, 4, key_block)


@pytest.mark.parametrize("mask_kind", ["plain", "padded", "packed"])
@pytest.mark.parametrize("index_heads, window", [(1, None), (2, None), (2, 6)])
def test_key_blocks_by_id_match_eager(monkeypatch, mask_kind, index_heads, window):
    # blocks given as per-row runs of keys (what an indexer over padded or packed rows picks): the block-gather
    # plan, the query-tile plan and flex against the dense rule
    H, Hk, D, Dv = 4, 2, 16, 12
    B, S = 2, 45
    q, k, v = _inputs(B, H, Hk, S, D, Dv)
    mask = _mask(mask_kind, B, S)
    blocks = _random_id_blocks(B, index_heads, S, picks=3)
    _check_key_blocks_against_eager(monkeypatch, q, k, v, mask, blocks, window)
    with pytest.raises(ValueError, match="key_block"):
        attend(q, k, v, mask, scale=1.0, restrict=KeyBlocks(blocks.keep, 4, blocks.key_block[:, :-1]))


def test_key_block_selection_computes_only_the_pairs_it_keeps():
    # causal rule, each query's own block among its picks: every kernel call's (query, key) pairs are visible
    # and selected, and together they are all such pairs (a query tile over the union of its picks would
    # compute many more)
    B, H, S, block = 2, 4, 64, 8
    mask = AttentionMask.build(B, S, "cpu")
    blocks = _random_key_blocks(B, 1, S, block=block, picks=3)
    plan = sdpa_module.BlockGatherPlan(mask, None, blocks, H)
    computed, causal_calls = 0, []
    for b, h0, h1, k_lo, k_hi, rows, block, allowed in plan.calls(S, S, "cpu"):
        if block:
            causal_calls.append((b, h0, k_lo, k_hi))
        n = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
        assert allowed is None
        # a causal call runs n / block diagonal blocks, each its queries over its own keys
        computed += (h1 - h0) * ((n // block) * block * (block + 1) // 2 if block else n * (k_hi - k_lo))
    kept = int((mask.dense(None) & blocks.dense(H, S)).sum())
    assert computed == kept
    # every query picked its own block, and the blocks of a row's diagonal run side by side as one call
    assert sorted(causal_calls) == [(b, 0, 0, S) for b in range(B)]
    tiles = sum(H * (rows.stop - rows.start) * k_index.numel()
                for rows, k_index, _, _ in sdpa_module.TilePlan(mask, None, blocks, H).tiles(S, S, "cpu"))
    assert tiles > 1.3 * kept


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps from `fn()` for its backward."""
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())


@pytest.mark.parametrize("case", ["causal", "window_with_sinks", "padded_window", "key_blocks"])
def test_cpu_sdpa_saves_the_layers_own_tensors_not_the_kernels_operands(case):
    # the kernel wants K/V repeated per query head, V padded to the Q/K head dim and a window's keys unfolded
    # into overlapping blocks; the backward builds those again, so only q, k, v, output and lse are kept
    B, H, Hk, S, D, Dv = 2, 4, 1, 64, 16, 8
    q, k, v = _inputs(B, H, Hk, S, D, Dv)
    sinks = torch.randn(H).requires_grad_() if case == "window_with_sinks" else None
    mask = _mask("padded" if case == "padded_window" else "plain", B, S)
    window = 9 if "window" in case else None
    restrict = _random_key_blocks(B, 1, S, block=8, picks=3) if case == "key_blocks" else None
    saved = _saved_bytes(lambda: attend(q, k, v, mask, scale=D**-0.5, window=window, sinks=sinks, restrict=restrict))
    own = sum(t.nbytes for t in (q, k, v)) + B * H * S * (Dv + 1) * 4 + (sinks.nbytes if sinks is not None else 0)
    assert saved <= own


def test_cpu_sdpa_under_bf16_autocast_runs_the_kernel_in_bf16():
    q, k, v = _inputs(1, 4, 2, 40, 16, 8)
    mask = AttentionMask.build(1, 40, "cpu")
    sinks = torch.randn(4).requires_grad_()
    ref = attend(q, k, v, mask, scale=0.25, window=7, sinks=sinks, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, mask, scale=0.25, window=7, sinks=sinks)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and sinks.grad is not None
    assert (out.float() - ref).abs().max() < 5e-2

def test_key_blocks_of_the_wrong_shape_are_refused():
    q, k, v = _inputs(1, 4, 2, 10, 8, 8)
    mask = AttentionMask.build(1, 10, "cpu")
    with pytest.raises(ValueError, match=r"key blocks: expected a bool tensor \[1, heads dividing 4, 10, 3\]"):
        attend(q, k, v, mask, scale=1.0, restrict=KeyBlocks(torch.ones(1, 1, 10, 2, dtype=torch.bool), 4))
    with pytest.raises(ValueError, match="key blocks"):
        attend(q, k, v, mask, scale=1.0, restrict=KeyBlocks(torch.ones(1, 3, 10, 3, dtype=torch.bool), 4))


@pytest.mark.parametrize("window, with_sinks", [(None, False), (5, True), (None, True)])
def test_flex_forward_matches_eager(window, with_sinks):
    # FlexAttention runs uncompiled and forward-only on CPU; on GPU the same code is compiled.
    q, k, v = _inputs(2, 4, 2, 40, 16, 8)
    sinks = torch.randn(4) if with_sinks else None
    mask = _mask("packed", 2, 40)
    with torch.no_grad():
        ref = attend(q, k, v, mask, scale=0.25, window=window, sinks=sinks, backend="eager")
        out = attend(q, k, v, mask, scale=0.25, window=window, sinks=sinks, backend="flex")
    assert_close(out, ref)


def test_softcap_is_applied_before_the_mask_and_sinks():
    q, k, v = _inputs(1, 2, 2, 12, 8, 8)
    mask = _mask("plain", 1, 12)
    with torch.no_grad():
        capped = attend(q * 30, k, v, mask, scale=1.0, softcap=5.0, backend="sdpa")
        manual = attend(q * 30, k, v, mask, scale=1.0, backend="eager")
    assert not torch.allclose(capped, manual)
    # a cap far above every logit changes nothing
    with torch.no_grad():
        loose = attend(q, k, v, mask, scale=0.3, softcap=1e6, backend="sdpa")
        plain = attend(q, k, v, mask, scale=0.3, backend="sdpa")
    assert_close(loose, plain, tol=1e-5)


def test_packed_documents_do_not_see_each_other():
    q, k, v = _inputs(1, 2, 2, 20, 8, 8)
    pos = torch.cat([torch.arange(8), torch.arange(12)]).view(1, 20)
    packed = attend(q, k, v, AttentionMask.build(1, 20, "cpu", position_ids=pos), scale=0.3)
    second = attend(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], AttentionMask.build(1, 12, "cpu"), scale=0.3)
    assert_close(packed[:, :, 8:], second)
    cu = torch.tensor([0, 8, 20])
    assert torch.equal(documents_from_cu_seqlens(cu, 1, 20), torch.tensor([[0] * 8 + [1] * 12]))


@pytest.mark.parametrize("window, with_sinks", [(None, False), (4, True), (1, False)])
def test_kv_cache_decoding_matches_the_full_forward(window, with_sinks):
    torch.manual_seed(0)
    attn = randomize_(Attention(32, 4, 2, 8, 6, sliding_window=window, sinks=with_sinks, qk_norm="rms_unit_offset"))
    rope = RotaryEmbedding(8, 10000.0)
    x = torch.randn(2, 11, 32)
    pad = torch.ones(2, 11, dtype=torch.long)
    pad[1, :3] = 0  # left-padded prompt in row 1
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = attn(x, rope(pos), AttentionMask.build(2, 11, "cpu", padding_mask=pad))
        cache = LayerKVCache(window)
        steps = [attn(x[:, :6], rope(pos[:, :6]), AttentionMask.build(2, 6, "cpu", padding_mask=pad[:, :6]), cache)]
        for t in range(6, 11):
            m = AttentionMask.build(2, 1, "cpu", padding_mask=pad[:, : t + 1], past_length=t)
            steps.append(attn(x[:, t : t + 1], rope(pos[:, t : t + 1]), m, cache))
            if window is not None:
                assert cache.length <= window - 1
    assert_close(torch.cat(steps, dim=1)[0], full[0])
    assert_close(torch.cat(steps, dim=1)[1, 3:], full[1, 3:])


def _hf_mask(cfg, sliding, x, pad, pos):
    fn = create_sliding_window_causal_mask if sliding else create_causal_mask
    return fn(cfg, x, pad, None, position_ids=pos)


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["full", "sliding_with_sinks"])
@pytest.mark.parametrize("inputs", ["padded", "packed"])
def test_mimo_v2_flash_attention_matches_transformers(layer_idx, inputs):
    cfg = mimo_config()
    ref = randomize_(MiMoV2FlashAttention(cfg, layer_idx), seed=3, std=0.2)
    sliding = cfg.layer_types[layer_idx] == "sliding_attention"
    ours = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads * (2 if sliding else 1),
                     cfg.head_dim, cfg.v_head_dim, value_scale=cfg.attention_value_scale,
                     sliding_window=cfg.sliding_window if sliding else None, sinks=sliding)
    ours.load_state_dict(ref.state_dict())
    B, S = 2, 19
    x = torch.randn(B, S, cfg.hidden_size, requires_grad=True)
    if inputs == "padded":
        pad = torch.ones(B, S, dtype=torch.long)
        pad[0, :5] = 0
        pos = (pad.cumsum(-1) - 1).clamp(min=0)
        hf_pad, mask = pad, AttentionMask.build(B, S, "cpu", padding_mask=pad)
    else:
        pos = torch.cat([torch.arange(7), torch.arange(12)]).expand(B, S)
        hf_pad, mask = None, AttentionMask.build(B, S, "cpu", position_ids=pos)
    layer_type = cfg.layer_types[layer_idx]
    cos, sin = MiMoV2FlashRotaryEmbedding(cfg)(x, pos, layer_type)
    out_ref, _ = ref(x, (cos, sin), _hf_mask(cfg, sliding, x, hf_pad, pos))
    rope = rotary_per_layer_type(cfg.head_dim, cfg.rope_parameters, 0.334)[layer_type]
    out = ours(x, rope(pos), mask)
    keep = (hf_pad.bool() if hf_pad is not None else torch.ones(B, S, dtype=torch.bool)).unsqueeze(-1)
    assert_close(out * keep, out_ref * keep, tol=1e-5)
    w = torch.linspace(-1, 1, out.numel()).view_as(out) * keep
    g = dict(zip(["x", *dict(ours.named_parameters())], torch.autograd.grad((out * w).sum(), [x, *ours.parameters()])))
    g_ref = dict(zip(["x", *dict(ref.named_parameters())], torch.autograd.grad((out_ref * w).sum(), [x, *ref.parameters()])))
    assert_grads_close(g, g_ref)


def test_minimax_m3_attention_with_qk_norm_and_partial_rope_matches_transformers():
    cfg = m3_text_config()
    ref = randomize_(MiniMaxM3VLAttention(cfg, 0), seed=4, std=0.2)
    ours = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     qk_norm="rms_unit_offset", norm_eps=cfg.rms_norm_eps)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 13, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(13).expand(2, 13)
    cos, sin = MiniMaxM3VLRotaryEmbedding(cfg)(x, pos)
    out_ref, _ = ref(x, (cos, sin), create_causal_mask(cfg, x, None, None, position_ids=pos))
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_parameters["rope_theta"], cfg.rope_parameters["partial_rotary_factor"])
    out = ours(x, rope(pos), AttentionMask.build(2, 13, "cpu"))
    assert_close(out, out_ref)
    g = torch.autograd.grad(out.pow(2).sum(), [x, *ours.parameters()])
    g_ref = torch.autograd.grad(out_ref.pow(2).sum(), [x, *ref.parameters()])
    assert_grads_close(dict(enumerate(g)), dict(enumerate(g_ref)))


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(32, 6, 4, 8)
    with pytest.raises(ValueError, match="sliding_window"):
        Attention(32, 4, 2, 8, sliding_window=0)
    with pytest.raises(ValueError, match="backend"):
        Attention(32, 4, 2, 8, backend="xformers")
    q, k, v = _inputs(1, 4, 2, 6, 8, 8)
    with pytest.raises(ValueError, match="positions for 6 queries"):
        attend(q, k, v, AttentionMask.build(1, 5, "cpu"), scale=1.0)
    with pytest.raises(ValueError, match="sinks"):
        attend(q, k, v, AttentionMask.build(1, 6, "cpu"), scale=1.0, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="attention_mask"):
        AttentionMask.build(2, 6, "cpu", padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        AttentionMask.build(1, 6, "cpu", cu_seqlens=torch.tensor([0, 4]))
