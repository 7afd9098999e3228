"""MiniMax-M3-VL image and video preprocessing, plait's own (Pillow + torch): the numbers transformers'
`MiniMaxM3VLImageProcessor`, `MiniMaxM3VLVideoProcessor` and `MiniMaxM3VLProcessor` give, without torchvision.

    image (any size, RGB uint8) -> `smart_resize`: both sides multiples of patch x merge, pixel count in
    [min_pixels, max_pixels], aspect ratio kept as closely as that allows -> bicubic, antialiased (torch's
    uint8 kernel, the one torchvision calls on CPU) -> (x - 255 mean) / (255 std) in float32 -> patches
    (t*h*w, C*T*P*P) in spatial-merge-block order, a still image repeated over the T temporal slots;
    `image_grid_thw` (1, h, w) in patches.
    video (frames of one size) -> the same per frame; the frame count padded up to a multiple of T by
    repeating the last frame; (t, h, w) split into segments of at most `segment_max_frames` temporal
    patches, one `video_grid_thw` row each (the vision tower attends within a segment).
    prompt -> each image marker becomes start + image x (t*h*w / m^2) + end; each video marker becomes,
    per temporal patch, [a "]<]{s:.1f} seconds[>[" timestamp] start + video x (h*w / m^2) + end.

tests/data/test_m3_processing.py checks all of it against fixtures that transformers' processors wrote.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from plait.data.images import CLIP_MEAN, CLIP_STD, normalize, to_rgb
from plait.models.minimax_m3_vision import patchify, patchify_images

# transformers 5.23.0's defaults: MiniMaxM3VLImageProcessor (size shortest_edge / longest_edge) and
# MiniMaxM3VLVideoProcessor (min_pixels / max_pixels, vision_segment_max_frames).
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 4 * 28 * 28, 576 * 28 * 28
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 4 * 28 * 28, 768 * 28 * 28
VIDEO_SEGMENT_MAX_FRAMES = 4
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class VisionSettings:
    """How images (or videos) become patches for one model; `segment_max_frames` matters for videos only
    (None: a video is one segment)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    segment_max_frames: int | None = None

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.max_pixels < self.factor**2:
            raise ValueError(f"max_pixels: expected at least (patch_size x merge_size)^2 = {self.factor**2} "
                             f"(one merged token), got {self.max_pixels}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels: expected <= max_pixels {self.max_pixels}, got {self.min_pixels}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"{name}: expected 3 values (one per RGB channel), got {list(value)}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std: expected positive values, got {self.image_std}")
        if not self.rescale_factor > 0:
            raise ValueError(f"rescale_factor: expected a positive number, got {self.rescale_factor!r}")
        s = self.segment_max_frames
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"segment_max_frames: expected an int >= 1 or None, got {s!r}")

    @property
    def factor(self) -> int:
        """Both resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size


IMAGE_DEFAULTS = VisionSettings()
VIDEO_DEFAULTS = VisionSettings(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS,
                                segment_max_frames=VIDEO_SEGMENT_MAX_FRAMES)


# ---------------------------------------------------------------------------------------------
# Settings from a checkpoint
# ---------------------------------------------------------------------------------------------

_SHARED_KEYS = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model_dir: cannot read {str(file)!r} ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"model_dir: {str(file)!r} holds {type(data).__name__}, expected a JSON object")
    return data


def _processor_dicts(model_dir: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """kind (image, video) -> (its processor's saved settings, where they came from). transformers 5 writes
    both into processor_config.json; older checkpoints have preprocessor_config.json and
    video_preprocessor_config.json."""
    found: dict[str, tuple[dict[str, Any], str]] = {"image": ({}, ""), "video": ({}, "")}
    combined = model_dir / "processor_config.json"
    if combined.is_file():
        data = _read_json(combined)
        for kind in found:
            if isinstance(data.get(f"{kind}_processor"), dict):
                found[kind] = (data[f"{kind}_processor"], f"{combined} ({kind}_processor)")
    for kind, name in (("image", "preprocessor_config.json"), ("video", "video_preprocessor_config.json")):
        if not found[kind][0] and (model_dir / name).is_file():
            found[kind] = (_read_json(model_dir / name), str(model_dir / name))
    return found


def _image_pixel_bounds(d: dict[str, Any], src: str) -> dict[str, int]:
    # MiniMaxM3VLImageProcessor.__init__: `size` {shortest_edge, longest_edge} holds the pixel bounds,
    # min_pixels / max_pixels override it, and the [672, 672] the released checkpoints carry is ignored.
    out: dict[str, int] = {}
    size = d.get("size")
    if isinstance(size, dict) and ("shortest_edge" in size or "longest_edge" in size):
        if "shortest_edge" in size:
            out["min_pixels"] = size["shortest_edge"]
        if "longest_edge" in size:
            out["max_pixels"] = size["longest_edge"]
    elif size is not None and size != [672, 672]:
        raise ValueError(f"{src}: size: expected {{'shortest_edge': min pixels, 'longest_edge': max pixels}}, "
                         f"got {size!r}")
    for key in ("min_pixels", "max_pixels"):
        if d.get(key) is not None:
            out[key] = d[key]
    return out


def _from_model(config: Any) -> dict[str, int]:
    """The patch sizes a model config fixes (its vision_config), under the settings' names."""
    vision = config.get("vision_config") if isinstance(config, dict) else getattr(config, "vision_config", None)
    if vision is None:
        return {}
    vision = vision if isinstance(vision, dict) else vision.to_dict()
    names = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
             "merge_size": "spatial_merge_size"}
    return {ours: vision[theirs] for ours, theirs in names.items() if vision.get(theirs) is not None}


def _settings(defaults: VisionSettings, model: dict[str, int], d: dict[str, Any], src: str,
              bounds: dict[str, int], video: bool) -> VisionSettings:
    values: dict[str, Any] = dict(model)
    for key in _SHARED_KEYS:
        if d.get(key) is None:
            continue
        if key in model and d[key] != model[key]:
            vision_key = "spatial_merge_size" if key == "merge_size" else key
            raise ValueError(f"{src}: {key} {d[key]!r} disagrees with the model's vision_config.{vision_key} "
                             f"{model[key]!r}; the patches would not fit the model")
        values[key] = d[key]
    if video and "vision_segment_max_frames" in d:
        values["segment_max_frames"] = d["vision_segment_max_frames"]
    try:
        return replace(defaults, **values, **bounds)
    except ValueError as e:
        raise ValueError(f"{src or 'config'}: {e}") from e


def load_settings(config: Any = None, model_dir: str | Path | None = None) -> tuple[VisionSettings, VisionSettings]:
    """(image settings, video settings) for a MiniMax-M3-VL model: its HF config (a PretrainedConfig or a
    dict) and / or its checkpoint directory.

    Each value comes from the checkpoint's processor config when `model_dir` has one (processor_config.json,
    or preprocessor_config.json / video_preprocessor_config.json), else from the model config's
    vision_config (patch_size, temporal_patch_size, spatial_merge_size; read from `model_dir`/config.json
    when `config` is not given), else transformers' defaults. A processor config whose patch sizes disagree
    with the model's vision_config is an error: the patches would not fit the model.
    """
    (image_d, image_src), (video_d, video_src) = ({}, ""), ({}, "")
    if model_dir is not None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ValueError(f"model_dir: expected a directory, got {str(model_dir)!r}")
        if config is None and (model_dir / "config.json").is_file():
            config = _read_json(model_dir / "config.json")
        found = _processor_dicts(model_dir)
        (image_d, image_src), (video_d, video_src) = found["image"], found["video"]
    model = _from_model(config) if config is not None else {}
    video_bounds = {key: video_d[key] for key in ("min_pixels", "max_pixels") if video_d.get(key) is not None}
    return (_settings(IMAGE_DEFAULTS, model, image_d, image_src, _image_pixel_bounds(image_d, image_src), False),
            _settings(VIDEO_DEFAULTS, model, video_d, video_src, video_bounds, True))


# ---------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """The (height, width) an image is resized to: both multiples of `factor`, height x width within
    [min_pixels, max_pixels] where rounding allows, the aspect ratio kept as closely as possible.

    transformers' rule exactly, Python's round() (halves to even) included: a 20-pixel side with factor 8
    rounds to 16, a 28-pixel one to 32.
    """
    for name, value in (("height", height), ("width", width), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"height, width: expected an aspect ratio of at most {MAX_ASPECT_RATIO}, got "
                         f"{height} x {width} ({max(height, width) / min(height, width):.1f})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> uint8 (n, 3, height, width), bicubic with antialiasing.

    torch's uint8 kernel, on CPU, is what torchvision's resize runs for uint8 bicubic there, so the bytes
    match transformers' processors (Pillow's BICUBIC differs from it by up to 10 levels on the fixture images).
    A frame already at the target size is returned as it is, as torchvision does.
    """
    if frames.shape[-2:] == (height, width):
        return frames
    return F.interpolate(frames.cpu().contiguous(), size=(height, width), mode="bicubic", align_corners=False,
                         antialias=True)


# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------

def _to_uint8_chw(image: Any, where: str) -> torch.Tensor:
    """A PIL image (any mode) or a uint8 [H, W, 3] array / tensor -> uint8 [3, H, W] tensor."""
    if isinstance(image, Image.Image):
        array = np.asarray(image if image.mode == "RGB" else to_rgb(image))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))  # a flipped view has negative strides
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{where}: expected a PIL image or a uint8 [H, W, 3] array, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise ValueError(f"{where}: expected dtype uint8 (pixel values 0..255), got {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{where}: expected shape [H, W, 3] (RGB, channels last), got {list(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: expected an image of at least 1 x 1 pixels, got {list(image.shape)}")
    return image.permute(2, 0, 1).contiguous()


def _normalized(frames: torch.Tensor, settings: VisionSettings) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (..., 3, H, W)."""
    return normalize(frames.movedim(-3, -1), settings.image_mean, settings.image_std, settings.rescale_factor)


def _check_settings(settings: Any) -> VisionSettings:
    if not isinstance(settings, VisionSettings):
        raise ValueError(f"settings: expected a VisionSettings, got {type(settings).__name__}")
    return settings


def _check_batch(items: Any, name: str, many: str, one: str) -> None:
    """`items` must be a non-empty list (of images, or of videos), not one image or one array."""
    if isinstance(items, (Image.Image, np.ndarray, torch.Tensor)) or not isinstance(items, Sequence):
        raise ValueError(f"{name}: expected a list of {many}, got {type(items).__name__}")
    if len(items) == 0:
        raise ValueError(f"{name}: expected at least one {one}, got none")


def _target_size(height: int, width: int, s: VisionSettings, where: str) -> tuple[int, int]:
    """`smart_resize` under the settings' bounds, its errors naming the image or video."""
    try:
        return smart_resize(height, width, s.factor, s.min_pixels, s.max_pixels)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def preprocess_images(images: Sequence[Any], settings: VisionSettings = IMAGE_DEFAULTS) -> dict[str, torch.Tensor]:
    """Images of any sizes (PIL images or uint8 [H, W, 3] arrays) -> `pixel_values` (Σ h*w, C*T*P*P) float32 and
    `image_grid_thw` (n, 3) int64, each image at its own resolution (`smart_resize`)."""
    s = _check_settings(settings)
    _check_batch(images, "images", "images", "image")
    patches, grids = [], []
    for i, image in enumerate(images):
        pixels = _to_uint8_chw(image, f"images[{i}]")
        height, width = _target_size(pixels.shape[1], pixels.shape[2], s, f"images[{i}]")
        x = _normalized(_resize(pixels[None], height, width), s)  # (1, 3, height, width)
        p, g = patchify_images(x, s.patch_size, s.merge_size, s.temporal_patch_size)
        patches.append(p)
        grids.append(g)
    return {"pixel_values": torch.cat(patches), "image_grid_thw": torch.cat(grids)}


def _video_frames(video: Any, where: str) -> torch.Tensor:
    """A list of frames (PIL images or uint8 [H, W, 3]) or a uint8 [F, H, W, 3] array -> uint8 (F, 3, H, W)."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if isinstance(video, torch.Tensor):
        if video.ndim != 4:
            raise ValueError(f"{where}: expected a list of frames or a uint8 [frames, H, W, 3] array, got shape "
                             f"{list(video.shape)}")
        video = list(video)
    if isinstance(video, (str, Image.Image)) or not isinstance(video, Sequence):
        raise ValueError(f"{where}: expected a list of frames, got {type(video).__name__}")
    if len(video) == 0:
        raise ValueError(f"{where}: expected at least one frame, got none")
    frames = [_to_uint8_chw(frame, f"{where} frame {j}") for j, frame in enumerate(video)]
    for j, frame in enumerate(frames):
        if frame.shape != frames[0].shape:
            raise ValueError(f"{where}: expected frames of one size, got frame 0 of {frames[0].shape[1]} x "
                             f"{frames[0].shape[2]} and frame {j} of {frame.shape[1]} x {frame.shape[2]} (H x W)")
    return torch.stack(frames)


def preprocess_videos(videos: Sequence[Any], settings: VisionSettings = VIDEO_DEFAULTS) -> dict[str, Any]:
    """Videos (each a list of frames of one size, or a uint8 [F, H, W, 3] array) -> `pixel_values_videos`
    (Σ t*h*w, C*T*P*P) float32, `video_grid_thw` (segments, 3) int64 and `num_chunks_per_video` (list of
    int: how many grid rows each video has).

    The frames of a video are resized together (`smart_resize` of their size); a frame count that is not a
    multiple of the temporal patch is padded by repeating the last frame. Frames are taken as given: no
    sampling by time here.
    """
    s = _check_settings(settings)
    _check_batch(videos, "videos", "videos (each a list of frames)", "video")
    patches, grid_rows, chunks = [], [], []
    for i, video in enumerate(videos):
        frames = _video_frames(video, f"videos[{i}]")
        height, width = _target_size(frames.shape[2], frames.shape[3], s, f"videos[{i}]")
        x = _normalized(_resize(frames, height, width), s)  # (F, 3, height, width)
        if pad := -x.shape[0] % s.temporal_patch_size:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        p, g = patchify(x[None], s.patch_size, s.merge_size, s.temporal_patch_size)
        patches.append(p)
        t, h, w = g[0].tolist()
        step = t if s.segment_max_frames is None else s.segment_max_frames
        rows = [[min(step, t - start), h, w] for start in range(0, t, step)]
        grid_rows += rows
        chunks.append(len(rows))
    return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grid_rows, dtype=torch.long),
            "num_chunks_per_video": chunks}


# ---------------------------------------------------------------------------------------------
# Prompt placeholders
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlaceholderTokens:
    """The markers a prompt carries and the tokens they expand to: strings for a text prompt, token ids for
    a prompt of ids. `start` / `end` bracket each image (and each video frame); None leaves them out, as
    plait's own tokenizers do."""

    image: str | int
    video: str | int
    start: str | int | None = None
    end: str | int | None = None


M3_TOKENS = PlaceholderTokens(image="]<]image[>[", video="]<]video[>[", start="]<]start of image[>[",
                              end="]<]end of image[>[")


def _grid(grid_thw: Any, merge: int, name: str) -> list[list[int]]:
    grid = torch.as_tensor(grid_thw).tolist() if grid_thw is not None else []
    if grid and not isinstance(grid[0], list):
        grid = [grid]
    for row in grid:
        if len(row) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in row) \
                or row[1] % merge or row[2] % merge:
            raise ValueError(f"{name}: expected rows of (t, h, w), positive ints with h and w multiples of "
                             f"merge_size {merge}, got {grid}")
    return grid


def _video_runs(video_grid_thw: Any, num_chunks_per_video: Sequence[int] | None, merge: int) -> list[tuple[int, int]]:
    """(temporal patches, tokens per temporal patch) per video, from its grid rows (segments)."""
    rows = _grid(video_grid_thw, merge, "video_grid_thw")
    chunks = [1] * len(rows) if num_chunks_per_video is None else list(num_chunks_per_video)
    if sum(chunks) != len(rows) or any(c < 1 for c in chunks):
        raise ValueError(f"num_chunks_per_video: expected positive counts adding up to the {len(rows)} rows of "
                         f"video_grid_thw, got {chunks}")
    runs, start = [], 0
    for i, n in enumerate(chunks):
        segment = rows[start:start + n]
        if any(row[1:] != segment[0][1:] for row in segment):
            raise ValueError(f"video_grid_thw: video {i}'s segments {segment} differ in h, w")
        runs.append((sum(row[0] for row in segment), segment[0][1] * segment[0][2] // merge**2))
        start += n
    return runs


def expand_placeholders(prompt: str | Sequence[int], *, image_grid_thw: Any = None, video_grid_thw: Any = None,
                        num_chunks_per_video: Sequence[int] | None = None,
                        video_seconds: Sequence[Sequence[float] | None] | None = None, merge_size: int = 2,
                        temporal_patch_size: int = 2, tokens: PlaceholderTokens = M3_TOKENS) -> str | list[int]:
    """Expand each image / video marker of `prompt` to as many placeholder tokens as the model has features
    for it: the i-th image marker takes image i of `image_grid_thw`, the i-th video marker video i.

    `prompt` is text (with `tokens` as strings, transformers' processor's job) or token ids (with `tokens`
    as ids). `video_seconds[i]`, when given, is the time in seconds of each frame of video i: every
    temporal patch is then preceded by its first frame's "]<]{s:.1f} seconds[>[" marker (text prompts
    only). A prompt whose marker count differs from the images or videos given is an error.
    """
    text = isinstance(prompt, str)
    if not text and (not isinstance(prompt, (Sequence, torch.Tensor)) or isinstance(prompt, bytes)):
        raise ValueError(f"prompt: expected a str or a sequence of token ids, got {type(prompt).__name__}")
    kinds = {type(v) for v in (tokens.image, tokens.video, tokens.start, tokens.end) if v is not None}
    if kinds != ({str} if text else {int}):
        raise ValueError(f"tokens: a {'text' if text else 'token-id'} prompt needs "
                         f"{'str' if text else 'int'} tokens, got {tokens}")
    images = [t * h * w // merge_size**2 for t, h, w in _grid(image_grid_thw, merge_size, "image_grid_thw")]
    videos = _video_runs(video_grid_thw, num_chunks_per_video, merge_size) if video_grid_thw is not None else []
    if video_seconds is not None:
        if not text:
            raise ValueError("video_seconds: timestamps are text; expand a text prompt to get them")
        if len(video_seconds) != len(videos):
            raise ValueError(f"video_seconds: expected one entry (or None) per video ({len(videos)}), "
                             f"got {len(video_seconds)}")
    if text:
        pieces = [p for p in re.split(f"({re.escape(tokens.image)}|{re.escape(tokens.video)})", prompt) if p]
    else:
        pieces = [int(v) for v in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
    n_images = sum(p == tokens.image for p in pieces)
    n_videos = sum(p == tokens.video for p in pieces)
    if (n_images, n_videos) != (len(images), len(videos)):
        raise ValueError(f"prompt: {n_images} image and {n_videos} video markers, but {len(images)} images and "
                         f"{len(videos)} videos were given")
    bracket = ([tokens.start] if tokens.start is not None else [], [tokens.end] if tokens.end is not None else [])
    out: list = []
    next_image = next_video = 0
    for piece in pieces:
        if piece == tokens.image:
            out += bracket[0] + [tokens.image] * images[next_image] + bracket[1]
            next_image += 1
        elif piece == tokens.video:
            frames, per_frame = videos[next_video]
            seconds = video_seconds[next_video] if video_seconds is not None else None
            for k in range(frames):
                if seconds:
                    out.append(f"]<]{seconds[min(k * temporal_patch_size, len(seconds) - 1)]:.1f} seconds[>[")
                out += bracket[0] + [tokens.video] * per_frame + bracket[1]
            next_video += 1
        else:
            out.append(piece)
    return "".join(out) if text else out
