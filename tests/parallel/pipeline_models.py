"""Tiny native models and batches shared by the pipeline worker and the single-process reference."""

import torch

from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
from plait.models.minimax_m3 import MiniMaxM3SparseForCausalLM
from plait.mtp import mtp_labels
from plait.nn.loss import count_targets
from plait.nn.moe import route_aux_loss_through_backward
from plait.parallel.pipeline import lm_and_mtp_loss
from tests.nn.reference import m3_text_config, mimo_config

MTP_SCALE = 0.3


def build_model(kind: str):
    """kind: "mimo" or "m3", with "_mtp" for two MTP depths (on the last stage when pipelined) and "_aux" for an
    MoE aux loss."""
    torch.manual_seed(0)
    kind, *extras = kind.split("_")
    depths = {"num_mtp_layers": 2, "mtp_loss_scaling_factor": MTP_SCALE} if "mtp" in extras else {}
    aux = {"moe_aux_loss_coef": 0.05} if "aux" in extras else {}
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
    ids = torch.randint(1, 64, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt without loss, as in captioning
    return ids, labels


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
    depths = model.mtp_config.num_layers
    loss_fn = loss_fn_for(labels, depths)
    losses = []
    for mb_ids, mb_labels in zip(ids.chunk(microbatches), labels.chunk(microbatches)):
        out = model(input_ids=mb_ids, return_mtp_logits=depths > 0)
        loss = loss_fn((out.logits, *(out.mtp_logits or [])), mb_labels)
        loss.backward()
        losses.append(float(loss.detach()))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, losses
