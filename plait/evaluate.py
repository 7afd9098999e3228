"""Held-out quality of a captioning model: teacher-forced loss and exact-match accuracy of greedy captions.

For the bundled shapes sets (any data whose references all parse as shapes captions) it also reports
per-attribute accuracy: which of shape, colour, size and position the model gets right.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from plait.data.collate import collate_padded
from plait.data.dataset import CaptionDataset
from plait.data.images import normalize
from plait.generate import generate
from plait.nn.loss import causal_lm_loss_sum, count_targets

VisionInputs = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield range(start, min(n, start + batch_size))


@torch.no_grad()
def caption_batch(model, dataset: CaptionDataset, images: torch.Tensor, vision_inputs: VisionInputs, tokenizer,
                  max_new_tokens: int, device: torch.device, temperature: float = 0.0,
                  generator: torch.Generator | None = None) -> list[str]:
    """Caption uint8 images (B, H, W, 3) with the dataset's prompt."""
    prompt = dataset.prompt_ids()
    input_ids = prompt.expand(images.shape[0], -1).to(device)
    extra = {k: v.to(device) for k, v in vision_inputs(normalize(images)).items()}
    new = generate(model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=dataset.eos_id,
                   pad_token_id=dataset.pad_id, temperature=temperature, generator=generator, **extra)
    return [t.strip() for t in tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)]


@torch.no_grad()
def evaluate_captions(model, dataset: CaptionDataset, vision_inputs: VisionInputs, tokenizer, *,
                      num_samples: int | None, batch_size: int, max_new_tokens: int, device: torch.device,
                      autocast=nullcontext) -> dict[str, float]:
    from plait.data.shapes import parse_caption, score_captions

    was_training = model.training
    model.eval()
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    loss_sum, targets = 0.0, 0
    predictions: list[str] = []
    for idx in _batches(n, batch_size):
        batch = collate_padded([dataset[i] for i in idx], dataset.pad_id)
        with autocast():
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        use_cache=False, **{k: v.to(device) for k, v in vision_inputs(normalize(batch["images"])).items()})
            loss_sum += float(causal_lm_loss_sum(out.logits, batch["labels"].to(device)))
            predictions += caption_batch(model, dataset, batch["images"], vision_inputs, tokenizer, max_new_tokens, device)
        targets += count_targets(batch["labels"])
    model.train(was_training)
    # Compare with the references as the tokenizer sees them (a word-level tokenizer lowercases and
    # splits punctuation), so a caption is not wrong for spacing the model cannot produce.
    references = [t.strip() for t in tokenizer.batch_decode([a[:-1] for a in dataset.answers[:n]], skip_special_tokens=True)]
    metrics = {"loss": loss_sum / max(targets, 1), "samples": float(n)}
    if all(parse_caption(r) is not None for r in references):
        metrics.update(score_captions(predictions, references))
    else:
        metrics["exact_match"] = sum(p == r for p, r in zip(predictions, references)) / n
    return metrics
