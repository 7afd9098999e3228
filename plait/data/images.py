"""plait's own image preprocessing, in Pillow and torch (torchvision breaks transformers beside this torch).

Images travel as uint8 HWC tensors (compact, exact) and become normalised float32 CHW only per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# The CLIP statistics, which the vision towers plait reads from HF checkpoints were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as RGB, upright, with any transparency composited onto white.

    A plain convert("RGB") would turn transparent pixels black, and photos often carry their
    orientation in EXIF instead of in the pixels.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode the image at `path` as RGB; a missing or unreadable file is a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no image file at {str(path)!r}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not in the middle of training
            return to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"path: cannot read image {str(path)!r} ({type(e).__name__}: {e})") from e


def resize_to_square(img: Image.Image, size: int) -> torch.Tensor:
    """Bicubic-resize `img` to `size` x `size` (aspect ratio not kept, nothing cropped) -> uint8 [size, size, 3]."""
    if not isinstance(img, Image.Image):
        raise ValueError(f"img: expected a PIL.Image.Image, got {type(img).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected an int >= 1, got {size!r}")
    img = img if img.mode == "RGB" else to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def normalize(
    images_uint8: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
    rescale_factor: float = 1 / 255,
) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W]: (x * rescale_factor - mean) / std per channel.

    Computed as transformers' image processors compute it, (x - mean / rescale_factor) / (std / rescale_factor)
    in float32, so the values are theirs bit for bit (scaling to [0, 1] first differs in the last bit).
    """
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dtype != torch.uint8:
        got = images_uint8.dtype if isinstance(images_uint8, torch.Tensor) else type(images_uint8).__name__
        raise ValueError(f"images_uint8: expected a torch.uint8 tensor, got {got}")
    if images_uint8.ndim < 3 or images_uint8.shape[-1] != 3:
        raise ValueError(f"images_uint8: expected shape [..., H, W, 3], got {list(images_uint8.shape)}")
    for arg, value in (("mean", mean), ("std", std)):
        if len(value) != 3:
            raise ValueError(f"{arg}: expected 3 values (one per RGB channel), got {len(value)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std: expected positive values, got {tuple(std)}")
    if not rescale_factor > 0:
        raise ValueError(f"rescale_factor: expected a positive number, got {rescale_factor!r}")
    device = images_uint8.device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device) * (1.0 / rescale_factor)
    std_t = torch.tensor(std, dtype=torch.float32, device=device) * (1.0 / rescale_factor)
    x = (images_uint8.float() - mean_t) / std_t
    return x.movedim(-1, -3).contiguous()  # (..., H, W, 3) -> (..., 3, H, W)
