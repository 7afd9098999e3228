"""Tiny native models and batches shared by the pipeline worker and the single-process reference.

Kinds: "mimo" (MiMo-V2-Flash), "m3" (MiniMax-M3 text), and "mimo-composition": a MIMO model whose
language model (MiMo-V2-Flash) runs as stages, with its image encoder (plait's M3 vision tower) and audio
encoder (transformers' Whisper encoder) on the first stage; every sample holds one image and one clip.
"""

import torch

from plait.models.mimo import MimoModel, MimoModelConfig
from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
from plait.parallel.pipeline import mimo_stage_kwargs
from plait.models.minimax_m3 import MiniMaxM3SparseForCausalLM
from plait.mtp import mtp_labels
from plait.nn.loss import count_targets
from plait.nn.moe import route_aux_loss_through_backward
from plait.parallel.pipeline import lm_and_mtp_loss
from tests.nn.reference import m3_text_config, mimo_config

MTP_SCALE = 0.3


IMG, AUD = 60, 61
M3VL_IMAGE = 4
IMAGE_PATCHES, CLIP_FRAMES, CLIP_TOKENS = 4, 8, 4
MIMO_ENCODERS = {
    "images": {"m3": {"kind": "minimax_m3_vision", "config": {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "patch_size": 4, "temporal_patch_size": 1, "spatial_merge_size": 1}}},
    "audio": {"whisper": {"kind": "transformers", "config": {
        "model_type": "whisper", "d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2,
        "encoder_ffn_dim": 32, "num_mel_bins": 8, "max_source_positions": CLIP_TOKENS, "decoder_layers": 1,
        "decoder_attention_heads": 2, "decoder_ffn_dim": 16, "vocab_size": 8, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "decoder_start_token_id": 1}}},
}


def build_model(kind: str):
    """kind: "mimo" or "m3", with "_mtp" for two MTP depths (on the last stage when pipelined) and "_aux" for an
    MoE aux loss."""
    torch.manual_seed(0)
    if kind == "mimo-composition":
        lm = mimo_config(num_hidden_layers=4, layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                                            "full_attention"],
                         mlp_layer_types=["dense", "sparse", "sparse", "dense"])
        return MimoModel(MimoModelConfig(language_model=lm.to_dict(), modalities=MIMO_ENCODERS,
                                         special_token_ids={"images": IMG, "audio": AUD}))
    kind, *extras = kind.split("_")
    depths = {"num_mtp_layers": 2, "mtp_loss_scaling_factor": MTP_SCALE} if "mtp" in extras else {}
    aux = {"moe_aux_loss_coef": 0.05} if "aux" in extras else {}
    if kind == "m3vl":  # MiniMax-M3-VL: the vision tower and projector on the first stage
        from plait.models.hf import to_hf_config
        from plait.models.minimax_m3 import MiniMaxM3SparseForConditionalGeneration
        from tests.models.test_minimax_m3 import vl_config

        return MiniMaxM3SparseForConditionalGeneration.from_config(to_hf_config(vl_config("sparse")), **depths)
    if kind == "mimo":
        cfg = mimo_config(num_hidden_layers=4, layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                                              "full_attention"],
                          mlp_layer_types=["dense", "sparse", "sparse", "sparse"], **aux)
        return MiMoV2FlashForCausalLM.from_config(cfg, **depths)
    cfg = m3_text_config(num_hidden_layers=4, layer_types=["full_attention", "minimax_m3_sparse", "full_attention",
                                                           "minimax_m3_sparse"],
                         mlp_layer_types=["dense", "sparse", "sparse", "dense"], index_block_size=4,
                         index_topk_blocks=2, index_head_dim=16, index_n_heads=2, **aux)
    return MiniMaxM3SparseForCausalLM.from_config(cfg, **depths)


def make_batch(kind: str, batch: int = 8, seq: int = 12):
    g = torch.Generator().manual_seed(1)
    if kind.startswith("m3vl"):  # <bos> <image>*9 text (a 48 px image is 9 tokens): vocabulary 40, image id 4
        ids = torch.randint(6, 40, (batch, seq), generator=g)
        ids[:, 0], ids[:, 1:10] = 1, M3VL_IMAGE
    elif kind != "mimo-composition":
        ids = torch.randint(1, 64, (batch, seq), generator=g)
    else:  # <bos> <image>*4 <audio>*4 text: one image and one clip per sample
        ids = torch.randint(1, IMG, (batch, seq + 4), generator=g)
        ids[:, 1 : 1 + IMAGE_PATCHES] = IMG
        ids[:, 1 + IMAGE_PATCHES : 1 + IMAGE_PATCHES + CLIP_TOKENS] = AUD
    labels = ids.clone()
    labels[:, : 1 + IMAGE_PATCHES + CLIP_TOKENS if kind == "mimo-composition" else 3] = -100  # a prompt without loss
    return ids, labels


def vision_inputs(model, kind: str, batch: int = 8) -> dict[str, torch.Tensor] | None:
    """A VLM's images for the batch, as the trainer hands them to a pipeline (one image per row); else None."""
    if not kind.startswith("m3vl"):
        return None
    from plait.models.vlm import _m3_inputs

    pixels = torch.rand(batch, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    return {**_m3_inputs(model.config, pixels), "images_per_row": torch.ones(batch, dtype=torch.long)}


def first_stage_inputs(kind: str, batch: int = 8) -> dict[str, torch.Tensor]:
    """The flat modality inputs of the batch (rows in sample order); none for a text model."""
    if kind != "mimo-composition":
        return {}
    g = torch.Generator().manual_seed(2)
    patches = torch.randn(batch * IMAGE_PATCHES, 3 * 4 * 4, generator=g)  # one 2 x 2-patch image per sample
    clips = torch.randn(batch, 8, CLIP_FRAMES, generator=g)  # (n, mels, frames)
    return mimo_stage_kwargs({"images": {"m3": {"pixel_values": patches, "grid_thw": torch.tensor([[1, 2, 2]] * batch)}},
                              "audio": {"whisper": {"input_features": clips}}})


def outputs_of(model, ids: torch.Tensor, flat_inputs: dict[str, torch.Tensor], depths: int, images: dict | None = None):
    """A whole-model forward: the logits (and the MTP depths' after them); MIMO models take their modality
    inputs nested again."""
    if not isinstance(model, MimoModel):
        out = model(input_ids=ids, return_mtp_logits=depths > 0, **(images or {}))
        return (out.logits, *(out.mtp_logits or [])) if depths else out.logits
    nested: dict = {}
    for key, tensor in flat_inputs.items():
        modality, encoder, name = key.split(".")
        nested.setdefault(modality, {}).setdefault(encoder, {})[name] = tensor
    return model(ids, modality_inputs=nested)[0].logits


def mtp_depths_of(model) -> int:
    cfg = getattr(model, "mtp_config", None)
    return cfg.num_layers if cfg is not None else 0


def loss_fn_for(labels: torch.Tensor, depths: int = 0):
    """Per-microbatch loss that sums to the mean over the whole step's targets (the trainer's normalisation),
    plus the MTP depths' losses normalised the same way."""
    total = count_targets(labels)
    depth_totals = [count_targets(mtp_labels(labels, d)) for d in range(1, depths + 1)]
    return lambda output, target: lm_and_mtp_loss(output, target, total, depth_totals, MTP_SCALE)


def reference_step(kind: str, microbatches: int):
    """Single process: the same microbatches as gradient accumulation."""
    model = build_model(kind)
    route_aux_loss_through_backward(model, 1.0 / microbatches)  # the aux loss is a mean over microbatches
    ids, labels = make_batch(kind)
    depths = mtp_depths_of(model)
    flat = first_stage_inputs(kind)
    vision = vision_inputs(model, kind)
    loss_fn = loss_fn_for(labels, depths)
    losses = []
    for i, (mb_ids, mb_labels) in enumerate(zip(ids.chunk(microbatches), labels.chunk(microbatches))):
        mb_inputs = {k: v.chunk(microbatches)[i] for k, v in flat.items()}
        images = None
        if vision is not None:  # this microbatch's rows' images, cut by hand: equal-sized images, one per row
            rows, patches = mb_ids.shape[0], int(vision["image_grid_thw"][0].prod())
            images = {"pixel_values": vision["pixel_values"][i * rows * patches : (i + 1) * rows * patches],
                      "image_grid_thw": vision["image_grid_thw"][i * rows : (i + 1) * rows]}
        loss = loss_fn(outputs_of(model, mb_ids, mb_inputs, depths, images), mb_labels)
        loss.backward()
        losses.append(float(loss.detach()))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, losses
