"""What the trainer must know about each vision-language model family, in one place per family.

A captioning sample is `<bos> <image>*n prompt caption <eos>`: the trainer needs the number `n` of
placeholder tokens an image becomes, the extra keyword inputs carrying pixels, and the config ids
(vocabulary, special tokens, image size) that come from the run's tokenizer and data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class VisionLanguageSpec:
    model_type: str
    complete_config: Callable[[dict[str, Any], int, dict[str, int], int], dict[str, Any]]
    image_token_count: Callable[[Any, int], int]
    vision_inputs: Callable[[Any, torch.Tensor], dict[str, torch.Tensor]]


def _mistral3_downsample(vision_patch: int, merge: int, image_size: int) -> int:
    step = vision_patch * merge
    if image_size % step:
        raise ValueError(
            f"data.image_size: must be a multiple of patch_size x spatial_merge_size = {vision_patch} x {merge} = {step} "
            f"for mistral3, got {image_size}"
        )
    return (image_size // step) ** 2


def _mistral3_complete(cfg: dict[str, Any], vocab_size: int, ids: dict[str, int], image_size: int) -> dict[str, Any]:
    cfg = dict(cfg)
    text = dict(cfg.get("text_config", {}))
    text.update(vocab_size=vocab_size, pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    vision = dict(cfg.get("vision_config", {}))
    vision["image_size"] = image_size
    _mistral3_downsample(vision.get("patch_size", 16), cfg.get("spatial_merge_size", 2), image_size)
    cfg.update(text_config=text, vision_config=vision, image_token_index=ids["image"])
    return cfg


def _mistral3_tokens(config: Any, image_size: int) -> int:
    return _mistral3_downsample(config.vision_config.patch_size, config.spatial_merge_size, image_size)


def _mistral3_inputs(config: Any, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    # pixel_values (n, 3, H, W); every image keeps its full size, so image_sizes is the same for all.
    n, _, h, w = pixel_values.shape
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor([[h, w]] * n, dtype=torch.long)}


VLM_SPECS: dict[str, VisionLanguageSpec] = {
    "mistral3": VisionLanguageSpec("mistral3", _mistral3_complete, _mistral3_tokens, _mistral3_inputs),
}


def vlm_spec(model_type: str) -> VisionLanguageSpec:
    if model_type not in VLM_SPECS:
        raise ValueError(
            f"model_type {model_type!r}: plait does not know how to feed images to it yet; "
            f"supported vision-language models: {sorted(VLM_SPECS)}"
        )
    return VLM_SPECS[model_type]
