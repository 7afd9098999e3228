"""The model a run trains: a preset completed with the run's tokenizer and image size, or a local checkpoint."""

from __future__ import annotations

from dataclasses import replace

import torch

from plait.config import ModelSettings
from plait.data.dataset import BATCH_KEYS
from plait.models import NATIVE_MODELS, from_config, from_pretrained
from plait.models.hf import check_config_overrides, to_hf_config
from plait.models.mimo import MimoForCausalLM, MimoModel, MimoModelConfig
from plait.models.native import add_fresh_mtp_depths
from plait.mtp import MTPConfig
from plait.models.presets import preset_dict
from plait.models.vlm import vlm_spec


def _mtp_kwargs(settings: ModelSettings, model_type: str) -> dict:
    """Native models take the run's MTP settings; stock transformers models have no MTP depths."""
    mtp = settings.mtp
    native = NATIVE_MODELS.get(model_type) if settings.implementation == "native" else None
    if native is None or not getattr(native, "supports_mtp", False):
        if mtp.num_layers:
            with_mtp = sorted(k for k, v in NATIVE_MODELS.items() if getattr(v, "supports_mtp", False))
            raise ValueError(f"model.mtp.num_layers={mtp.num_layers}: multi-token prediction needs a native plait "
                             f"model with MTP depths ({with_mtp}); {model_type!r} has none yet")
        return {}
    if mtp.layer_pattern != "*":
        raise ValueError(f"model.mtp.layer_pattern: {model_type} MTP depths are one whole block ('*'), "
                         f"got {mtp.layer_pattern!r}")
    return {"mtp_loss_scaling_factor": mtp.loss_scaling_factor, "mtp_repeated_layer": mtp.use_repeated_layer}


# a MIMO modality the trainer feeds -> the tokenizer's placeholder role for it ("images" -> "image")
MODALITY_PLACEHOLDERS = {key: role for role, key in BATCH_KEYS.items()}


def build_mimo_model(mimo: dict, vocab_size: int, special_ids: dict[str, int]) -> MimoForCausalLM:
    """A MIMO composition completed with the run's tokenizer: the language model's vocabulary and pad/bos/eos
    ids, and each modality's special token (the tokenizer's `<image>` / `<audio>`)."""
    cfg = dict(mimo)
    unknown = sorted(set(cfg.get("modalities") or {}) - set(MODALITY_PLACEHOLDERS))
    if unknown:
        raise ValueError(f"model.mimo.modalities: the trainer feeds {sorted(MODALITY_PLACEHOLDERS)}, got {unknown}")
    ours = {m: special_ids[MODALITY_PLACEHOLDERS[m]] for m in cfg.get("modalities") or {}}
    given = cfg.get("special_token_ids")
    if given and given != ours:
        raise ValueError(f"model.mimo.special_token_ids: the run's tokenizer gives {ours}, got {given} "
                         "(leave them out: they come from the tokenizer)")
    cfg["special_token_ids"] = ours
    if isinstance(cfg.get("language_model"), dict):
        cfg["language_model"] = {**cfg["language_model"], "vocab_size": vocab_size, "pad_token_id": special_ids["pad"],
                                 "bos_token_id": special_ids["bos"], "eos_token_id": special_ids["eos"]}
    model = MimoForCausalLM(MimoModel(MimoModelConfig.model_validate(cfg)))
    _check_vocab(model, vocab_size)
    return model


def _check_vocab(model: torch.nn.Module, vocab_size: int) -> None:
    text_vocab = model.get_input_embeddings().num_embeddings
    if text_vocab < vocab_size:
        raise ValueError(f"model.pretrained: the model's vocabulary has {text_vocab} tokens, the tokenizer {vocab_size}")


def build_model(settings: ModelSettings, vocab_size: int, special_ids: dict[str, int], image_size: int) -> torch.nn.Module:
    if settings.mimo is not None:
        return build_mimo_model(settings.mimo, vocab_size, special_ids)
    if settings.pretrained is not None:
        if settings.config:
            raise ValueError(
                f"model.config: overrides apply to presets only; a pretrained model keeps its own config, "
                f"got {sorted(settings.config)}"
            )
        model = from_pretrained(settings.pretrained, attn_implementation=settings.attn_implementation,
                                implementation=settings.implementation)
        if isinstance(model, MimoModel):
            model = MimoForCausalLM(model)
        _mtp_kwargs(settings, model.config.model_type)
        if settings.mtp.num_layers and getattr(model, "mtp_config", None) is not None:
            found = model.mtp_config.num_layers
            if found == 0:  # a checkpoint without depths gets fresh ones (to train them, alone or with the rest)
                add_fresh_mtp_depths(model, MTPConfig(num_layers=settings.mtp.num_layers,
                                                      use_repeated_layer=settings.mtp.use_repeated_layer))
            elif found != settings.mtp.num_layers:
                raise ValueError(f"model.mtp.num_layers={settings.mtp.num_layers}: the checkpoint has {found} MTP "
                                 "depths; use that number, or a checkpoint without MTP depths to add fresh ones")
        if getattr(model, "mtp_config", None) is not None:
            model.mtp_config = replace(model.mtp_config, loss_scaling_factor=settings.mtp.loss_scaling_factor)
        _check_vocab(model, vocab_size)
        return model
    cfg = preset_dict(settings.preset, settings.config)
    check_config_overrides(cfg, settings.config)
    cfg = vlm_spec(cfg["model_type"]).complete_config(cfg, vocab_size, special_ids, image_size)
    kwargs = _mtp_kwargs(settings, cfg["model_type"])
    if kwargs:
        return NATIVE_MODELS[cfg["model_type"]].from_config(to_hf_config(cfg), num_mtp_layers=settings.mtp.num_layers,
                                                            backend=settings.attn_implementation, **kwargs)
    return from_config(cfg, attn_implementation=settings.attn_implementation, implementation=settings.implementation)
