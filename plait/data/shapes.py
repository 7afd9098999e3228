"""The bundled synthetic captioning data sets: coloured shapes on a 3x3 grid, deterministic by seed.

Two sets:
- `shapes`: one shape per image, "a small red circle at the top left".
- `shapes-pair`: two shapes in distinct grid cells, named in reading order (row-major over the cells),
  "a large blue star at the top middle and a small red circle in the center".

Every attribute is recoverable from the caption and back (`caption_for` / `parse_caption`), so a model's
generations are scored per attribute (`score_captions`) as well as by exact match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from plait.data.types import CaptionSplit

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
# Reading order: row-major over the 3x3 grid; the index into this tuple is row * 3 + col.
POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip
DATASET_NAMES = ("shapes", "shapes-pair")
SPLITS = ("train", "val", "test")

# Saturated colours far apart in hue, so each survives downsampling to a few pixels and stays distinct.
COLOUR_RGB = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 85, 220),
    "yellow": (235, 195, 0),
    "purple": (135, 55, 190),
    "orange": (245, 125, 0),
}
# Fraction of a grid cell that a shape's bounding box spans.
SIZE_FRACTION = {"small": 0.4, "large": 0.8}
MAX_JITTER = 0.12  # of a cell, in x and in y; also capped so a shape never leaves its cell
SUPERSAMPLE = 4  # draw at 4x and box-filter down: cheap, exact anti-aliasing
BACKGROUND = (255, 255, 255)
# Bump when rendering changes, so caches written by an older plait are not reused.
DATA_VERSION = 2
MIN_IMAGE_SIZE = 24


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, valid in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
            value = getattr(self, field)
            if value not in valid:
                raise ValueError(f"{field}: expected one of {list(valid)}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _phrase(obj: ShapeObject) -> str:
    where = "in the center" if obj.position == "center" else f"at the {obj.position}"
    return f"a {obj.size} {obj.colour} {obj.shape} {where}"


def caption_for(objects: Sequence[ShapeObject]) -> str:
    """The caption naming `objects` in the given order, joined by " and "."""
    if len(objects) == 0:
        raise ValueError("objects: expected at least one ShapeObject, got an empty sequence")
    for i, obj in enumerate(objects):
        if not isinstance(obj, ShapeObject):
            raise ValueError(f"objects[{i}]: expected a ShapeObject, got {type(obj).__name__}")
    return " and ".join(_phrase(obj) for obj in objects)


def _alternatives(values: Sequence[str]) -> str:
    # Longest first so no alternative is cut short by a prefix of another.
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


_NON_CENTER = [p for p in POSITIONS if p != "center"]
_PHRASE = (
    rf"a (?P<size{{i}}>{_alternatives(SIZES)}) (?P<colour{{i}}>{_alternatives(COLOURS)}) "
    rf"(?P<shape{{i}}>{_alternatives(SHAPES)}) "
    rf"(?:at the (?P<position{{i}}>{_alternatives(_NON_CENTER)})|(?P<center{{i}}>in the center))"
)
_PHRASE_RE = re.compile(_PHRASE.format(i=""))


def parse_caption(text: str) -> list[ShapeObject] | None:
    """The objects a caption names, in order; None when `text` is not a well-formed caption.

    The exact inverse of `caption_for` up to surrounding whitespace: single spaces, lowercase, no
    punctuation. A model's generation is scored through this, so anything looser would give credit
    for captions the grammar does not produce.
    """
    if not isinstance(text, str):
        return None
    parts = text.strip().split(" and ")
    objects = []
    for part in parts:
        m = _PHRASE_RE.fullmatch(part)
        if m is None:
            return None
        position = "center" if m.group("center") else m.group("position")
        objects.append(ShapeObject(m.group("shape"), m.group("colour"), m.group("size"), position))
    return objects


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _regular_polygon(n: int, start_deg: float) -> list[tuple[float, float]]:
    return [
        (math.cos(math.radians(start_deg + 360 * k / n)), math.sin(math.radians(start_deg + 360 * k / n)))
        for k in range(n)
    ]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = math.radians(-90 + 180 * k / points)  # first point straight up
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _fit_unit_box(points: list[tuple[float, float]], aspect: tuple[float, float] = (1.0, 1.0)):
    """Scale and shift `points` so their bounding box is centred at 0 with width/height = aspect (max 1).

    Centring by bounding box (not centroid) keeps every shape inside its cell whatever its outline.
    """
    xs, ys = zip(*points)
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return tuple(((x - cx) / w * aspect[0], (y - cy) / h * aspect[1]) for x, y in points)


# Outlines in a unit box centred at 0 (y down, as in image coordinates). Squares are drawn a little
# smaller than their box and diamonds narrower, so their areas look like the circle's and a diamond is
# not just a square turned on its corner.
_OUTLINES = {
    "square": _fit_unit_box([(-1, -1), (1, -1), (1, 1), (-1, 1)], (0.86, 0.86)),
    "triangle": _fit_unit_box(_regular_polygon(3, -90)),
    "diamond": _fit_unit_box([(0, -1), (1, 0), (0, 1), (-1, 0)], (0.78, 1.0)),
    "star": _fit_unit_box(_star()),
    "hexagon": _fit_unit_box(_regular_polygon(6, 0), (1.0, 0.76)),  # flat top and bottom, wider than tall
}


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"image_size: expected an int, got {type(image_size).__name__}")
    if image_size < MIN_IMAGE_SIZE or image_size % 8 != 0:
        raise ValueError(
            f"image_size: expected an int >= {MIN_IMAGE_SIZE} and divisible by 8, got {image_size}"
        )


def render(objects: Sequence[ShapeObject], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `objects` on a near-white background, each centred in its grid cell with a little jitter.

    Draws at `SUPERSAMPLE`x and box-filters down to `image_size`, so edges are anti-aliased. All
    randomness (jitter) comes from `rng`.
    """
    _check_image_size(image_size)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    big = image_size * SUPERSAMPLE
    cell = big / 3
    # One plain background for every image: a per-image tint is a nuisance signal spread over every
    # patch, and it swamps the few patches a small shape covers (a tiny model then learns far slower).
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        row, col = divmod(POSITIONS.index(obj.position), 3)
        extent = SIZE_FRACTION[obj.size] * cell
        jitter = min(MAX_JITTER * cell, (cell - extent) / 2)  # never out of the cell, so never overlapping
        dx, dy = rng.uniform(-jitter, jitter, size=2)
        cx, cy = (col + 0.5) * cell + dx, (row + 0.5) * cell + dy
        fill = COLOUR_RGB[obj.colour]
        if obj.shape == "circle":
            r = extent / 2
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx + x * extent, cy + y * extent) for x, y in _OUTLINES[obj.shape]], fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _balanced(values: Sequence, n: int, rng: np.random.Generator) -> list:
    """`n` draws from `values` in which every value appears floor(n/k) or ceil(n/k) times, shuffled.

    Uniform per draw like independent sampling, but a split of at least k items is guaranteed to hold
    every value, which plain sampling only makes likely.
    """
    out = [values[i % len(values)] for i in range(n)]
    order = rng.permutation(n)
    return [out[j] for j in order]


# Every unordered pair of distinct cells, each in reading order.
_CELL_PAIRS = [(a, b) for a in range(len(POSITIONS)) for b in range(a + 1, len(POSITIONS))]


def _sample_layouts(name: str, n: int, rng: np.random.Generator) -> list[list[ShapeObject]]:
    per_image = 1 if name == "shapes" else 2
    if per_image == 1:
        cells = [[c] for c in _balanced(range(len(POSITIONS)), n, rng)]
    else:
        cells = [list(p) for p in _balanced(_CELL_PAIRS, n, rng)]
    n_obj = n * per_image
    shapes, colours, sizes = (_balanced(v, n_obj, rng) for v in (SHAPES, COLOURS, SIZES))
    layouts = []
    for i in range(n):
        layouts.append(
            [
                ShapeObject(shapes[k], colours[k], sizes[k], POSITIONS[cell])
                for k, cell in zip(range(i * per_image, (i + 1) * per_image), cells[i])
            ]
        )
    return layouts


def _generate_split(name: str, n: int, image_size: int, rng: np.random.Generator, seen: set[bytes]) -> CaptionSplit:
    layouts = _sample_layouts(name, n, rng)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i, objects in enumerate(layouts):
        for _attempt in range(1000):
            pixels = np.asarray(render(objects, image_size, rng))
            digest = hashlib.blake2b(pixels.tobytes(), digest_size=16).digest()
            if digest not in seen:  # redraw (new jitter) any image produced before, in any split
                break
        else:  # only reachable if the image space were tiny; better to fail than to leak across splits
            raise RuntimeError(f"could not draw a new distinct image for {caption_for(objects)!r}")
        seen.add(digest)
        images[i] = pixels
    return CaptionSplit(torch.from_numpy(images), [caption_for(objects) for objects in layouts])


def _check_counts(num_train: int, num_val: int, num_test: int) -> None:
    for arg, value, minimum in (("num_train", num_train, 1), ("num_val", num_val, 0), ("num_test", num_test, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{arg}: expected an int >= {minimum}, got {value!r}")


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(f"name: expected one of {list(DATASET_NAMES)}, got {name!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")


def generate_shapes(
    name: str, num_train: int, num_val: int, num_test: int, image_size: int = 48, seed: int = 0
) -> dict[str, CaptionSplit]:
    """Generate the `train`, `val` and `test` splits of the bundled set `name`.

    Each split has its own RNG stream derived from `seed`, and splits are drawn test, val, train, so the
    evaluation splits do not change when only `num_train` does. No image (by its bytes) occurs twice,
    within a split or across splits.
    """
    _check_name(name)
    _check_counts(num_train, num_val, num_test)
    _check_image_size(image_size)
    _check_seed(seed)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    seen: set[bytes] = set()
    splits = {}
    for split in ("test", "val", "train"):
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        splits[split] = _generate_split(name, counts[split], image_size, rng, seen)
    return {split: splits[split] for split in SPLITS}


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def _write_split(directory: Path, split: str, data: CaptionSplit) -> None:
    from safetensors.torch import save_file

    save_file({"images": data.images.contiguous()}, str(directory / f"{split}.safetensors"))
    (directory / f"{split}.json").write_text(json.dumps(data.captions))


def _read_cache(directory: Path, counts: dict[str, int], image_size: int) -> dict[str, CaptionSplit]:
    """Load a cache directory, raising ValueError for anything missing, truncated or of the wrong size."""
    from safetensors.torch import load_file

    splits = {}
    for split in SPLITS:
        try:
            images = load_file(str(directory / f"{split}.safetensors"))["images"]
            captions = json.loads((directory / f"{split}.json").read_text())
        except Exception as e:  # missing file, truncated header/data, bad JSON: all mean "regenerate"
            raise ValueError(f"{split}: unreadable cache file ({type(e).__name__}: {e})") from e
        expected = [counts[split], image_size, image_size, 3]
        if list(images.shape) != expected or images.dtype != torch.uint8:
            raise ValueError(f"{split}: images {list(images.shape)} {images.dtype}, expected {expected} uint8")
        if not isinstance(captions, list) or len(captions) != counts[split]:
            raise ValueError(f"{split}: expected a list of {counts[split]} captions")
        splits[split] = CaptionSplit(images, captions)
    return splits


def load_or_generate_shapes(
    name: str,
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: int,
    seed: int,
    cache_dir: str | Path,
) -> dict[str, CaptionSplit]:
    """`generate_shapes`, cached under `cache_dir/{name}-v{DATA_VERSION}-s{image_size}-seed{seed}-n{train}-{val}-{test}/`.

    The cache is written into a temporary directory and renamed into place, so a reader never sees a
    half-written cache; when two processes race, the first rename wins and the other uses its result.
    A cache that fails to load (missing or truncated file, wrong count) is regenerated, with a warning.
    """
    _check_name(name)
    _check_counts(num_train, num_val, num_test)
    _check_image_size(image_size)
    _check_seed(seed)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-v{DATA_VERSION}-s{image_size}-seed{seed}-n{num_train}-{num_val}-{num_test}"

    if final.exists():
        try:
            return _read_cache(final, counts, image_size)
        except ValueError as e:
            logger.warning("regenerating corrupt shapes cache %s: %s", final, e)

    splits = generate_shapes(name, num_train, num_val, num_test, image_size, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        for split, data in splits.items():
            _write_split(tmp, split, data)
        if final.exists():
            # Still there, so it is the corrupt one read above (or one a racing process just wrote and
            # that is fine): check again, and move a bad one aside before taking its place.
            try:
                return _read_cache(final, counts, image_size)
            except ValueError:
                trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.corrupt-", dir=cache_dir))
                try:
                    os.replace(final, trash / "old")
                except OSError:
                    pass  # another process moved it first
                shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy into place between our check and our rename.
            try:
                return _read_cache(final, counts, image_size)
            except ValueError:
                logger.warning("could not install shapes cache %s; using the freshly generated data", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return splits


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def score_captions(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact-match rate and per-attribute accuracies of predicted captions against references.

    Attribute accuracy is over reference objects: object i of a reference is credited for an attribute
    when the prediction parses and its object i has the same value. An unparseable prediction earns
    nothing for any of its reference's objects.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions: expected one per reference ({len(references)}), got {len(predictions)}"
        )
    if len(references) == 0:
        raise ValueError("references: expected at least one caption, got none")
    attributes = ("shape", "colour", "size", "position")
    correct = dict.fromkeys(attributes, 0)
    exact = 0
    n_objects = 0
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        ref_objects = parse_caption(ref)
        if ref_objects is None:
            raise ValueError(f"references[{i}]: expected a well-formed shapes caption, got {ref!r}")
        exact += isinstance(pred, str) and pred.strip() == ref.strip()
        n_objects += len(ref_objects)
        pred_objects = parse_caption(pred) or []
        for j, ref_obj in enumerate(ref_objects):
            if j < len(pred_objects):
                for attr in attributes:
                    correct[attr] += getattr(pred_objects[j], attr) == getattr(ref_obj, attr)
    return {"exact_match": exact / len(references), **{a: correct[a] / n_objects for a in attributes}}
