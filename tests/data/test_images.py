import numpy as np
import pytest
import torch
from PIL import Image

from plait.data.images import CLIP_MEAN, CLIP_STD, load_image, normalize, resize_to_square


def test_normalize_values_layout_and_dtype():
    images = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    images[0, 1, 2] = torch.tensor([255, 0, 128], dtype=torch.uint8)
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 5)
    expected = [
        (1.0 - CLIP_MEAN[0]) / CLIP_STD[0],
        (0.0 - CLIP_MEAN[1]) / CLIP_STD[1],
        (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2],
    ]
    assert out[0, :, 1, 2].tolist() == pytest.approx(expected, abs=1e-6)
    assert out[1, :, 0, 0].tolist() == pytest.approx([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], abs=1e-6)


def test_normalize_single_image_and_custom_stats():
    image = torch.full((3, 3, 3), 255, dtype=torch.uint8)
    out = normalize(image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (3, 3, 3) and torch.allclose(out, torch.ones(3, 3, 3))


@pytest.mark.parametrize(
    "images, kwargs, match",
    [
        (torch.zeros(2, 4, 4, 3), {}, "uint8"),
        (np.zeros((4, 4, 3), dtype=np.uint8), {}, "uint8"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), {}, r"\[\.\.\., H, W, 3\]"),
        (torch.zeros(4, 3, dtype=torch.uint8), {}, r"\[\.\.\., H, W, 3\]"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), {"mean": (0.5, 0.5)}, "mean"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), {"std": (0.5, 0.0, 0.5)}, "std"),
    ],
)
def test_normalize_rejects_bad_input(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        normalize(images, **kwargs)


def test_resize_to_square_is_bicubic_without_crop():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(30, 20, 3), dtype=np.uint8))
    out = resize_to_square(img, 16)
    assert out.dtype == torch.uint8 and out.shape == (16, 16, 3)
    expected = np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(out.numpy(), expected)


def test_resize_keeps_the_whole_image():
    # Left half red, right half blue, on a wide image: both halves survive (a centre crop would lose them).
    pixels = np.zeros((10, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    out = resize_to_square(Image.fromarray(pixels), 8).numpy()
    assert tuple(out[4, 0]) == (255, 0, 0) and tuple(out[4, 7]) == (0, 0, 255)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="size"):
        resize_to_square(Image.new("RGB", (4, 4)), 0)
    with pytest.raises(ValueError, match="img"):
        resize_to_square(np.zeros((4, 4, 3), dtype=np.uint8), 4)


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (5, 4), 200).save(tmp_path / "gray.png")
    img = load_image(tmp_path / "gray.png")
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (200, 200, 200)

    rgba = Image.new("RGBA", (3, 3), (255, 0, 0, 0))  # fully transparent: becomes white, not black
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.save(tmp_path / "alpha.png")
    img = load_image(str(tmp_path / "alpha.png"))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 1)) == (0, 0, 255)


def test_load_image_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="garbage.png"):
        load_image(tmp_path / "garbage.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated.jpg"):
        load_image(tmp_path / "truncated.jpg")
