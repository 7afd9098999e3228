"""Rotary position embeddings: one family, configured per model and per layer type.

- `RotaryEmbedding(head_dim, base, partial_rotary_factor)`: standard RoPE over the first
  int(head_dim * partial_rotary_factor) dims of each head (the rest pass through), in the
  rotate-half layout that Hugging Face checkpoints use.
- Dual-base models (a local base for sliding-window layers, a global one for full layers) hold one
  `RotaryEmbedding` per layer type (`rotary_per_layer_type`), and each layer picks its own.
- `AxialRotaryEmbedding`: 3-D (t, h, w) RoPE for vision patches, equal frequency bands per axis.
- Packed rows need nothing special: `position_ids` restart at 0 for each document and the cos/sin
  are looked up per position.

`inv_freq` is a float32 buffer and cos/sin are computed in float32 whatever the model dtype:
bf16 positions above 256 are not even representable exactly.
"""

from __future__ import annotations

import torch
from torch import nn


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """int(head_dim * partial_rotary_factor): the `dim` of the frequency formula. An odd value rotates
    dim + 1 dims (one frequency per pair, as transformers computes it)."""
    if not 0.0 < partial_rotary_factor <= 1.0:
        raise ValueError(f"partial_rotary_factor: expected a value in (0, 1], got {partial_rotary_factor}")
    dim = int(head_dim * partial_rotary_factor)
    if dim < 1 or dim + dim % 2 > head_dim:
        raise ValueError(
            f"rotary dims: int(head_dim {head_dim} * partial_rotary_factor {partial_rotary_factor}) = {dim}, "
            f"expected 1..{head_dim - head_dim % 2}"
        )
    return dim


def inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


class _Float32Frequencies(nn.Module):
    """Holds `inv_freq` for `freq_dim` and `base` as a float32 buffer that stays float32 and exact: a move or
    cast (model.to(bfloat16), to_empty after a meta build) recomputes it on the new device."""

    def __init__(self, freq_dim: int, base: float):
        super().__init__()
        self.freq_dim, self.base = freq_dim, float(base)
        self.register_buffer("inv_freq", inverse_frequencies(self.freq_dim, self.base), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.inv_freq = inverse_frequencies(self.freq_dim, self.base).to(self.inv_freq.device)
        return self


class RotaryEmbedding(_Float32Frequencies):
    """position_ids (B, S) -> (cos, sin), each (B, S, rotary_dim) float32."""

    def __init__(self, head_dim: int, base: float, partial_rotary_factor: float = 1.0, scaling: float = 1.0):
        super().__init__(rotary_dim(head_dim, partial_rotary_factor), base)
        self.dim = self.freq_dim + self.freq_dim % 2  # rotated width: one pair per frequency
        self.scaling = scaling

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, S, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, dim), rotate-half layout
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


def rotary_per_layer_type(
    head_dim: int, params_per_type: dict[str, dict], default_partial_rotary_factor: float = 1.0
) -> nn.ModuleDict:
    """One RotaryEmbedding per layer type from HF-style `rope_parameters` per type
    ({"full_attention": {"rope_theta": 5e6, "partial_rotary_factor": 0.33, "rope_type": "default"}, ...})."""
    out = nn.ModuleDict()
    for layer_type, params in params_per_type.items():
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_parameters[{layer_type!r}].rope_type: plait supports 'default', got {rope_type!r}")
        factor = params.get("partial_rotary_factor", default_partial_rotary_factor)
        out[layer_type] = RotaryEmbedding(head_dim, params["rope_theta"], factor)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # split at d // 2, as transformers' rotate_half: for an odd width (an indexer's head_dim below the rotary
    # width, say) chunk(2) would put the longer half first
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head.

    x (B, S, n_heads, head_dim); cos, sin (B, S, rot) or (S, rot), float32. Computed in float32 and
    cast back, so low-precision models keep accurate angles."""
    rot = cos.shape[-1]
    if rot > x.shape[-1]:
        raise ValueError(f"rotary: {rot} rotary dims exceed head_dim {x.shape[-1]}")
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = (x_rot.float() * cos + rotate_half(x_rot.float()) * sin).to(x.dtype)
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


class AxialRotaryEmbedding(_Float32Frequencies):
    """3-D RoPE for vision patches: thw (N, 3) integer coordinates -> (cos, sin), each (N, rot) float32.

    Each axis gets the same frequencies over 2*((head_dim // 3) // 2) dims; the three axes' angles are
    concatenated (t, h, w) and duplicated in the rotate-half layout, so rot = 3 * that width; the head's
    remaining dims pass through."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        axis_dim = 2 * ((head_dim // 3) // 2)
        if axis_dim < 2:
            raise ValueError(f"axial rotary: head_dim {head_dim} is too small for 3 axes")
        super().__init__(axis_dim, base)
        self.axis_dim = axis_dim

    @torch.no_grad()
    def forward(self, thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if thw.ndim != 2 or thw.shape[-1] != 3:
            raise ValueError(f"axial rotary positions: expected shape (N, 3), got {list(thw.shape)}")
        freqs = (thw[..., None].float() * self.inv_freq.float()).flatten(1)  # (N, 3, a/2) -> (N, 3a/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def vision_patch_positions(grid_thw: torch.Tensor, spatial_merge_size: int = 1) -> torch.Tensor:
    """(t, h, w) coordinates of every patch, images one after another, patches in spatial-merge-block
    order (each m x m block row-major, blocks row-major), as patch sequences are laid out: (N, 3)."""
    out = []
    m = spatial_merge_size
    for t, h, w in grid_thw.tolist():
        if h % m or w % m:
            raise ValueError(f"grid_thw: h={h}, w={w} must be multiples of spatial_merge_size {m}")
        tt = torch.arange(t).view(t, 1, 1, 1, 1).expand(t, h // m, w // m, m, m)
        hh = torch.arange(h).view(h // m, m).view(1, h // m, 1, m, 1).expand(t, h // m, w // m, m, m)
        ww = torch.arange(w).view(w // m, m).view(1, 1, w // m, 1, m).expand(t, h // m, w // m, m, m)
        out.append(torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3))
    return torch.cat(out).to(grid_thw.device)
