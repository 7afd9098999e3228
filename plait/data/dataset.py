"""Captioning samples as token ids: `<bos> <image>*n prompt | caption <eos>`, loss on the part after `|`.

An audio set reads the same with `<audio>` placeholders; a MIMO run trains on both at once (`MixedCaptionDataset`).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from plait.data.tokenizer import special_token_ids
from plait.data.types import AudioSplit, CaptionSplit

# the placeholder role of each kind of item -> the key its items take in a batch (the MIMO modality name)
BATCH_KEYS = {"image": "images", "audio": "audio"}


class CaptionDataset(Dataset):
    """Tokenises every caption once, up front (fast tokenizers batch this), and serves samples by index.

    `image_tokens` is how many placeholder tokens the model turns one image into; it comes from the
    model family (`plait.models.vlm`), so the same data feeds any vision-language model. An audio split
    takes `placeholder="audio"`: its clips become that many `<audio>` tokens.
    """

    def __init__(self, split: CaptionSplit | AudioSplit, tokenizer, image_tokens: int, prompt: str = "",
                 placeholder: str = "image"):
        if image_tokens < 0:
            raise ValueError(f"image_tokens: expected a count >= 0 (0 for a text-only model), got {image_tokens}")
        if placeholder not in BATCH_KEYS:
            raise ValueError(f"placeholder: expected one of {sorted(BATCH_KEYS)}, got {placeholder!r}")
        if len(split) == 0:
            raise ValueError("split: the data set is empty")
        ids = special_token_ids(tokenizer)
        self.eos_id, self.pad_id = ids["eos"], ids["pad"]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        self.placeholder = placeholder
        self.prefix = [ids["bos"]] + [ids[placeholder]] * image_tokens + prompt_ids
        self.items = split.items
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
            self.placeholder: self.items[i],
        }

    @property
    def images(self) -> torch.Tensor:
        return self.items

    def prompt_ids(self) -> torch.Tensor:
        """The generation prompt: everything before the caption."""
        return torch.tensor(self.prefix, dtype=torch.long)

    def max_length(self) -> int:
        return len(self.prefix) + max(len(a) for a in self.answers)


class MixedCaptionDataset(Dataset):
    """Several captioning sets (one per modality, e.g. images and audio) served as one: index i runs through
    the parts in order, so a shuffled order mixes the modalities in every batch."""

    def __init__(self, parts: dict[str, CaptionDataset]):
        if not parts:
            raise ValueError("parts: expected at least one captioning set, got none")
        first = next(iter(parts.values()))
        for name, part in parts.items():
            if (part.pad_id, part.eos_id) != (first.pad_id, first.eos_id):
                raise ValueError(f"parts[{name!r}]: tokenised with another tokenizer (pad/eos ids differ)")
        self.parts = parts
        self.pad_id, self.eos_id = first.pad_id, first.eos_id
        self._starts = [0]
        for part in parts.values():
            self._starts.append(self._starts[-1] + len(part))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        for part, start, end in zip(self.parts.values(), self._starts, self._starts[1:]):
            if i < end:
                return part[i - start]
        raise AssertionError("unreachable: the index was range-checked")

    def max_length(self) -> int:
        return max(part.max_length() for part in self.parts.values())
