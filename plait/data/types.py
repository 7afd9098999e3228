"""Plain containers shared by the data sources (bundled synthetic sets and local files)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CaptionSplit:
    """One split of an image-captioning data set, fully in memory.

    Images are kept as uint8 HWC (what Pillow decodes to) so a split is small and exact;
    normalisation to float CHW happens per batch in `plait.data.images.normalize`.
    """

    images: torch.Tensor  # uint8 [N, H, W, 3]
    captions: list[str]

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor):
            raise ValueError(f"images: expected a torch.Tensor, got {type(self.images).__name__}")
        if self.images.dtype != torch.uint8:
            raise ValueError(f"images: expected dtype torch.uint8, got {self.images.dtype}")
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images: expected shape [N, H, W, 3], got {list(self.images.shape)}")
        if not isinstance(self.captions, list):
            raise ValueError(f"captions: expected a list of str, got {type(self.captions).__name__}")
        if len(self.captions) != self.images.shape[0]:
            raise ValueError(
                f"captions: expected one caption per image ({self.images.shape[0]}), got {len(self.captions)}"
            )
        for i, caption in enumerate(self.captions):
            if not isinstance(caption, str):
                raise ValueError(f"captions[{i}]: expected str, got {type(caption).__name__}")

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def items(self) -> torch.Tensor:
        """What each caption describes (here the images), one row per caption."""
        return self.images


@dataclass
class AudioSplit:
    """One split of an audio-captioning data set: log-mel features (N, frames, n_mels), float32."""

    features: torch.Tensor
    captions: list[str]

    def __post_init__(self) -> None:
        if not isinstance(self.features, torch.Tensor) or self.features.ndim != 3:
            got = list(self.features.shape) if isinstance(self.features, torch.Tensor) else type(self.features).__name__
            raise ValueError(f"features: expected a tensor (N, frames, n_mels), got {got}")
        if len(self.captions) != self.features.shape[0]:
            raise ValueError(f"captions: expected one caption per clip ({self.features.shape[0]}), got {len(self.captions)}")

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def items(self) -> torch.Tensor:
        return self.features
