"""Tiny stock transformers models and batches shared by the HF pipeline worker and the single-process reference."""

from __future__ import annotations

import torch

from plait.models.hf import build_stock_model, to_hf_config
from tests.parallel.pipeline_models import loss_fn_for

VOCAB = 64
IMAGE_TOKEN = 63
SEQ = 12
ROWS = 8


def _llama(layers: int) -> dict:
    return {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": False}


def _mistral3(layers: int) -> dict:
    # 16 px images, patch 4, 2x2 merge: 4 placeholder tokens per image
    return {"model_type": "mistral3", "spatial_merge_size": 2, "vision_feature_layer": -1,
            "multimodal_projector_bias": False, "tie_word_embeddings": False, "image_token_index": IMAGE_TOKEN,
            "text_config": {"model_type": "ministral3", "vocab_size": VOCAB, "hidden_size": 32,
                            "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
                            "tie_word_embeddings": False,
                            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                                                "original_max_position_embeddings": 64, "llama_4_scaling_beta": 0.1}},
            "vision_config": {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16, "patch_size": 4,
                              "image_size": 16}}


def _gemma4_text(layers: int, **extra) -> dict:
    # sliding and full layers alternate (the last is full); the last half of the layers reuse the keys / values
    # of the last earlier layer of their type, so 2- and 4-stage splits carry them across boundaries, beside
    # the per-layer input embeddings
    return {"model_type": "gemma4_text", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "global_head_dim": 16, "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
            "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB, "num_kv_shared_layers": layers // 2,
            "final_logit_softcapping": 30.0, "tie_word_embeddings": False, "max_position_embeddings": 64,
            "pad_token_id": 0, **extra}


def _gemma4_moe(layers: int) -> dict:
    return _gemma4_text(layers, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                        hidden_size_per_layer_input=0, num_kv_shared_layers=0)


def _gemma4_vlm(layers: int) -> dict:
    # images of 4 x 4 patches of 4 px, pooled 2 x 2: 4 placeholder tokens per image
    return {"model_type": "gemma4", "text_config": _gemma4_text(layers), "tie_word_embeddings": False,
            "image_token_id": IMAGE_TOKEN, "boi_token_id": 61, "eoi_token_id": 62, "video_token_id": 60,
            "audio_token_id": 59, "boa_token_id": 58, "eoa_token_index": 57, "audio_config": None,
            "vision_config": {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                              "head_dim": 16, "patch_size": 4, "pooling_kernel_size": 2,
                              "position_embedding_size": 64}}


def _mimo_v2_flash(layers: int) -> dict:
    """transformers' own MiMo-V2-Flash (eager attention only): sliding and full layers with their own rotary."""
    from plait.models.presets import preset_dict

    return preset_dict("tiny-mimo-v2-flash", {
        "vocab_size": VOCAB, "num_hidden_layers": layers, "pad_token_id": 0,
        "layer_types": ["full_attention", "sliding_attention"] * (layers // 2),
        "mlp_layer_types": ["dense"] + ["sparse"] * (layers - 1)})


CONFIGS = {"llama": _llama, "mimo_v2_flash": _mimo_v2_flash, "mistral3": _mistral3, "gemma4": _gemma4_text, "gemma4_moe": _gemma4_moe,
           "gemma4_vlm": _gemma4_vlm}
VLMS = ("mistral3", "gemma4_vlm")
# images per row of the batch: the first two microbatches (of 4) are text only, then one with three images
IMAGES_PER_ROW = [0, 0, 0, 0, 1, 2, 1, 0]
TOKENS_PER_IMAGE = 4


def build_model(kind: str, layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    attn = "eager" if kind == "mimo_v2_flash" else "sdpa"
    return build_stock_model(to_hf_config(CONFIGS[kind](layers)), attn_implementation=attn)


def make_batch(kind: str) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """ids, labels and (for a VLM) the vision inputs `PipelineRun.step` takes."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 57, (ROWS, SEQ), generator=g)  # below Gemma4's special ids
    labels = ids.clone()
    labels[:, :2] = -100
    if kind not in VLMS:
        return ids, labels, None
    for row, n in enumerate(IMAGES_PER_ROW):
        ids[row, 1 : 1 + n * TOKENS_PER_IMAGE] = IMAGE_TOKEN
        labels[row, 1 : 1 + n * TOKENS_PER_IMAGE] = -100
    n_images = sum(IMAGES_PER_ROW)
    per_row = torch.tensor(IMAGES_PER_ROW)
    if kind == "mistral3":  # (n, 3, H, W) images and their sizes in pixels
        pixels = torch.randn(n_images, 3, 16, 16, generator=g)
        return ids, labels, {"pixel_values": pixels, "image_sizes": torch.tensor([[16, 16]] * n_images),
                             "images_per_row": per_row}
    # Gemma4: (n, patches, 3 * 4 * 4) patch rows and their (x, y) positions
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], -1).expand(n_images, -1, -1).contiguous()
    return ids, labels, {"pixel_values": torch.randn(n_images, 16, 48, generator=g), "image_position_ids": positions,
                         "images_per_row": per_row}


def _images_of_rows(vision: dict, rows: slice) -> dict:
    counts = vision["images_per_row"]
    start, stop = int(counts[: rows.start].sum()), int(counts[: rows.stop].sum())
    if start == stop:
        return {}
    return {k: v[start:stop] for k, v in vision.items() if k != "images_per_row"}


def reference_step(kind: str, microbatches: int, layers: int = 4):
    """Single process, transformers' own forward: the same microbatches as gradient accumulation, on one
    thread like the workers (two-thread MoE backward on CPU is not bitwise repeatable)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_step(kind, microbatches, layers)
    finally:
        torch.set_num_threads(threads)


def _reference_step(kind: str, microbatches: int, layers: int):
    model = build_model(kind, layers)
    ids, labels, vision = make_batch(kind)
    loss_fn = loss_fn_for(labels)
    per = ROWS // microbatches
    losses = []
    for m in range(microbatches):
        rows = slice(m * per, (m + 1) * per)
        images = _images_of_rows(vision, rows) if vision is not None else {}
        loss = loss_fn(model(input_ids=ids[rows], **images).logits, labels[rows])
        loss.backward()
        losses.append(float(loss.detach()))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, losses
