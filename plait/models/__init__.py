"""Model registry: `model_type` -> plait's native class; anything else is the stock transformers model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from plait.checkpoint import CONFIG_FILE, check_model_dir
from plait.models.hf import build_stock_model, load_hf_config, load_stock_model, to_hf_config  # noqa: F401  (re-exported)

from plait.models.mimo import MIMO_MODEL_TYPE, MimoModel
from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
from plait.models.minimax_m3 import MiniMaxM3SparseForCausalLM, MiniMaxM3SparseForConditionalGeneration

# model_type -> plait's native class (with `from_config` / `from_pretrained`)
NATIVE_MODELS: dict[str, type] = {
    "mimo_v2_flash": MiMoV2FlashForCausalLM,
    "minimax_m3_vl": MiniMaxM3SparseForConditionalGeneration,
    "minimax_m3_vl_text": MiniMaxM3SparseForCausalLM,
}


def is_native(model: torch.nn.Module) -> bool:
    """Whether `model` is one of plait's native classes: they take labels and compute their cross-entropies from the
    hidden states chunk by chunk, skip padding in their feed-forward layers and cut into plait's pipeline stages."""
    return type(model) in set(NATIVE_MODELS.values())


def from_config(config: PretrainedConfig | dict[str, Any], attn_implementation: str = "sdpa",
                implementation: str = "native") -> torch.nn.Module:
    """A randomly initialised model: plait's native class for its `model_type`, else the stock transformers one."""
    hf_config = to_hf_config(config)
    native = NATIVE_MODELS.get(hf_config.model_type) if implementation == "native" else None
    if native is not None:
        return native.from_config(hf_config, backend=attn_implementation)
    return build_stock_model(hf_config, attn_implementation)


def _model_type(path: Path) -> str:
    return json.loads((path / CONFIG_FILE).read_text())["model_type"]  # check_model_dir has read it once


def from_pretrained(path: str | Path, attn_implementation: str = "sdpa", implementation: str = "native") -> torch.nn.Module:
    """Load a local HF-format model dir (config.json + safetensors). Nothing is downloaded."""
    path = check_model_dir(path)
    if _model_type(path) == MIMO_MODEL_TYPE:  # plait's own composition, unknown to transformers
        return MimoModel.from_pretrained(path)
    hf_config = load_hf_config(path)
    native = NATIVE_MODELS.get(hf_config.model_type) if implementation == "native" else None
    if native is not None:
        return native.from_pretrained(path, backend=attn_implementation)
    return load_stock_model(path, hf_config, attn_implementation)
