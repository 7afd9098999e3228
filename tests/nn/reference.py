"""Tiny transformers 5.23.0 reference configs and helpers shared by the building-block parity tests."""

from __future__ import annotations

import torch
from transformers.models.mimo_v2_flash.configuration_mimo_v2_flash import MiMoV2FlashConfig
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig


def mimo_config(**overrides) -> MiMoV2FlashConfig:
    kw = dict(
        vocab_size=64, hidden_size=48, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16, sliding_window=5,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"],
        attention_value_scale=0.707,
    )
    kw.update(overrides)
    cfg = MiMoV2FlashConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def m3_text_config(**overrides) -> MiniMaxM3VLTextConfig:
    kw = dict(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
        shared_intermediate_size=24, dense_intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, routed_scaling_factor=2.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    kw.update(overrides)
    cfg = MiniMaxM3VLTextConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter and floating buffer drawn at random (zero-init norms and sinks included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return module


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, name: str = "") -> float:
    """The largest absolute difference, asserted at most `tol`."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} vs {list(expected.shape)}"
    diff = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert diff <= tol, f"{name}: max abs diff {diff:.3e} > {tol:.1e}"
    return diff


# float32 rounding on a gradient that is zero in exact arithmetic (a query that sees one key: the softmax is
# constant) scales with the gradients it is computed beside: a few float32 ulps of the largest of them
NOISE_OF_LARGEST = 1e-6


def assert_grads_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], rel: float = 1e-5,
                       floor: float = 1e-6) -> float:
    """Each gradient within rel * max|reference gradient| (at least `floor`, and at least NOISE_OF_LARGEST times
    the largest reference gradient of all, for float32 noise on gradients near zero); returns the worst ratio of a
    difference to its tolerance (at most 1)."""
    assert ours.keys() == theirs.keys(), f"{sorted(ours)} vs {sorted(theirs)}"
    largest = max((t.abs().max().item() for t in theirs.values() if t.numel()), default=0.0)
    floor = max(floor, NOISE_OF_LARGEST * largest)
    worst = 0.0
    for name in ours:
        tol = max(rel * theirs[name].abs().max().item(), floor)
        worst = max(worst, assert_close(ours[name], theirs[name], tol=tol, name=f"grad {name}") / tol)
    return worst
