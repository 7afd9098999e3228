"""Causal-LM cross-entropy as a *sum* over target tokens, so the trainer can divide by the number of
target tokens in the whole optimizer step (across gradient-accumulation micro-batches and ranks),
not by each micro-batch's own count, which would weight short micro-batches more."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Unshifted labels (B, S) -> the target of each position (B, S); the last position has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, S, V), unshifted labels (B, S) with -100 ignored -> summed float32 loss."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels: expected shape {list(logits.shape[:2])} to match logits, got {list(labels.shape)}")
    targets = shift_labels(labels)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    return int((shift_labels(labels) != IGNORE_INDEX).sum())
