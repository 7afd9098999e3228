"""Stock transformers models: build from a config or load from a local dir, never from the hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)


def to_hf_config(config: PretrainedConfig | dict[str, Any]) -> PretrainedConfig:
    if isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"config: expected a transformers PretrainedConfig or a dict with 'model_type', got {config!r:.200}")
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    try:
        config_class = AutoConfig.for_model(model_type).__class__
    except ValueError as e:
        raise ValueError(f"config: model_type {model_type!r} is unknown to transformers {transformers.__version__}: {e}") from None
    try:
        return config_class(**cfg)
    except Exception as e:  # transformers' own validators raise their own error types
        cause = e.__cause__ or e
        raise ValueError(f"config ({model_type}): {cause}") from None


def load_hf_config(path: str | Path) -> PretrainedConfig:
    """A local model dir's config.json as its transformers config class; nothing is downloaded. The config
    class's validators raise their own error types (huggingface_hub's strict dataclasses): a ValueError here."""
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        cause = e.__cause__ or e
        raise ValueError(f"{Path(path) / 'config.json'}: {cause}") from None


def stock_model_class(model_type: str) -> type:
    """Vision-language models get their image-text-to-text class, text models their causal-LM class."""
    for mapping in (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if model_type in mapping:
            return getattr(transformers, mapping[model_type])
    raise ValueError(
        f"model_type {model_type!r}: no transformers causal-LM or image-text-to-text class to build it with"
    )


def build_stock_model(config: PretrainedConfig, attn_implementation: str = "sdpa") -> torch.nn.Module:
    cls = stock_model_class(config.model_type)
    return cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)


def load_stock_model(path: Path, config: PretrainedConfig, attn_implementation: str = "sdpa") -> torch.nn.Module:
    cls = stock_model_class(config.model_type)
    try:
        return cls.from_pretrained(
            path, config=config, local_files_only=True, attn_implementation=attn_implementation, dtype=torch.float32
        )
    except (AttributeError, TypeError, KeyError) as e:  # a config.json whose fields do not fit its model_type
        raise ValueError(f"{path}: transformers cannot build {cls.__name__} from this checkpoint's config.json "
                         f"(model_type {config.model_type!r}; {type(e).__name__}: {e})") from None
