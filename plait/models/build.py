"""The model a run trains: a preset completed with the run's tokenizer and image size, or a local checkpoint."""

from __future__ import annotations

import torch

from plait.config import ModelSettings
from plait.models import from_config, from_pretrained
from plait.models.presets import preset_dict
from plait.models.vlm import vlm_spec


def build_model(settings: ModelSettings, vocab_size: int, special_ids: dict[str, int], image_size: int) -> torch.nn.Module:
    if settings.pretrained is not None:
        if settings.config:
            raise ValueError(
                f"model.config: overrides apply to presets only; a pretrained model keeps its own config, "
                f"got {sorted(settings.config)}"
            )
        model = from_pretrained(settings.pretrained, attn_implementation=settings.attn_implementation)
        text_vocab = model.get_input_embeddings().num_embeddings
        if text_vocab < vocab_size:
            raise ValueError(
                f"model.pretrained: the model's vocabulary has {text_vocab} tokens, the tokenizer {vocab_size}"
            )
        return model
    cfg = preset_dict(settings.preset, settings.config)
    cfg = vlm_spec(cfg["model_type"]).complete_config(cfg, vocab_size, special_ids, image_size)
    return from_config(cfg, attn_implementation=settings.attn_implementation)
