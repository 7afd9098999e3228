"""Rotary position embeddings: one family, configured per model and per layer type.

- `RotaryEmbedding(head_dim, base, partial_rotary_factor)`: standard RoPE over the first
  int(head_dim * partial_rotary_factor) dims of each head (the rest pass through), in the
  rotate-half layout that Hugging Face checkpoints use.
- Dual-base models (a local base for sliding-window layers, a global one for full layers) hold one
  `RotaryEmbedding` per layer type (`rotary_per_layer_type`), and each layer picks its own.
- Context-extension scalings of the frequencies, named as in HF `rope_parameters.rope_type`: "linear"
  (position interpolation), "yarn" (per-band blend of interpolation and extrapolation, plus an attention
  factor on cos/sin) and "llama3" (per-wavelength smoothing); "dynamic" and "longrope" change with the
  sequence length at run time and are refused.
- `AxialRotaryEmbedding`: 3-D (t, h, w) RoPE for vision patches, equal frequency bands per axis.
- Packed rows need nothing special: `position_ids` restart at 0 for each document and the cos/sin
  are looked up per position.

`inv_freq` is a float32 buffer and cos/sin are computed in float32 whatever the model dtype:
bf16 positions above 256 are not even representable exactly.
"""

from __future__ import annotations

import math

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


SCALED_ROPE_TYPES = ("linear", "yarn", "llama3")


def _param(params: dict, key: str, rope_type: str):
    """A required positive number of a scaled rope type."""
    value = params.get(key)
    if value is None:
        raise ValueError(f"rope_type {rope_type!r} needs {key!r}, got {params!r:.300}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"rope_type {rope_type!r}: {key!r} must be a positive number, got {value!r}")
    return value


def scaled_frequencies(inv_freq: torch.Tensor, dim: int, base: float, params: dict,
                       max_position_embeddings: int | None = None, truncate: bool = True) -> tuple[torch.Tensor, float]:
    """The `rope_type` scaling of `inv_freq` (the default frequencies for `dim` and `base`) -> (scaled
    frequencies, attention factor that multiplies cos and sin). The formulas are those of the HF configs that
    carry these types (YaRN, arXiv 2309.00071; Llama 3.1's wavelength smoothing)."""
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":  # interpolating positions by 1 / factor is dividing the frequencies by it
        return inv_freq / _param(params, "factor", rope_type), 1.0
    if rope_type == "llama3":
        factor, low, high = (_param(params, k, rope_type) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        context = _param(params, "original_max_position_embeddings", rope_type)
        if high <= low:
            raise ValueError(f"rope_type 'llama3': high_freq_factor must exceed low_freq_factor, got {high} <= {low}")
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)  # long waves: interpolated
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < context / high) & ~(wavelen > context / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        original = _param(params, "original_max_position_embeddings", rope_type)
        if params.get("factor") is None:
            if max_position_embeddings is None:
                raise ValueError("rope_type 'yarn' without 'factor' needs max_position_embeddings")
            factor = max_position_embeddings / original
        else:
            factor = _param(params, "factor", rope_type)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = params.get("attention_factor")
        if attention is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
        beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

        def band(rotations):  # the frequency index that turns `rotations` times over the original context
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = band(beta_fast), band(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency (fast bands), 0: interpolate it (slow bands)
        return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, attention
    raise ValueError(f"rope_type: plait supports 'default', {', '.join(map(repr, SCALED_ROPE_TYPES))} (the "
                     f"frequencies of 'dynamic' and 'longrope' change with the sequence length); got {rope_type!r}")


class _Float32Frequencies(nn.Module):
    """Holds `inv_freq` for `freq_dim` and `base` as a float32 buffer that stays float32 and exact: a move or
    cast (model.to(bfloat16), to_empty after a meta build) recomputes it on the new device."""

    def __init__(self, freq_dim: int, base: float):
        super().__init__()
        self.freq_dim, self.base = freq_dim, float(base)
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self) -> torch.Tensor:
        return inverse_frequencies(self.freq_dim, self.base)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.inv_freq = self._frequencies().to(self.inv_freq.device)
        return self


class RotaryEmbedding(_Float32Frequencies):
    """position_ids (B, S) -> (cos, sin), each (B, S, rotary_dim) float32.

    `rope_parameters` (HF style: rope_type, factor, ...) scales the frequencies (`scaled_frequencies`), and its
    attention factor multiplies cos and sin, as does `scaling`."""

    def __init__(self, head_dim: int, base: float, partial_rotary_factor: float = 1.0, scaling: float = 1.0,
                 rope_parameters: dict | None = None, max_position_embeddings: int | None = None,
                 truncate: bool = True):
        if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 0):
            raise ValueError(f"rope_theta: expected a positive number, got {base!r}")
        freq_dim = rotary_dim(head_dim, partial_rotary_factor)
        self._scaling_args = (dict(rope_parameters or {}), max_position_embeddings, truncate)
        _, attention = scaled_frequencies(inverse_frequencies(freq_dim, base), freq_dim, base, *self._scaling_args)
        super().__init__(freq_dim, base)
        self.dim = self.freq_dim + self.freq_dim % 2  # rotated width: one pair per frequency
        self.scaling = scaling * attention
        self.rope_type = self._scaling_args[0].get("rope_type", "default")

    def _frequencies(self) -> torch.Tensor:
        default = inverse_frequencies(self.freq_dim, self.base)
        return scaled_frequencies(default, self.freq_dim, self.base, *self._scaling_args)[0]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, S, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, dim), rotate-half layout
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    def extra_repr(self) -> str:
        kind = "" if self.rope_type == "default" else f", rope_type={self.rope_type}"
        return f"dim={self.dim}, base={self.base}{kind}"


def rotary_from_parameters(head_dim: int, params: dict, default_partial_rotary_factor: float = 1.0,
                           max_position_embeddings: int | None = None, truncate: bool | None = None,
                           name: str = "rope_parameters") -> RotaryEmbedding:
    """A RotaryEmbedding from one HF-style `rope_parameters` dict (rope_theta, partial_rotary_factor,
    rope_type and its scaling keys); `truncate` None reads the dict's own (yarn, default True).
    `default_partial_rotary_factor` is the model's own default for the `default` rope type (its own
    frequencies function); a scaled type runs transformers' shared one, whose default is the whole head."""
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ValueError(f"{name}: expected a dict with 'rope_theta', got {params!r:.300}")
    if params.get("rope_type", "default") != "default":
        default_partial_rotary_factor = 1.0
    try:
        return RotaryEmbedding(head_dim, params["rope_theta"], params.get("partial_rotary_factor", default_partial_rotary_factor),
                               rope_parameters=params, max_position_embeddings=max_position_embeddings,
                               truncate=params.get("truncate", True) if truncate is None else truncate)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def rotary_per_layer_type(
    head_dim: int, params_per_type: dict[str, dict], default_partial_rotary_factor: float = 1.0,
    layer_types=None, max_position_embeddings: int | None = None,
) -> nn.ModuleDict:
    """One RotaryEmbedding per layer type from HF-style `rope_parameters` per type
    ({"full_attention": {"rope_theta": 5e6, "partial_rotary_factor": 0.33, "rope_type": "default"}, ...}),
    for the `layer_types` given (default: every entry); an entry no layer uses is not read, as in transformers.
    yarn's `truncate` is True: transformers reads it from the outer (per-type) dict, which never has it."""
    out = nn.ModuleDict()
    for layer_type, params in params_per_type.items():
        if layer_types is None or layer_type in layer_types:
            out[layer_type] = rotary_from_parameters(head_dim, params, default_partial_rotary_factor,
                                                     max_position_embeddings, True, f"rope_parameters[{layer_type!r}]")
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
    if rot % 2 == 0 and not (cos.requires_grad or sin.requires_grad or torch.compiler.is_compiling()):
        # (a compiled graph fuses the plain ops by itself)
        return _Rotary.apply(x, cos, sin)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = (x_rot.float() * cos + rotate_half(x_rot.float()) * sin).to(x.dtype)
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


class _Rotary(torch.autograd.Function):
    """`apply_rotary` for an even rotary width in a few whole-tensor passes written into one output: the plain
    ops (two products, rotate_half's negation and concatenation, a sum, the concatenation with the pass-through
    dims) are each an op and a buffer in forward and again in backward, which at a few hundred tokens costs more
    than the arithmetic. With halves x1, x2 of the rotated dims, the forward is
    y1 = x1 cos1 - x2 sin1, y2 = x2 cos2 + x1 sin2; the rotation is orthogonal, so its backward is the rotation by
    -angle: dx1 = g1 cos1 + g2 sin2, dx2 = g2 cos2 - g1 sin1."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        half = cos.shape[-1] // 2
        return _rotary_pass(x, cos, sin[..., :half], sin[..., half:], sign=1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = cos.shape[-1] // 2
        return _rotary_pass(grad, cos, sin[..., half:], sin[..., :half], sign=-1.0), None, None


def _rotary_pass(x: torch.Tensor, cos: torch.Tensor, sin_1: torch.Tensor, sin_2: torch.Tensor,
                 sign: float) -> torch.Tensor:
    """y1 = x1 cos1 - sign x2 sin_1, y2 = x2 cos2 + sign x1 sin_2 over x's first rot = cos.shape[-1] dims, the rest
    copied; computed in float32 at least and cast back to x's dtype."""
    rot, half = cos.shape[-1], cos.shape[-1] // 2
    dtype = torch.promote_types(x.dtype, torch.float32)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    xf = x.to(dtype)
    x1, x2 = xf[..., :half], xf[..., half:rot]
    torch.mul(x1, cos[..., :half], out=out[..., :half]).addcmul_(x2, sin_1, value=-sign)
    torch.mul(x2, cos[..., half:], out=out[..., half:rot]).addcmul_(x1, sin_2, value=sign)
    out[..., rot:] = x[..., rot:]
    return out.to(x.dtype)


class AxialRotaryEmbedding(_Float32Frequencies):
    """3-D RoPE for vision patches: thw (N, 3) integer coordinates -> (cos, sin), each (N, rot) float32.

    Each axis gets the same frequencies over 2*((head_dim // 3) // 2) dims; the three axes' angles are
    concatenated (t, h, w) and duplicated in the rotate-half layout, so rot = 3 * that width; the head's
    remaining dims pass through."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        if head_dim < 1:
            raise ValueError(f"axial rotary: expected a positive head_dim, got {head_dim}")
        axis_dim = 2 * ((head_dim // 3) // 2)  # 0 below head_dim 6: no dim rotates, as in transformers
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
