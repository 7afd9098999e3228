import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from plait.data import shapes
from plait.data.shapes import (
    COLOUR_RGB,
    COLOURS,
    DATA_VERSION,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    ShapeObject,
    caption_for,
    generate_shapes,
    load_or_generate_shapes,
    parse_caption,
    render,
    score_captions,
)
from plait.data.types import CaptionSplit


def _digests(split: CaptionSplit) -> list[bytes]:
    return [hashlib.sha1(img.numpy().tobytes()).digest() for img in split.images]


@pytest.fixture(scope="module")
def pair_data():
    # 36 images per eval split: one per unordered pair of cells, so every cell must show up.
    return generate_shapes("shapes-pair", 120, 36, 36, image_size=48, seed=7)


@pytest.fixture(scope="module")
def single_data():
    return generate_shapes("shapes", 120, 18, 18, image_size=48, seed=7)


# ------------------------------------------------------------------------------------------ captions


def test_caption_grammar():
    a = ShapeObject("circle", "red", "small", "top left")
    b = ShapeObject("star", "blue", "large", "center")
    assert caption_for([a]) == "a small red circle at the top left"
    assert caption_for([b]) == "a large blue star in the center"
    assert caption_for([a, b]) == "a small red circle at the top left and a large blue star in the center"


def test_caption_for_rejects_bad_objects():
    with pytest.raises(ValueError, match="objects"):
        caption_for([])
    with pytest.raises(ValueError, match="colour"):
        ShapeObject("circle", "pink", "small", "center")
    with pytest.raises(ValueError, match="position"):
        ShapeObject("circle", "red", "small", "middle")


def test_parse_inverts_caption_for_on_every_object():
    objects = [ShapeObject(s, c, z, p) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS]
    assert len(objects) == 6 * 6 * 2 * 9
    for obj in objects:
        assert parse_caption(caption_for([obj])) == [obj]
    rng = np.random.default_rng(0)
    for _ in range(200):
        pair = [objects[i] for i in rng.choice(len(objects), size=2)]
        assert parse_caption(caption_for(pair)) == pair
        assert caption_for(parse_caption(caption_for(pair))) == caption_for(pair)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a small red circle",
        "a small red circle at the center",  # the center takes "in the"
        "a small red circle in the top left",
        "A small red circle at the top left",
        "a small red circle at the top left.",
        "a small  red circle at the top left",
        "a tiny red circle at the top left",
        "a small red circle at the top left and",
        "a small red circle at the top left and a blue square",
        "a small red circle at the top left a large blue star in the center",
    ],
)
def test_parse_rejects_malformed(text):
    assert parse_caption(text) is None


def test_parse_tolerates_surrounding_whitespace():
    assert parse_caption("  a large green hexagon at the bottom right\n") == [
        ShapeObject("hexagon", "green", "large", "bottom right")
    ]


# ------------------------------------------------------------------------------------------ rendering


def test_render_size_and_mode():
    img = render([ShapeObject("star", "orange", "large", "center")], 32, np.random.default_rng(0))
    assert img.mode == "RGB" and img.size == (32, 32)


@pytest.mark.parametrize("bad", [16, 20, 50, 47])
def test_image_size_must_be_at_least_24_and_divisible_by_8(bad):
    with pytest.raises(ValueError, match="image_size"):
        render([ShapeObject("star", "orange", "large", "center")], bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes("shapes", 2, 0, 0, image_size=bad)


def _shape_mask(pixels: np.ndarray) -> np.ndarray:
    # The background is near-white (unsaturated); every shape colour is strongly saturated.
    p = pixels.astype(np.int32)
    return (p.max(-1) - p.min(-1)) > 90


def test_rendered_pixels_match_the_caption(single_data):
    """Each image shows its caption's colour, in its caption's cell, bigger when large."""
    areas = {(shape, size): [] for shape in SHAPES for size in SIZES}
    for split in single_data.values():
        for pixels, caption in zip(split.images.numpy(), split.captions):
            (obj,) = parse_caption(caption)
            mask = _shape_mask(pixels)
            ys, xs = np.nonzero(mask)
            assert len(xs) > 0, caption
            cell = 48 / 3
            assert (int(ys.mean() // cell), int(xs.mean() // cell)) == divmod(POSITIONS.index(obj.position), 3), caption
            mean = pixels[mask].mean(0)
            nearest = min(COLOURS, key=lambda c: np.sum((np.array(COLOUR_RGB[c]) - mean) ** 2))
            assert nearest == obj.colour, caption
            # The shape stays inside its own cell.
            row, col = divmod(POSITIONS.index(obj.position), 3)
            assert ys.min() >= row * cell - 1 and ys.max() <= (row + 1) * cell
            assert xs.min() >= col * cell - 1 and xs.max() <= (col + 1) * cell
            areas[obj.shape, obj.size].append(mask.sum())
    # Areas scale with the square of the size ratio; pixel rounding and anti-aliased edges (counted in
    # part by the saturation mask) cost up to 45% of that at 48 px (a small star is mostly edge).
    ratio = (SIZE_FRACTION["large"] / SIZE_FRACTION["small"]) ** 2
    for shape in SHAPES:
        assert min(areas[shape, "large"]) > 0.55 * ratio * max(areas[shape, "small"]), shape


def test_colours_are_distinct():
    rgb = np.array(list(COLOUR_RGB.values()), dtype=float)
    dists = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
    assert dists[~np.eye(len(rgb), dtype=bool)].min() > 60


# ------------------------------------------------------------------------------------------ generation


def test_splits_have_the_right_shapes(pair_data):
    assert list(pair_data) == ["train", "val", "test"]
    for split, n in (("train", 120), ("val", 36), ("test", 36)):
        data = pair_data[split]
        assert isinstance(data, CaptionSplit) and len(data) == n
        assert data.images.dtype == torch.uint8 and data.images.shape == (n, 48, 48, 3)


def test_same_seed_same_data_other_seed_other_data():
    a = generate_shapes("shapes", 20, 5, 5, image_size=24, seed=1)
    b = generate_shapes("shapes", 20, 5, 5, image_size=24, seed=1)
    c = generate_shapes("shapes", 20, 5, 5, image_size=24, seed=2)
    for split in a:
        assert torch.equal(a[split].images, b[split].images) and a[split].captions == b[split].captions
        assert not torch.equal(a[split].images, c[split].images)
        assert a[split].captions != c[split].captions


def test_eval_splits_do_not_depend_on_num_train():
    small = generate_shapes("shapes-pair", 5, 6, 6, image_size=24, seed=3)
    big = generate_shapes("shapes-pair", 50, 6, 6, image_size=24, seed=3)
    for split in ("val", "test"):
        assert torch.equal(small[split].images, big[split].images)
        assert small[split].captions == big[split].captions


def test_no_image_repeats_within_or_across_splits(pair_data, single_data):
    for data in (pair_data, single_data):
        digests = [d for split in data.values() for d in _digests(split)]
        assert len(set(digests)) == len(digests)


def test_duplicate_images_are_redrawn(monkeypatch):
    """Force collisions: the first renders all return one same image, which must be used only once."""
    real_render = shapes.render
    calls = {"n": 0}

    def sticky_render(objects, image_size, rng):
        calls["n"] += 1
        if calls["n"] <= 4:
            rng.uniform(size=3)  # still consume randomness, like a real render
            return Image.new("RGB", (image_size, image_size), (250, 250, 250))
        return real_render(objects, image_size, rng)

    monkeypatch.setattr(shapes, "render", sticky_render)
    data = generate_shapes("shapes", 4, 2, 2, image_size=24, seed=0)
    digests = [d for split in data.values() for d in _digests(split)]
    assert len(set(digests)) == 8
    assert calls["n"] == 8 + 3  # three of the four identical images were drawn again


def test_every_caption_parses_and_pairs_are_in_reading_order(pair_data, single_data):
    for split in single_data.values():
        for caption in split.captions:
            objects = parse_caption(caption)
            assert objects is not None and len(objects) == 1
    for split in pair_data.values():
        for caption in split.captions:
            objects = parse_caption(caption)
            assert objects is not None and len(objects) == 2
            first, second = (POSITIONS.index(o.position) for o in objects)
            assert first < second, caption  # distinct cells, row-major order


@pytest.mark.parametrize("name", ["shapes", "shapes-pair"])
def test_every_attribute_value_appears_in_every_split(name, pair_data, single_data):
    data = single_data if name == "shapes" else pair_data
    for split, part in data.items():
        objects = [o for c in part.captions for o in parse_caption(c)]
        for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
            assert {getattr(o, attr) for o in objects} == set(values), (split, attr)


def test_attributes_are_balanced(pair_data):
    objects = [o for c in pair_data["train"].captions for o in parse_caption(c)]
    counts = [sum(o.shape == s for o in objects) for s in SHAPES]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="circles"), r"name: expected one of \['shapes', 'shapes-pair'\]"),
        (dict(num_train=0), "num_train"),
        (dict(num_val=-1), "num_val"),
        (dict(num_test=1.5), "num_test"),
        (dict(seed=-3), "seed"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    args = dict(name="shapes", num_train=2, num_val=1, num_test=1, image_size=24, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        generate_shapes(**args)


def test_empty_eval_splits_are_allowed():
    data = generate_shapes("shapes", 3, 0, 0, image_size=24)
    assert len(data["val"]) == 0 and data["val"].images.shape == (0, 24, 24, 3)


# ------------------------------------------------------------------------------------------ cache


ARGS = dict(name="shapes-pair", num_train=12, num_val=3, num_test=2, image_size=24, seed=5)
CACHE_NAME = f"shapes-pair-v{DATA_VERSION}-s24-seed5-n12-3-2"


def _assert_same(a, b):
    assert list(a) == list(b)
    for split in a:
        assert torch.equal(a[split].images, b[split].images) and a[split].captions == b[split].captions


def _no_generation(*args, **kwargs):
    raise AssertionError("the cache should have been used")


def test_cache_round_trip(tmp_path, monkeypatch):
    first = load_or_generate_shapes(**ARGS, cache_dir=tmp_path)
    _assert_same(first, generate_shapes(**ARGS))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]  # no temp dirs left behind
    assert sorted(p.name for p in (tmp_path / CACHE_NAME).iterdir()) == sorted(
        f"{s}.{ext}" for s in ("train", "val", "test") for ext in ("json", "safetensors")
    )
    monkeypatch.setattr(shapes, "generate_shapes", _no_generation)
    _assert_same(load_or_generate_shapes(**ARGS, cache_dir=tmp_path), first)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: _truncate(d / "train.safetensors"),
        lambda d: _truncate(d / "val.json"),
        lambda d: (d / "test.safetensors").unlink(),
        lambda d: (d / "val.json").write_text(json.dumps(["a small red circle at the top left"])),  # wrong count
    ],
    ids=["truncated-images", "truncated-captions", "missing-file", "wrong-count"],
)
def test_corrupt_cache_is_regenerated(tmp_path, caplog, damage):
    expected = load_or_generate_shapes(**ARGS, cache_dir=tmp_path)
    damage(tmp_path / CACHE_NAME)
    with caplog.at_level(logging.WARNING, logger="plait.data.shapes"):
        again = load_or_generate_shapes(**ARGS, cache_dir=tmp_path)
    assert "corrupt" in caplog.text
    _assert_same(again, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]
    # The repaired cache is complete again and used as is.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="plait.data.shapes"):
        _assert_same(load_or_generate_shapes(**ARGS, cache_dir=tmp_path), expected)
    assert caplog.text == ""


def test_cache_race_uses_the_winners_copy(tmp_path, monkeypatch):
    """Another process installs the cache while we generate: our rename fails and theirs is used."""
    real_generate = shapes.generate_shapes

    def generate_while_another_process_wins(*args, **kwargs):
        winner = tmp_path / CACHE_NAME
        winner.mkdir(parents=True)
        for split, data in real_generate(*args, **kwargs).items():
            shapes._write_split(winner, split, data)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(shapes, "generate_shapes", generate_while_another_process_wins)
    result = load_or_generate_shapes(**ARGS, cache_dir=tmp_path)
    _assert_same(result, real_generate(**ARGS))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]


# ------------------------------------------------------------------------------------------ scoring


def test_score_exact_and_partial_credit():
    refs = [
        "a small red circle at the top left",
        "a large blue star in the center and a small green square at the bottom right",
    ]
    assert score_captions(refs, refs) == {
        "exact_match": 1.0, "shape": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0
    }  # fmt: skip
    preds = [
        "  a small red circle at the top left ",  # exact after stripping
        "a large blue star in the center and a large green triangle at the bottom left",
    ]
    # Three reference objects: shape 2/3, colour 3/3, size 2/3, position 2/3.
    assert score_captions(preds, refs) == pytest.approx(
        {"exact_match": 0.5, "shape": 2 / 3, "colour": 1.0, "size": 2 / 3, "position": 2 / 3}
    )


def test_score_unparseable_and_short_predictions():
    refs = [
        "a small red circle at the top left",
        "a large blue star in the center and a small green square at the bottom right",
    ]
    preds = ["a small red circle at the top left.", "a large blue star in the center"]
    # First prediction is unparseable (0 for its object); second names only the first object.
    assert score_captions(preds, refs) == pytest.approx(
        {"exact_match": 0.0, "shape": 1 / 3, "colour": 1 / 3, "size": 1 / 3, "position": 1 / 3}
    )


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="predictions"):
        score_captions(["a"], [])
    with pytest.raises(ValueError, match="references"):
        score_captions([], [])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        score_captions(["x"], ["not a caption"])
