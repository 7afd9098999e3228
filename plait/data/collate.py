"""Batches for training: padded rows, or several samples packed into fixed-length rows.

Labels follow the transformers convention (unshifted, -100 ignored) and cover only the answer
tokens (caption + end of sequence). Packed rows mark documents by `position_ids` restarting at 0
and also carry `cu_seqlens`, so attention never crosses documents.
"""

from __future__ import annotations

import torch

from plait.data.dataset import BATCH_KEYS

IGNORE_INDEX = -100


def _stack_items(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Each kind of item (images, audio clips) stacked in sample order, which is the order its placeholder
    tokens appear in the (row-major) batch; a kind no sample carries is absent."""
    out = {}
    for role, key in BATCH_KEYS.items():
        items = [s[role] for s in samples if role in s]
        if items:
            out[key] = torch.stack(items)
    return out


def _labels(sample: dict) -> torch.Tensor:
    ids = sample["input_ids"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[sample["answer_start"] :] = ids[sample["answer_start"] :]
    return labels


def collate_padded(samples: list[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample (or to `pad_to` tokens, for fixed shapes); `attention_mask` is 1 on
    real tokens."""
    if not samples:
        raise ValueError("samples: expected at least one sample, got an empty batch")
    length = max(len(s["input_ids"]) for s in samples)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to: {pad_to} tokens is shorter than the longest sample ({length})")
        length = pad_to
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n] = s["input_ids"]
        labels[row, :n] = _labels(s)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        **_stack_items(samples),
    }


def collate_packed(samples: list[dict], pad_id: int, pack_length: int) -> dict[str, torch.Tensor]:
    """Pack samples in order into rows of `pack_length` tokens (first fit into the current row).

    Images stay in sample order, which is the order their placeholder tokens appear in the rows.
    A row's unused tail is padding: its own document, ignored by the loss.
    """
    if not samples:
        raise ValueError("samples: expected at least one sample, got an empty batch")
    rows: list[list[dict]] = [[]]
    used = 0
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        if n > pack_length:
            raise ValueError(f"data.pack_length: sample {i} has {n} tokens, more than pack_length={pack_length}")
        if used + n > pack_length:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += n
    input_ids = torch.full((len(rows), pack_length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), pack_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), pack_length), dtype=torch.long)
    doc_lengths: list[int] = []
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s["input_ids"])
            input_ids[r, start : start + n] = s["input_ids"]
            labels[r, start : start + n] = _labels(s)
            position_ids[r, start : start + n] = torch.arange(n)
            doc_lengths.append(n)
            start += n
        if start < pack_length:
            position_ids[r, start:] = torch.arange(pack_length - start)
            doc_lengths.append(pack_length - start)
    cu_seqlens = torch.zeros(len(doc_lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(doc_lengths), 0)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        **_stack_items(samples),
    }
