"""plait's MiniMax-M3-VL preprocessing against golden fixtures written by transformers 5.23.0's own processors
(tests/data/fixtures/make_m3_fixtures.py, run once in a throwaway venv with torchvision), then into the model."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

import plait
from plait.data.m3_processing import (
    IMAGE_DEFAULTS,
    M3_TOKENS,
    VIDEO_DEFAULTS,
    PlaceholderTokens,
    VisionSettings,
    expand_placeholders,
    load_settings,
    preprocess_images,
    preprocess_videos,
    smart_resize,
)
from plait.models.minimax_m3_vision import patchify_images
from plait.models.presets import preset_dict
from plait.models.vlm import vlm_spec

FIXTURES = Path(__file__).parent / "fixtures" / "m3_processing"
CASES = json.loads((FIXTURES / "cases.json").read_text())
ARRAYS = dict(np.load(FIXTURES / "arrays.npz"))


def settings_of(case: dict, video: bool) -> VisionSettings:
    """The settings a fixture case gave transformers' processor, as plait's VisionSettings."""
    s = dict(case["settings"])
    if "vision_segment_max_frames" in s:
        s["segment_max_frames"] = s.pop("vision_segment_max_frames")
    return replace(VIDEO_DEFAULTS if video else IMAGE_DEFAULTS, **s)


def pil_images(names):
    return [Image.fromarray(ARRAYS[f"image_{n}"]) for n in names]


def pil_clips(names):
    return [[Image.fromarray(frame) for frame in ARRAYS[f"clip_{n}"]] for n in names]


# ---------------------------------------------------------------------------------------------
# Bit for bit against transformers' processors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES["images"], ids=lambda c: c["name"])
def test_images_match_transformers_exactly(case):
    out = preprocess_images(pil_images(case["inputs"]), settings_of(case, video=False))
    expected = torch.from_numpy(ARRAYS[f"{case['name']}_pixel_values"])
    assert out["pixel_values"].dtype == torch.float32 and out["pixel_values"].shape == expected.shape
    # Exact: the same uint8 bicubic kernel and the same float32 normalisation as transformers.
    assert torch.equal(out["pixel_values"], expected), (out["pixel_values"] - expected).abs().max()
    assert out["image_grid_thw"].dtype == torch.long
    assert out["image_grid_thw"].tolist() == ARRAYS[f"{case['name']}_image_grid_thw"].tolist()


def test_rgb_arrays_and_tensors_give_the_same_patches_as_pil_images():
    case = next(c for c in CASES["images"] if c["name"] == "small_wide")
    expected = torch.from_numpy(ARRAYS["small_wide_pixel_values"])
    array = ARRAYS["image_wide"]
    for image in (array, torch.from_numpy(array)):
        assert torch.equal(preprocess_images([image], settings_of(case, video=False))["pixel_values"], expected)


@pytest.mark.parametrize("case", CASES["videos"], ids=lambda c: c["name"])
def test_videos_match_transformers_exactly(case):
    out = preprocess_videos(pil_clips(case["inputs"]), settings_of(case, video=True))
    expected = torch.from_numpy(ARRAYS[f"{case['name']}_pixel_values_videos"])
    assert out["pixel_values_videos"].shape == expected.shape
    assert torch.equal(out["pixel_values_videos"], expected), (out["pixel_values_videos"] - expected).abs().max()
    assert out["video_grid_thw"].tolist() == ARRAYS[f"{case['name']}_video_grid_thw"].tolist()
    assert out["num_chunks_per_video"] == case["num_chunks_per_video"]
    # A clip as one uint8 [F, H, W, 3] array is the same clip.
    as_arrays = preprocess_videos([ARRAYS[f"clip_{n}"] for n in case["inputs"]], settings_of(case, video=True))
    assert torch.equal(as_arrays["pixel_values_videos"], expected)


def test_an_odd_clip_pads_by_repeating_its_last_frame():
    case = next(c for c in CASES["videos"] if c["name"] == "small_odd")
    frames = ARRAYS["clip_odd"]  # 5 frames, temporal patch 2
    padded = preprocess_videos([np.concatenate([frames, frames[-1:]])], settings_of(case, video=True))
    odd = preprocess_videos([frames], settings_of(case, video=True))
    assert odd["video_grid_thw"].tolist() == [[2, 4, 8], [1, 4, 8]]  # 3 temporal patches in segments of 2
    assert torch.equal(odd["pixel_values_videos"], padded["pixel_values_videos"])


def _text_inputs():
    t = CASES["text"]
    images = preprocess_images(pil_images(t["images"]), settings_of(CASES["images"][0], video=False))
    videos = preprocess_videos(pil_clips(t["clips"]), settings_of(CASES["videos"][0], video=True))
    return t, images, videos


def test_prompts_expand_as_the_transformers_processor_expands_them():
    t, images, videos = _text_inputs()
    assert torch.equal(images["pixel_values"], torch.from_numpy(ARRAYS["text_pixel_values"]))
    assert torch.equal(videos["pixel_values_videos"], torch.from_numpy(ARRAYS["text_pixel_values_videos"]))
    assert images["image_grid_thw"].tolist() == t["image_grid_thw"]
    assert videos["video_grid_thw"].tolist() == t["video_grid_thw"]
    # Prompt 0 has images 0 and 1; prompt 1 has video 0, image 2, video 1 (video 0 with timestamps).
    grid_v, chunks = videos["video_grid_thw"], videos["num_chunks_per_video"]
    per_prompt = [
        dict(image_grid_thw=images["image_grid_thw"][:2]),
        dict(image_grid_thw=images["image_grid_thw"][2:], video_grid_thw=grid_v, num_chunks_per_video=chunks,
             video_seconds=t["video_seconds"]),
    ]
    tokenizer = Tokenizer.from_file(str(FIXTURES / "processor" / "tokenizer.json"))
    for prompt, kwargs, expanded, ids in zip(t["prompts"], per_prompt, t["expanded"], t["input_ids"]):
        text = expand_placeholders(prompt, merge_size=2, temporal_patch_size=2, **kwargs)
        assert text == expanded
        assert tokenizer.encode(text, add_special_tokens=False).ids == ids


def test_token_id_prompts_expand_to_the_processor_ids():
    t, images, _ = _text_inputs()
    tokenizer = Tokenizer.from_file(str(FIXTURES / "processor" / "tokenizer.json"))
    tokens = PlaceholderTokens(*(tokenizer.token_to_id(getattr(M3_TOKENS, k)) for k in ("image", "video", "start", "end")))
    ids = tokenizer.encode(t["prompts"][0], add_special_tokens=False).ids  # one id per marker
    expanded = expand_placeholders(ids, image_grid_thw=images["image_grid_thw"][:2], tokens=tokens)
    assert expanded == t["input_ids"][0]
    # plait's own tokenizers have no start / end tokens: a bare run of placeholders.
    bare = expand_placeholders([1, 4, 9], image_grid_thw=[[1, 6, 10]], tokens=PlaceholderTokens(4, 5))
    assert bare == [1] + [4] * 15 + [9]


def test_settings_are_read_from_what_transformers_saved():
    image, video = load_settings(model_dir=FIXTURES / "processor")
    assert image == settings_of(CASES["images"][0], video=False)
    assert video == settings_of(CASES["videos"][0], video=True)


# ---------------------------------------------------------------------------------------------
# The rules on their own, and bad input
# ---------------------------------------------------------------------------------------------

def test_smart_resize_matches_transformers_over_hundreds_of_sizes():
    table = CASES["smart_resize"]
    branches = set()
    for h, w, factor, lo, hi, expected in table:
        assert list(smart_resize(h, w, factor, lo, hi)) == expected, (h, w, factor, lo, hi)
        rounded = round(h / factor) * round(w / factor) * factor**2
        branches.add("down" if rounded > hi else "up" if rounded < lo else "round")
    assert len(table) > 250 and branches == {"down", "up", "round"}


@pytest.mark.parametrize("size, expected", [
    ((23, 37), (24, 40)),   # nearest multiples of 8
    ((20, 44), (16, 48)),   # 2.5 and 5.5 factors: round() halves to even
    ((9, 12), (16, 24)),    # below min_pixels: scaled up, ceil
    ((70, 50), (32, 24)),   # above max_pixels: scaled down, floor
    ((2, 300), (8, 200)),   # a thin strip: scaled up to one factor high, which overshoots max_pixels
])
def test_smart_resize(size, expected):
    h, w = smart_resize(*size, factor=8, min_pixels=256, max_pixels=1024)
    assert (h, w) == expected and h % 8 == 0 and w % 8 == 0


def test_load_settings_falls_back_to_the_model_config_then_transformers_defaults(tmp_path):
    cfg = preset_dict("tiny-minimax-m3", {})
    image, video = load_settings(cfg)
    assert (image.patch_size, image.temporal_patch_size, image.merge_size) == (8, 1, 2)
    assert (image.min_pixels, image.max_pixels) == (IMAGE_DEFAULTS.min_pixels, IMAGE_DEFAULTS.max_pixels)
    assert (video.max_pixels, video.segment_max_frames) == (VIDEO_DEFAULTS.max_pixels, 4)
    # The released checkpoints' preprocessor_config.json: size [672, 672] is ignored, min/max_pixels count.
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": [672, 672], "min_pixels": 1024, "max_pixels": 4096, "patch_size": 8}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"vision_segment_max_frames": None}))
    image, video = load_settings(model_dir=tmp_path)
    assert (image.patch_size, image.min_pixels, image.max_pixels) == (8, 1024, 4096)
    assert video.segment_max_frames is None and video.max_pixels == VIDEO_DEFAULTS.max_pixels
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    with pytest.raises(ValueError, match=r"patch_size 14 disagrees with the model's vision_config.patch_size 8"):
        load_settings(model_dir=tmp_path)


SMALL = VisionSettings(patch_size=4, min_pixels=256, max_pixels=1024)


@pytest.mark.parametrize("images, match", [
    ([np.zeros((16, 16, 3), dtype=np.float32)], r"images\[0\]: expected dtype uint8"),
    ([np.zeros((3, 16, 16), dtype=np.uint8)], r"images\[0\]: expected shape \[H, W, 3\].*got \[3, 16, 16\]"),
    ([np.zeros((0, 16, 3), dtype=np.uint8)], r"images\[0\]: expected an image of at least 1 x 1"),
    ([Image.new("RGB", (16, 16)), "cat.png"], r"images\[1\]: expected a PIL image or a uint8.*got str"),
    ([Image.new("RGB", (401, 2))], r"images\[0\]: height, width: expected an aspect ratio of at most 200"),
    ([], "images: expected at least one image"),
    (Image.new("RGB", (16, 16)), "images: expected a list of images, got Image"),
])
def test_bad_images_are_clear_errors(images, match):
    with pytest.raises(ValueError, match=match):
        preprocess_images(images, SMALL)


def test_bad_videos_are_clear_errors():
    frames = [Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16)), Image.new("RGB", (24, 16))]
    with pytest.raises(ValueError, match=r"videos\[0\]: expected frames of one size, got frame 0 of 16 x 16 and "
                                         r"frame 2 of 16 x 24"):
        preprocess_videos([frames], SMALL)
    with pytest.raises(ValueError, match=r"videos\[0\]: expected at least one frame"):
        preprocess_videos([[]], SMALL)
    with pytest.raises(ValueError, match="videos: expected a list of videos"):
        preprocess_videos(np.zeros((2, 16, 16, 3), dtype=np.uint8), SMALL)
    with pytest.raises(ValueError, match=r"videos\[0\] frame 1: expected dtype uint8"):
        preprocess_videos([[np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.float64)]], SMALL)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_pixels": 100}, r"max_pixels: expected at least \(patch_size x merge_size\)\^2 = 784"),
    ({"min_pixels": 10_000, "max_pixels": 5000}, "min_pixels: expected <= max_pixels 5000, got 10000"),
    ({"patch_size": 0}, "patch_size: expected an int >= 1, got 0"),
    ({"image_std": (0.5, 0.0, 0.5)}, "image_std: expected positive values"),
    ({"image_mean": (0.5, 0.5)}, "image_mean: expected 3 values"),
    ({"segment_max_frames": 0}, "segment_max_frames: expected an int >= 1 or None"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionSettings(**kwargs)


def test_placeholder_mismatches_are_clear_errors():
    grid = [[1, 4, 6]]
    with pytest.raises(ValueError, match="prompt: 2 image and 0 video markers, but 1 images and 0 videos"):
        expand_placeholders(f"{M3_TOKENS.image} {M3_TOKENS.image}", image_grid_thw=grid)
    with pytest.raises(ValueError, match="tokens: a token-id prompt needs int tokens"):
        expand_placeholders([1, 2], image_grid_thw=grid)
    with pytest.raises(ValueError, match="image_grid_thw: expected rows of .* multiples of merge_size 2"):
        expand_placeholders(M3_TOKENS.image, image_grid_thw=[[1, 3, 6]])
    with pytest.raises(ValueError, match="num_chunks_per_video: expected positive counts adding up to the 2 rows"):
        expand_placeholders(M3_TOKENS.video, video_grid_thw=[[2, 4, 4], [1, 4, 4]], num_chunks_per_video=[1])
    with pytest.raises(ValueError, match="video_seconds: timestamps are text"):
        expand_placeholders([5], video_grid_thw=[[1, 4, 4]], video_seconds=[[0.0]], tokens=PlaceholderTokens(4, 5))


# ---------------------------------------------------------------------------------------------
# Into the native model
# ---------------------------------------------------------------------------------------------

IMAGE, VIDEO = 4, 5


@pytest.fixture(scope="module")
def native_vl(tmp_path_factory):
    """A tiny random native MiniMax-M3-VL with temporal patches of 2 frames, its preprocessing settings, and the
    same weights in transformers' model (the reference)."""
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3SparseForConditionalGeneration

    cfg = preset_dict("tiny-minimax-m3", {"vision_config": {"temporal_patch_size": 2}})
    cfg = vlm_spec("minimax_m3_vl").complete_config(
        cfg, 40, {"pad": 0, "bos": 1, "eos": 2, "image": IMAGE, "video": VIDEO}, 48)
    torch.manual_seed(0)
    model = plait.from_config(cfg).eval()
    path = tmp_path_factory.mktemp("native-m3-vl")
    model.save_pretrained(path)
    reference = MiniMaxM3SparseForConditionalGeneration.from_pretrained(path).eval()
    image, video = load_settings(model.config)
    small = dict(min_pixels=32 * 32, max_pixels=64 * 64)  # 4 to 16 tokens an image: a fast test
    return model, replace(image, **small), replace(video, **small, segment_max_frames=2), reference


def test_a_non_square_image_runs_through_the_native_model(native_vl):
    model, image_settings, _, _ = native_vl
    rgb = np.asarray(Image.fromarray(ARRAYS["image_large"]).resize((61, 37)))  # 37 x 61 pixels
    vision = preprocess_images([Image.fromarray(rgb)], image_settings)
    assert vision["image_grid_thw"].tolist() == [[1, 4, 8]]  # 32 x 64 pixels in patches of 8
    tokens = PlaceholderTokens(IMAGE, VIDEO)
    ids = expand_placeholders([1, IMAGE, 7, 8], image_grid_thw=vision["image_grid_thw"],
                              merge_size=image_settings.merge_size, tokens=tokens)
    assert ids.count(IMAGE) == 8
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **vision).logits
    assert logits.shape == (1, len(ids), 40) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match=r"images: placeholder tokens per sample \[7\] do not match the features "
                                         r"per image \[8\]"):
        model(input_ids=torch.tensor([ids[:-3] + ids[-2:]]), **vision)


def test_images_and_an_odd_clip_run_through_the_native_model(native_vl):
    model, image_settings, video_settings, reference = native_vl
    images = preprocess_images(pil_images(["wide", "halves"]), image_settings)
    videos = preprocess_videos([ARRAYS["clip_large"], ARRAYS["clip_odd"]], video_settings)
    assert videos["num_chunks_per_video"] == [1, 2]  # 3 -> 2 temporal patches; 5 -> 3, in segments of 2 + 1
    ids = expand_placeholders([1, IMAGE, VIDEO, 7, IMAGE, VIDEO, 8], image_grid_thw=images["image_grid_thw"],
                              video_grid_thw=videos["video_grid_thw"],
                              num_chunks_per_video=videos["num_chunks_per_video"],
                              merge_size=2, temporal_patch_size=2, tokens=PlaceholderTokens(IMAGE, VIDEO))
    n_video = sum(t * h * w for t, h, w in videos["video_grid_thw"].tolist()) // 4
    assert ids.count(VIDEO) == n_video
    inputs = dict(input_ids=torch.tensor([ids]), pixel_values=images["pixel_values"],
                  image_grid_thw=images["image_grid_thw"], pixel_values_videos=videos["pixel_values_videos"],
                  video_grid_thw=videos["video_grid_thw"])
    with torch.no_grad():
        out = model(**inputs).logits
        expected = reference(**inputs).logits
    assert out.shape == (1, len(ids), 40)
    # Segments, patch order and placeholder runs mean to the native model what they mean to transformers'.
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    # The clip's frames matter: reversing them changes what the model sees.
    flipped = preprocess_videos([ARRAYS["clip_large"], ARRAYS["clip_odd"][::-1]], video_settings)
    with torch.no_grad():
        other = model(input_ids=torch.tensor([ids]), pixel_values=images["pixel_values"],
                      image_grid_thw=images["image_grid_thw"], pixel_values_videos=flipped["pixel_values_videos"],
                      video_grid_thw=flipped["video_grid_thw"]).logits
    assert not torch.allclose(out, other)


def test_patchify_images_is_the_still_image_case_of_the_video_layout():
    x = torch.randn(2, 3, 16, 24)
    patches, grid = patchify_images(x, 4, 2, 2)
    assert patches.shape == (2 * 4 * 6, 3 * 2 * 4 * 4) and grid.tolist() == [[1, 4, 6]] * 2
    # Both temporal slots of a still image's patch hold the same pixels.
    per_patch = patches.view(-1, 3, 2, 16)
    assert torch.equal(per_patch[:, :, 0], per_patch[:, :, 1])


def test_left_padded_prompts_of_images_at_their_own_sizes_decode_as_if_alone(native_vl):
    """What `plait generate --native-resolution` does: one prompt per image, placeholder runs of different
    lengths, left-padded into one batch; each row decodes as it would alone."""
    from plait.generate import generate, left_pad

    model, image_settings, _, _ = native_vl
    images = [ARRAYS["image_wide"], ARRAYS["image_large"]]
    tokens = PlaceholderTokens(IMAGE, VIDEO)
    vision = preprocess_images(images, image_settings)
    prompts = [torch.tensor(expand_placeholders([1, IMAGE, 7], image_grid_thw=grid[None], tokens=tokens))
               for grid in vision["image_grid_thw"]]
    assert len(prompts[0]) != len(prompts[1])
    ids, mask = left_pad(prompts, pad_id=0)
    together = generate(model, ids, mask, max_new_tokens=6, eos_token_id=2, pad_token_id=0, **vision)
    for row, image in enumerate(images):
        alone = generate(model, prompts[row][None], max_new_tokens=6, eos_token_id=2, pad_token_id=0,
                         **preprocess_images([image], image_settings))
        assert alone.shape[1] > 1 and together[row, :alone.shape[1]].tolist() == alone[0].tolist()
