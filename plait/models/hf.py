"""Stock transformers models: build from a config or load from a local dir, never from the hub."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
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


def config_keys(config_class: type) -> set[str]:
    """The settings a transformers config class knows: its declared fields, what a default instance holds, its
    public properties and its attribute aliases."""
    keys = {f.name for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else set()
    keys |= {k for k in vars(config_class()) if not k.startswith("_")}
    keys |= {n for n in dir(config_class)
             if not n.startswith("_") and isinstance(inspect.getattr_static(config_class, n, None), property)}
    return keys | set(getattr(config_class, "attribute_map", {}) or {})


# Settings plait's native MoE models read from the (text) config that transformers' classes do not declare.
PLAIT_CONFIG_KEYS = frozenset({"router_bias_update_rate", "moe_aux_loss_coef"})


def check_config_overrides(config: dict[str, Any], overrides: dict[str, Any], where: str = "model.config") -> None:
    """Every key of `overrides` (nested into sub-configs) must be a setting of the config class it lands in, or
    one of plait's own (`PLAIT_CONFIG_KEYS`): transformers keeps an unknown keyword as a plain attribute, so a
    misspelt setting would otherwise be ignored without a word. `config` is the merged dict (its `model_type`s
    pick the classes)."""
    config_class = _config_class(config)
    if config_class is None:
        return  # to_hf_config names an unknown or missing model_type
    known = _settings(config_class)
    sub_configs = {key: sub for key in getattr(config_class, "sub_configs", {}) or {}
                   if isinstance(sub := config.get(key), dict)}
    for key, value in overrides.items():
        if key == "model_type":
            continue
        if key not in known:
            raise ValueError(f"{where}.{key}: not a setting of {config_class.__name__} (transformers "
                             f"{transformers.__version__}){_closest(key, known, sub_configs, config_class)}")
        if key in sub_configs and isinstance(value, dict):
            check_config_overrides(_with_model_type(sub_configs[key], config_class, key), value, f"{where}.{key}")


def _settings(config_class: type) -> set[str]:
    """A config class's settings, plait's own included where the class is a model's text config (no sub-config
    of its own named text_config)."""
    own = PLAIT_CONFIG_KEYS if "text_config" not in (getattr(config_class, "sub_configs", {}) or {}) else set()
    return config_keys(config_class) | own


def _config_class(config: dict[str, Any]) -> type | None:
    try:
        return AutoConfig.for_model(config["model_type"]).__class__
    except (KeyError, ValueError):
        return None


def _with_model_type(sub: dict[str, Any], parent_class: type, key: str) -> dict[str, Any]:
    """A sub-config dict with the model_type its class has, where the dict itself does not name one."""
    return sub if "model_type" in sub else {**sub, "model_type": parent_class.sub_configs[key].model_type}


def _closest(key: str, known: set[str], sub_configs: dict[str, dict], config_class: type) -> str:
    """'; did you mean ...?' for the nearest known name, a sub-config's settings included (a text model's
    setting given at the top of a vision-language config, say)."""
    candidates = {name: name for name in known}
    for sub_key, sub in sub_configs.items():
        sub_class = _config_class(_with_model_type(sub, config_class, sub_key))
        if sub_class is not None:
            candidates.update({name: f"{sub_key}.{name}" for name in _settings(sub_class) if name not in candidates})
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.75)
    return f"; did you mean {candidates[close[0]]!r}?" if close else ""


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
