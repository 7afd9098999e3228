"""Tiny native models and batches shared by the pipeline worker and the single-process reference."""

import torch

from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
from plait.models.minimax_m3 import MiniMaxM3SparseForCausalLM
from plait.nn.loss import causal_lm_loss_sum, count_targets
from tests.nn.reference import m3_text_config, mimo_config


def build_model(kind: str):
    torch.manual_seed(0)
    if kind == "mimo":
        cfg = mimo_config(num_hidden_layers=4, layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                                              "full_attention"],
                          mlp_layer_types=["dense", "sparse", "sparse", "sparse"])
        return MiMoV2FlashForCausalLM.from_config(cfg)
    cfg = m3_text_config(num_hidden_layers=4, layer_types=["full_attention", "minimax_m3_sparse", "full_attention",
                                                           "minimax_m3_sparse"],
                         mlp_layer_types=["dense", "sparse", "sparse", "dense"], index_block_size=4,
                         index_topk_blocks=2, index_head_dim=16, index_n_heads=2)
    return MiniMaxM3SparseForCausalLM.from_config(cfg)


def make_batch(kind: str, batch: int = 8, seq: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt without loss, as in captioning
    return ids, labels


def loss_fn_for(labels: torch.Tensor):
    """Per-microbatch loss that sums to the mean over the whole step's targets (the trainer's normalisation)."""
    total = count_targets(labels)
    return lambda logits, target: causal_lm_loss_sum(logits, target) / total


def reference_step(kind: str, microbatches: int):
    """Single process: the same microbatches as gradient accumulation."""
    model = build_model(kind)
    ids, labels = make_batch(kind)
    loss_fn = loss_fn_for(labels)
    losses = []
    for mb_ids, mb_labels in zip(ids.chunk(microbatches), labels.chunk(microbatches)):
        loss = loss_fn(model(input_ids=mb_ids).logits, mb_labels)
        loss.backward()
        losses.append(float(loss.detach()))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, losses
