"""Random MiMo-V2-Flash cases against transformers 5.23.0: the interface in `tests/sweeps/common.py`.

A case varies what the released architecture lets a config vary: the layer pattern (full / sliding window, dense /
MoE), the window against the sequence (shorter, equal, longer), KV heads (sliding layers have twice the full layers'),
Q/K and V head dims, the value scale, dual-base partial RoPE with linear / yarn scaling on either layer type, experts,
top-k, group-limited routing, the correction bias, routed scaling, normalised or raw top-k weights, biases, tied
embeddings, the gated activation; and the inputs: batch, length, left padding, a packed row, plait's attention
backend and experts implementation.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import MiMoV2FlashForCausalLM as Reference
from transformers.models.mimo_v2_flash.configuration_mimo_v2_flash import MiMoV2FlashConfig

from plait.generate import generate, left_pad
from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
from tests.nn.reference import assert_close, assert_grads_close
from tests.sweeps.common import assert_same_generation, greedy_without_cache, run_reference

VOCAB = 64
ACTIVATIONS = ("silu", "silu", "silu", "gelu", "gelu_pytorch_tanh", "relu", "quick_gelu")


def _rope(rng: random.Random, rotary_factor: float) -> dict:
    entry = {"rope_type": "default", "rope_theta": rng.choice([1e4, 1e5, 5e6]), "partial_rotary_factor": rotary_factor}
    kind = rng.choice(["default", "default", "linear", "yarn"])
    if kind == "linear":
        entry |= {"rope_type": "linear", "factor": rng.choice([2.0, 4.0])}
    elif kind == "yarn":
        entry |= {"rope_type": "yarn", "factor": rng.choice([2.0, 4.0]), "original_max_position_embeddings": 16}
    return entry


def random_case(seed: int) -> dict:
    rng = random.Random(seed)
    layers = rng.randint(1, 4)
    kv = rng.choice([1, 1, 2])
    heads = 2 * kv * rng.choice([1, 2])  # sliding layers double the KV heads, which must divide the query heads
    head_dim = 2 * rng.randint(2, 12)
    # a rotary width that is even and at least 2 (transformers rotates int(head_dim * factor) dims)
    factors = [f for f in (0.25, 0.334, 0.5, 1.0) if int(head_dim * f) >= 2 and int(head_dim * f) % 2 == 0]
    rotary = rng.choice(factors)
    experts = rng.choice([2, 4, 6, 8])
    # transformers scores a group by its top-2 experts and fails on groups of one (plait takes min(2, size))
    n_group = rng.choice([g for g in (1, 2, 4) if experts % g == 0 and experts // g >= 2])
    topk_group = rng.randint(1, n_group)
    top_k = rng.randint(1, min(3, topk_group * experts // n_group))
    seq = rng.randint(1, 24)
    config = dict(
        vocab_size=VOCAB, hidden_size=8 * rng.randint(2, 6), intermediate_size=8 * rng.randint(2, 6),
        moe_intermediate_size=4 * rng.randint(2, 8), num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, v_head_dim=2 * rng.randint(2, 10),
        sliding_window=rng.choice([1, 2, 3, 5, 8, seq, seq + 1, 64]),
        n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=rng.choice([1.0, 2.5, 0.5]), norm_topk_prob=rng.random() < 0.8,
        attention_value_scale=rng.choice([None, 0.707, 1.3]), attention_bias=rng.random() < 0.3,
        tie_word_embeddings=rng.random() < 0.2, hidden_act=rng.choice(ACTIVATIONS),
        layer_types=[rng.choice(["full_attention", "sliding_attention"]) for _ in range(layers)],
        mlp_layer_types=[rng.choice(["dense", "sparse", "sparse"]) for _ in range(layers)],
        max_position_embeddings=64,
        rope_parameters={"full_attention": _rope(rng, rotary), "sliding_attention": _rope(rng, rotary)},
    )
    batch = rng.randint(1, 3)
    pads = [rng.choice([0, 0, rng.randint(0, max(0, seq - 1))]) for _ in range(batch)]
    return {"seed": seed, "config": config, "batch": batch, "seq": seq, "left_pad": pads,
            "packed": rng.random() < 0.3 and seq >= 4, "backend": rng.choice(["sdpa", "sdpa", "eager"]),
            "experts_impl": rng.choice(["auto", "grouped", "loop"])}


def _reference(case: dict) -> Reference:
    cfg = MiMoV2FlashConfig(**case["config"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(case["seed"])
    ref = run_reference(Reference, cfg).eval()
    g = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        # weights at 1/sqrt(fan-in), so activations and logits are O(1) and a difference cannot hide in their
        # smallness; sinks, biases and norms (the reference inits them to constants) random to test their wiring
        for name, p in ref.named_parameters():
            std = 0.3 if p.dim() == 1 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return ref


def _batch(case: dict) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(case["seed"] + 1)
    ids = torch.randint(0, VOCAB, (case["batch"], case["seq"]), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(case["left_pad"]):
        mask[row, :pad] = 0
    # no loss on pads nor on the first real token (its context is padding only)
    first = torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 0
    labels = ids.masked_fill((mask == 0) | first, -100)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, labels


def _gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def check(case: dict, workdir: Path) -> dict:
    ref = _reference(case)
    ref.save_pretrained(workdir / "ref")
    ours = MiMoV2FlashForCausalLM.from_pretrained(workdir / "ref", backend=case["backend"],
                                                  experts_impl=case["experts_impl"]).eval()
    ids, mask, pos, labels = _batch(case)
    diffs = {}
    out_ref = run_reference(ref, input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    valid = mask.bool().unsqueeze(-1)
    diffs["logits"] = assert_close(out.logits * valid, out_ref.logits * valid, 1e-4, "logits")
    if (labels != -100).any():
        diffs["loss"] = assert_close(out.loss, out_ref.loss, 1e-4, "loss")
        out_ref.loss.backward()
        out.loss.backward()
        diffs["grad_vs_tol"] = assert_grads_close(_gradients(ours), _gradients(ref), rel=1e-3, floor=1e-7)

    if case["packed"]:  # transformers' mask crosses documents in a packed row: its reference is each alone
        cut = case["seq"] // 2
        row = ids[:1]
        packed_pos = torch.cat([torch.arange(cut), torch.arange(case["seq"] - cut)]).view(1, -1)
        with torch.no_grad():
            packed = ours(input_ids=row, position_ids=packed_pos).logits
            alone = torch.cat([run_reference(ref, input_ids=row[:, :cut]).logits,
                               run_reference(ref, input_ids=row[:, cut:]).logits], dim=1)
        diffs["packed_logits"] = assert_close(packed, alone, 1e-4, "packed logits")

    prompts = [ids[r][mask[r].bool()] for r in range(ids.shape[0]) if mask[r].any()]
    if prompts:
        prompt_ids, prompt_mask = left_pad(prompts, pad_id=0)
        kw = dict(max_new_tokens=6, eos_token_id=VOCAB - 1, pad_token_id=0)
        new = generate(ours, prompt_ids, prompt_mask, **kw)
        new_ref = run_reference(generate, ref, prompt_ids, prompt_mask, **kw)
        if not torch.equal(new, new_ref):
            uncached = [run_reference(greedy_without_cache, ref, p, kw["max_new_tokens"]) for p in prompts]
            assert_same_generation(new, new_ref, uncached, kw["eos_token_id"])

    ours.save_pretrained(workdir / "ours")
    reloaded = run_reference(Reference.from_pretrained, workdir / "ours").eval()
    with torch.no_grad():
        diffs["roundtrip_logits"] = assert_close(run_reference(reloaded, input_ids=ids).logits,
                                                 run_reference(ref, input_ids=ids).logits, 1e-6, "round trip")
    return diffs
