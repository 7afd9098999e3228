"""What the trainer must know about each vision-language model family, in one place per family.

A captioning sample is `<bos> <image>*n prompt caption <eos>`: the trainer needs the number `n` of
placeholder tokens an image becomes, the extra keyword inputs carrying pixels, and the config ids
(vocabulary, special tokens, image size) that come from the run's tokenizer and data. Text-only
language models (MiMo-V2-Flash) train on the captions alone: n = 0 and no pixel inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from plait.models.minimax_m3_vision import patchify_images


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


def _with_run_ids(cfg: dict[str, Any], vocab_size: int, ids: dict[str, int], image_size: int) -> dict[str, Any]:
    """The ids every family takes from the run: vocabulary, special tokens, image size, image placeholder."""
    text = {**cfg.get("text_config", {}), "vocab_size": vocab_size, "pad_token_id": ids["pad"],
            "bos_token_id": ids["bos"], "eos_token_id": ids["eos"]}
    vision = {**cfg.get("vision_config", {}), "image_size": image_size}
    return {**cfg, "text_config": text, "vision_config": vision, "image_token_index": ids["image"]}


def _mistral3_complete(cfg: dict[str, Any], vocab_size: int, ids: dict[str, int], image_size: int) -> dict[str, Any]:
    cfg = _with_run_ids(cfg, vocab_size, ids, image_size)
    _mistral3_downsample(cfg["vision_config"].get("patch_size", 16), cfg.get("spatial_merge_size", 2), image_size)
    return cfg


def _mistral3_tokens(config: Any, image_size: int) -> int:
    return _mistral3_downsample(config.vision_config.patch_size, config.spatial_merge_size, image_size)


def _mistral3_inputs(config: Any, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    # pixel_values (n, 3, H, W); every image keeps its full size, so image_sizes is the same for all.
    n, _, h, w = pixel_values.shape
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor([[h, w]] * n, dtype=torch.long)}


def _m3_grid(patch: int, merge: int, image_size: int) -> int:
    """Patches per side; each side must split into whole merge blocks of patches."""
    if image_size % (patch * merge):
        raise ValueError(
            f"data.image_size: must be a multiple of patch_size x spatial_merge_size = {patch} x {merge} = "
            f"{patch * merge} for minimax_m3_vl, got {image_size}"
        )
    return image_size // patch


def _m3_complete(cfg: dict[str, Any], vocab_size: int, ids: dict[str, int], image_size: int) -> dict[str, Any]:
    cfg = _with_run_ids(cfg, vocab_size, ids, image_size)
    vision = cfg["vision_config"]
    _m3_grid(vision.get("patch_size", 14), vision.get("spatial_merge_size", 2), image_size)
    return {**cfg, "video_token_index": ids["video"]}


def _m3_tokens(config: Any, image_size: int) -> int:
    v = config.vision_config
    return (_m3_grid(v.patch_size, v.spatial_merge_size, image_size) // v.spatial_merge_size) ** 2


def _m3_inputs(config: Any, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    v = config.vision_config
    _m3_grid(v.patch_size, v.spatial_merge_size, pixel_values.shape[-2])
    _m3_grid(v.patch_size, v.spatial_merge_size, pixel_values.shape[-1])
    patches, grid = patchify_images(pixel_values, v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
    return {"pixel_values": patches, "image_grid_thw": grid}


def _text_only_complete(cfg: dict[str, Any], vocab_size: int, ids: dict[str, int], image_size: int) -> dict[str, Any]:
    return {**cfg, "vocab_size": vocab_size, "pad_token_id": ids["pad"], "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"]}


def _text_only(model_type: str) -> VisionLanguageSpec:
    """A language model trained on the captions alone: no placeholder tokens, no pixel inputs."""
    return VisionLanguageSpec(model_type, _text_only_complete, lambda config, image_size: 0, lambda config, pixels: {})


VLM_SPECS: dict[str, VisionLanguageSpec] = {
    "mistral3": VisionLanguageSpec("mistral3", _mistral3_complete, _mistral3_tokens, _mistral3_inputs),
    "minimax_m3_vl": VisionLanguageSpec("minimax_m3_vl", _m3_complete, _m3_tokens, _m3_inputs),
    "mimo_v2_flash": _text_only("mimo_v2_flash"),
}


def vlm_spec(model_type: str) -> VisionLanguageSpec:
    if model_type not in VLM_SPECS:
        raise ValueError(
            f"model_type {model_type!r}: plait does not know how to feed it captioning data yet; "
            f"supported: {sorted(VLM_SPECS)}"
        )
    return VLM_SPECS[model_type]
