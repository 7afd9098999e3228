"""Held-out quality of a captioning model: teacher-forced loss and exact-match accuracy of greedy captions.

For the bundled shapes sets (any data whose references all parse as shapes captions) it also reports
per-attribute accuracy: which of shape, colour, size and position the model gets right; likewise kind,
pitch, length and loudness for the bundled audio set. A set of several modalities (a MIMO run) is
scored per modality.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from plait.data.collate import collate_padded
from plait.data.dataset import CaptionDataset, MixedCaptionDataset
from plait.generate import generate
from plait.models import is_native
from plait.mtp import mtp_labels
from plait.nn.loss import count_targets, micro_batch_loss_sums

# a collated batch -> the model's keyword inputs beside the token ids (pixels, modality inputs), on its device
ModelInputs = Callable[[dict[str, torch.Tensor]], dict]


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield range(start, min(n, start + batch_size))


@torch.no_grad()
def caption_batch(model, dataset: CaptionDataset, batch: dict[str, torch.Tensor], model_inputs: ModelInputs, tokenizer,
                  max_new_tokens: int, device: torch.device, temperature: float = 0.0,
                  generator: torch.Generator | None = None) -> list[str]:
    """Caption the items of a collated batch (images, audio clips) with the dataset's prompt."""
    prompt = dataset.prompt_ids()
    input_ids = prompt.expand(batch["input_ids"].shape[0], -1).to(device)
    extra = model_inputs(batch)
    new = generate(model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=dataset.eos_id,
                   pad_token_id=dataset.pad_id, temperature=temperature, generator=generator, **extra)
    return [t.strip() for t in tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)]


@torch.no_grad()
def evaluate_captions(model, dataset: CaptionDataset, model_inputs: ModelInputs, tokenizer, *,
                      num_samples: int | None, batch_size: int, max_new_tokens: int, device: torch.device,
                      autocast=nullcontext) -> dict[str, float]:
    was_training = model.training
    model.eval()
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    loss_sum, targets = 0.0, 0
    predictions: list[str] = []
    native = is_native(model)  # the loss from the hidden states, chunk by chunk: no (tokens x vocab) logits held
    mtp_config = getattr(model, "mtp_config", None)
    depths = mtp_config.num_layers if native and mtp_config is not None else 0
    depth_sums, depth_targets = [0.0] * depths, [0] * depths  # summed held-out CE of each MTP depth, its targets
    for idx in _batches(n, batch_size):
        batch = collate_padded([dataset[i] for i in idx], dataset.pad_id)
        labels = batch["labels"].to(device)
        labels_per_depth = [mtp_labels(labels, d) for d in range(1, depths + 1)]  # padded rows, no packed documents
        with autocast():
            inputs = dict(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            lm, per_depth, _ = micro_batch_loss_sums(model, native, inputs, model_inputs(batch), labels, labels_per_depth)
            loss_sum += float(lm)
            for d, (depth_loss, depth_labels) in enumerate(zip(per_depth, labels_per_depth)):
                depth_sums[d] += float(depth_loss)
                depth_targets[d] += count_targets(depth_labels)
            predictions += caption_batch(model, dataset, batch, model_inputs, tokenizer, max_new_tokens, device)
        targets += count_targets(batch["labels"])
    model.train(was_training)
    # Compare with the references as the tokenizer sees them (a word-level tokenizer lowercases and
    # splits punctuation), so a caption is not wrong for spacing the model cannot produce.
    references = [t.strip() for t in tokenizer.batch_decode([a[:-1] for a in dataset.answers[:n]], skip_special_tokens=True)]
    metrics = {"loss": loss_sum / max(targets, 1), "samples": float(n)}
    for d, (total, count) in enumerate(zip(depth_sums, depth_targets), start=1):
        metrics[f"mtp_loss_{d}"] = total / max(count, 1)  # depth d: the token d + 1 ahead, from the MTP module
    for parse, score in _scorers():
        if all(parse(r) is not None for r in references):
            metrics.update(score(predictions, references))
            break
    else:
        metrics["exact_match"] = sum(p == r for p, r in zip(predictions, references)) / n
    return metrics


def _scorers():
    """(parse, score) of each bundled caption language; a set whose references all parse is scored by it."""
    from plait.data import audio, shapes

    return ((shapes.parse_caption, shapes.score_captions), (audio.parse_caption, audio.score_audio_captions))


def evaluate_dataset(model, dataset: CaptionDataset | MixedCaptionDataset, model_inputs: ModelInputs, tokenizer, *,
                     num_samples: int | None, **kwargs) -> dict[str, float]:
    """`evaluate_captions` on a set; a set of several modalities is evaluated per modality (up to `num_samples`
    each), its figures kept as `{modality}_{metric}`, with `exact_match` and `loss` over all its samples
    (the loss as the sample-weighted mean of the modalities' per-token means)."""
    if not isinstance(dataset, MixedCaptionDataset):
        return evaluate_captions(model, dataset, model_inputs, tokenizer, num_samples=num_samples, **kwargs)
    metrics: dict[str, float] = {}
    parts = {name: evaluate_captions(model, part, model_inputs, tokenizer, num_samples=num_samples, **kwargs)
             for name, part in dataset.parts.items()}
    total = sum(m["samples"] for m in parts.values())
    for name, m in parts.items():
        metrics.update({f"{name}_{k}": v for k, v in m.items()})
    for key in ("loss", "exact_match"):
        metrics[key] = sum(m[key] * m["samples"] for m in parts.values()) / total
    metrics["samples"] = total
    return metrics
