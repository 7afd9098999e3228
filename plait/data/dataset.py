"""Captioning samples as token ids: `<bos> <image>*n prompt | caption <eos>`, loss on the part after `|`."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from plait.data.tokenizer import special_token_ids
from plait.data.types import CaptionSplit


class CaptionDataset(Dataset):
    """Tokenises every caption once, up front (fast tokenizers batch this), and serves samples by index.

    `image_tokens` is how many placeholder tokens the model turns one image into; it comes from the
    model family (`plait.models.vlm`), so the same data feeds any vision-language model.
    """

    def __init__(self, split: CaptionSplit, tokenizer, image_tokens: int, prompt: str = ""):
        if image_tokens < 0:
            raise ValueError(f"image_tokens: expected a count >= 0 (0 for a text-only model), got {image_tokens}")
        if len(split) == 0:
            raise ValueError("split: the data set is empty")
        ids = special_token_ids(tokenizer)
        self.eos_id, self.pad_id = ids["eos"], ids["pad"]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        self.prefix = [ids["bos"]] + [ids["image"]] * image_tokens + prompt_ids
        self.images = split.images
        self.captions = split.captions
        encoded = tokenizer(list(split.captions), add_special_tokens=False)["input_ids"]
        for i, caption_ids in enumerate(encoded):
            if not caption_ids:
                raise ValueError(f"captions[{i}]: {split.captions[i]!r} tokenises to nothing")
        self.answers = [caption_ids + [self.eos_id] for caption_ids in encoded]

    def __len__(self) -> int:
        return len(self.answers)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": torch.tensor(self.prefix + self.answers[i], dtype=torch.long),
            "answer_start": len(self.prefix),
            "image": self.images[i],
        }

    def prompt_ids(self) -> torch.Tensor:
        """The generation prompt: everything before the caption."""
        return torch.tensor(self.prefix, dtype=torch.long)

    def max_length(self) -> int:
        return len(self.prefix) + max(len(a) for a in self.answers)
