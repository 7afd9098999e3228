"""Built-in model configs, chosen with `model.preset` and refined with `model.config` overrides.

A preset is an HF config dict without the ids that depend on the run's tokenizer and images
(vocabulary size, special token ids, image size); `plait.models.vlm.complete_config` fills those in.
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters: Pixtral vision tower (patch 8, 2x2 merge) + Ministral3 text decoder. A 48 px image
    # becomes 6x6 patches, merged to 9 placeholder tokens. Learns the `shapes` captions on 2 CPU cores in minutes.
    "tiny-mistral3": {
        "model_type": "mistral3",
        "spatial_merge_size": 2,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "multimodal_projector_bias": False,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "ministral3",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
            # Ministral3's own rope family (YaRN + llama-4 query scaling) at factor 1: plain RoPE at these lengths.
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                                "original_max_position_embeddings": 1024, "llama_4_scaling_beta": 0.1},
        },
        "vision_config": {
            "model_type": "pixtral",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "head_dim": 32,
            "patch_size": 8,
        },
    },
    # ~1M parameters: MiniMax-M3-VL (plait's native model; transformers loads its checkpoints):
    # vision tower with 3D RoPE (patch 8, temporal patch 1, 2x2 merge: 9 tokens per 48 px image) and a
    # 2-layer MoE decoder (4 experts, top-2, one shared expert, partial rotary 0.5) with aux-loss-free router
    # balancing (the default run's expert-load imbalance 1.58 -> 1.13, held-out loss 0.0040 -> 0.0019).
    # Weights drawn with std 0.06, not the reference's 0.02: at 0.02 the projector's four linears shrink the
    # image tokens to ~1/13 of the text embeddings' scale (and the vision tower's gradients with them), and the
    # model sits on an image-blind plateau for hundreds of steps, longer on some seeds than others.
    "tiny-minimax-m3": {
        "model_type": "minimax_m3_vl",
        "projector_hidden_size": 128,
        "tie_word_embeddings": False,
        "text_config": {
            "hidden_size": 128,
            "intermediate_size": 128,
            "dense_intermediate_size": 256,
            "shared_intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "routed_scaling_factor": 1.0,
            "max_position_embeddings": 1024,
            "mlp_layer_types": ["sparse", "sparse"],
            "layer_types": ["full_attention", "full_attention"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "router_bias_update_rate": 0.001,
            "initializer_range": 0.06,
        },
        "vision_config": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "patch_size": 8,
            "temporal_patch_size": 1,
            "spatial_merge_size": 2,
        },
    },
    # ~0.9M parameters: plait's native MiMo-V2-Flash, text only. Hybrid attention (full, then 8-token sliding
    # windows with sinks), Q/K head dim 48 vs V 32, dual-base partial RoPE, a dense first layer, then MoE layers
    # with 8 experts in 4 groups (top-2 from the best 2 groups) and aux-loss-free router balancing.
    "tiny-mimo-v2-flash": {
        "model_type": "mimo_v2_flash",
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 48,
        "v_head_dim": 32,
        "sliding_window": 8,
        "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 1.0,
        "attention_value_scale": 0.707,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334},
        },
        "router_bias_update_rate": 0.001,
    },
}


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: nested dicts merge key by key, anything else in `override` replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_dict(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; available: {sorted(PRESETS)}")
    return merge_dicts(PRESETS[name], overrides or {})
