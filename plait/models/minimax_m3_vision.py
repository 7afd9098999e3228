"""MiniMax-M3-VL vision side, plait's native implementation: the vision tower and the projector.

    pixel patches (N, C*T*P*P) -> patch embedding -> pre-norm -> encoder layers (full attention within each
    image or video, all frames together, 3-D axial RoPE) -> projector (per patch, vision -> text width)
    -> spatial merge (m x m neighbouring patches into one token) -> (N / m^2, text hidden)

Patches arrive in spatial-merge-block order (each m x m block row-major), as the M3 processor lays them
out, so merging is a reshape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from plait.nn.attention import Attention, AttentionMask
from plait.nn.mlp import MLP
from plait.nn.rope import AxialRotaryEmbedding, vision_patch_positions


def to_grid_list(grid_thw) -> torch.Tensor:
    """(t, h, w) per image from a tensor or nested lists -> (N, 3) int64 tensor; a clear error otherwise."""
    raw = torch.as_tensor(grid_thw if not isinstance(grid_thw, torch.Tensor) else grid_thw.cpu())
    if raw.dtype == torch.bool or (raw.is_floating_point() and not bool((raw == raw.round()).all())):
        raise ValueError(f"grid_thw: expected (t, h, w) per image, positive integers, got {raw.tolist()}")
    grid = raw.to(torch.long)  # whole floats (2.0) are counts still; 1.5 is not
    if grid.ndim == 1 and grid.numel() == 3:
        grid = grid.view(1, 3)
    if grid.ndim != 2 or grid.shape[-1] != 3 or bool((grid <= 0).any()):
        raise ValueError(f"grid_thw: expected (t, h, w) per image, positive integers, got {grid.tolist()}")
    return grid


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, backend: str):
        super().__init__()
        H = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.self_attn = Attention(H, config.num_attention_heads, config.num_attention_heads,
                                   H // config.num_attention_heads, qkv_bias=True, o_bias=True, backend=backend)
        self.layer_norm2 = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.mlp = MLP(H, config.intermediate_size, config.hidden_act, gated=False, bias=True)

    def forward(self, h, rope, mask: AttentionMask):
        h = h + self.self_attn(self.layer_norm1(h), rope, mask)
        return h + self.mlp(self.layer_norm2(h))


class VisionTower(nn.Module):
    """pixel_values (N, C*T*P*P), grid_thw (images, 3) -> patch features (N, vision hidden)."""

    def __init__(self, config: PretrainedConfig, backend: str = "sdpa"):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"vision_config: hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.config = config
        self.patch_dim = config.num_channels * config.temporal_patch_size * config.patch_size**2
        # A Conv3d whose stride equals its kernel is a linear map of each flattened patch.
        self.patch_embed = nn.Linear(self.patch_dim, config.hidden_size, bias=False)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleDict({str(i): VisionEncoderLayer(config, backend)
                                     for i in range(config.num_hidden_layers)})
        rope_theta = (config.rope_parameters or {}).get("rope_theta", 10000.0)
        self.rotary = AxialRotaryEmbedding(config.hidden_size // config.num_attention_heads, rope_theta)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid = to_grid_list(grid_thw)
        n_patches = int(grid.prod(-1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape != (n_patches, self.patch_dim):
            raise ValueError(f"pixel_values: expected shape [{n_patches}, {self.patch_dim}] for grid_thw "
                             f"{grid.tolist()}, got {list(pixel_values.shape)}")
        if not pixel_values.is_floating_point():  # raw 0-255 pixels would run, as garbage
            raise ValueError(f"pixel_values: expected normalised floating-point patches (plait.data.m3_processing "
                             f"makes them), got {pixel_values.dtype}")
        h = self.pre_layrnorm(self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)))
        device = h.device
        positions = vision_patch_positions(grid, self.config.spatial_merge_size).to(device)
        cos, sin = self.rotary(positions)
        sizes = grid.prod(-1)
        if bool((sizes == sizes[0]).all()):
            # Same-sized images (the usual batch): one row per image, plain bidirectional attention, no mask.
            n, per = len(grid), int(sizes[0])
            h, cos, sin = h.view(n, per, -1), cos.view(n, per, -1), sin.view(n, per, -1)
            mask = AttentionMask(torch.arange(per, device=device), causal=False)
        else:
            # Mixed sizes: one row of all patches, each image (all its frames) a document of its own.
            image_ids = torch.repeat_interleave(torch.arange(len(grid)), sizes).to(device)
            h = h.unsqueeze(0)
            mask = AttentionMask(torch.arange(n_patches, device=device), None, image_ids.view(1, -1), causal=False)
        for layer in self.layers.values():
            h = layer(h, (cos, sin), mask)
        return h.reshape(n_patches, -1)


class MultiModalProjector(nn.Module):
    """Per patch: vision -> text width (GELU MLP); then m*m neighbouring patches concatenated and fused to
    one text-width token (a second GELU MLP)."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        text_h, vis_h = config.text_config.hidden_size, config.vision_config.hidden_size
        self.merge = config.vision_config.spatial_merge_size
        merged = getattr(config, "merged_hidden_size", None) or text_h * self.merge**2
        self.linear_1 = nn.Linear(vis_h, config.projector_hidden_size)
        self.linear_2 = nn.Linear(config.projector_hidden_size, text_h)
        self.merge_linear_1 = nn.Linear(merged, config.projector_hidden_size)
        self.merge_linear_2 = nn.Linear(config.projector_hidden_size, text_h)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        h = self.linear_2(F.gelu(self.linear_1(patches)))  # (N, text H)
        h = h.reshape(h.shape[0] // self.merge**2, -1)  # (N / m^2, m^2 * text H): merge blocks are contiguous
        return self.merge_linear_2(F.gelu(self.merge_linear_1(h)))


# ---------------------------------------------------------------------------------------------
# The input layout the tower reads (plait.data.m3_processing builds it from pictures and clips)
# ---------------------------------------------------------------------------------------------


def patchify(frames: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, F, C, H, W) -> patches (n * F/T * H/P * W/P, C*T*P*P) and grid_thw (n, 3) = (F/T, H/P, W/P).

    Each temporal patch's m x m blocks of patches are contiguous (row-major inside the block, blocks
    row-major), the order the projector merges them in; inside a patch the values run channel, then
    frame, then pixel row and column, as the patch embedding (a Conv3d) reads them.
    """
    p, m, t = patch, merge, temporal
    if frames.ndim != 5:
        raise ValueError(f"frames: expected shape [n, frames, C, H, W], got {list(frames.shape)}")
    n, f, c, h, w = frames.shape
    if f % t or h % (p * m) or w % (p * m):
        raise ValueError(f"frames: expected frames a multiple of temporal_patch_size {t} and H, W multiples of "
                         f"patch_size x merge_size = {p * m}, got {list(frames.shape)}")
    gt, gh, gw = f // t, h // p, w // p
    x = frames.reshape(n, gt, t, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # (n, gt, gh/m, gw/m, m, m, C, T, P, P)
    patches = x.reshape(n * gt * gh * gw, c * t * p * p)
    grid = torch.tensor([[gt, gh, gw]] * n, dtype=torch.long)
    return patches, grid


def patchify_images(pixel_values: torch.Tensor, patch: int, merge: int, temporal: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised still images (n, C, H, W) -> patches (n*H/P*W/P, C*T*P*P), grid_thw (n, 3) = (1, H/P, W/P):
    each image fills all T temporal slots of its patches."""
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values: expected shape [n, C, H, W], got {list(pixel_values.shape)}")
    frames = pixel_values.unsqueeze(1).expand(-1, temporal, -1, -1, -1)  # (n, T, C, H, W), no copy
    return patchify(frames, patch, merge, temporal)
