"""A user's own image-captioning data from local files, read through `datasets` (local builders only).

Three layouts are accepted:
- one `.jsonl` / `.json` / `.parquet` file whose rows hold an image path (relative to the file's
  directory, or absolute) and a caption;
- a directory with `train.{jsonl,json,parquet}` and optional `val` (or `validation`) and `test` files;
- an image folder in the `datasets` imagefolder convention: images beside a `metadata.jsonl` or
  `metadata.csv` that maps `file_name` to a caption (optionally under train/ validation/ test/ folders).
Splits the data does not provide (val, test) are carved from train, deterministically by `seed`.
Everything is decoded and resized once, into in-memory `CaptionSplit`s of uint8 images.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from plait.data.images import load_image, resize_to_square, to_rgb
from plait.data.types import CaptionSplit

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# File stem -> split; `validation` is the Hugging Face name, `val` plait's.
SPLIT_STEMS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
# Split names the imagefolder builder derives from folder names -> plait's split.
IMAGEFOLDER_SPLITS = {"train": "train", "validation": "val", "val": "val", "valid": "val", "dev": "val", "test": "test"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    # The "Generating train split" bars are noise for files this small; restore the user's setting after.
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_file(file: Path, cache_dir: str):
    import datasets

    # datasets fails on empty files with unhelpful errors (a bare StopIteration for JSON, an Arrow batch-size
    # error for parquet), so catch those first.
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            empty = pq.ParquetFile(file).metadata.num_rows == 0
        except Exception as e:
            raise ValueError(f"path: cannot read {str(file)!r} as parquet ({type(e).__name__}: {e})") from e
    else:
        empty = not file.read_bytes().strip()
    if empty:
        raise ValueError(f"path: {str(file)!r} has no rows; expected rows with an image and a caption")
    try:
        return datasets.load_dataset(
            FILE_FORMATS[file.suffix], data_files=str(file), split="train", cache_dir=cache_dir
        )
    except Exception as e:
        raise ValueError(f"path: cannot read {str(file)!r} as {file.suffix[1:]} ({type(e).__name__}: {e})") from e


def _split_files(directory: Path) -> dict[str, Path]:
    """split -> file for a directory of split files; empty when there are none."""
    found: dict[str, Path] = {}
    for stem, split in SPLIT_STEMS.items():
        for suffix in FILE_FORMATS:
            file = directory / f"{stem}{suffix}"
            if file.is_file():
                if split in found:
                    raise ValueError(
                        f"path: two files for split {split!r} in {str(directory)!r}: "
                        f"{found[split].name} and {file.name}; keep one"
                    )
                found[split] = file
    return found


def _has_metadata(directory: Path) -> bool:
    # At the top, or in split folders (train/metadata.jsonl, ...), as the imagefolder builder allows.
    return any(file.is_file() for name in METADATA_FILES for file in (directory / name, *directory.glob(f"*/{name}")))


def _load_tables(path: Path, cache_dir: str) -> dict[str, tuple[object, Path, str]]:
    """split -> (datasets.Dataset, directory that relative image paths start from, source name for errors)."""
    import datasets

    if path.is_file():
        if path.suffix not in FILE_FORMATS:
            raise ValueError(
                f"path: unknown format {path.suffix!r} for {str(path)!r}; expected one of {list(FILE_FORMATS)}"
            )
        return {"train": (_load_file(path, cache_dir), path.parent, str(path))}

    files = _split_files(path)
    if files:
        if "train" not in files:
            raise ValueError(f"path: {str(path)!r} has {sorted(f.name for f in files.values())} but no train file")
        return {split: (_load_file(file, cache_dir), file.parent, str(file)) for split, file in files.items()}

    if _has_metadata(path):
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        except Exception as e:
            raise ValueError(f"path: cannot read image folder {str(path)!r} ({type(e).__name__}: {e})") from e
        unknown = [name for name in loaded if name not in IMAGEFOLDER_SPLITS]
        if unknown:
            raise ValueError(
                f"path: image folder {str(path)!r} has splits {unknown}; expected {list(IMAGEFOLDER_SPLITS)}"
            )
        tables = {}
        for name, ds in loaded.items():
            split = IMAGEFOLDER_SPLITS[name]
            if split in tables:
                raise ValueError(f"path: image folder {str(path)!r} has two folders for split {split!r}")
            tables[split] = (ds, path, f"{path} ({name} split)")
        if "train" not in tables:
            raise ValueError(f"path: image folder {str(path)!r} has splits {list(loaded)} but no train split")
        return tables

    raise ValueError(
        f"path: unknown format for directory {str(path)!r}; expected train.jsonl/train.json/train.parquet "
        f"(with optional val/validation/test files) or an image folder with {' or '.join(METADATA_FILES)}"
    )


def _decode(value, base_dir: Path, where: str) -> Image.Image:
    """One image cell: a path string, a datasets image dict ({bytes, path}) or a PIL image."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        try:
            with Image.open(io.BytesIO(value["bytes"])) as img:
                img.load()
                return to_rgb(img)
        except OSError as e:
            raise ValueError(f"{where}: cannot decode the image bytes ({type(e).__name__}: {e})") from e
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected an image path, got {value!r}")
    file = Path(value) if Path(value).is_absolute() else base_dir / value
    try:
        return load_image(file)
    except ValueError as e:
        raise ValueError(f"{where}: missing or unreadable image file {str(file)!r} ({e})") from e


def _to_split(ds, base_dir: Path, source: str, image_size: int, image_column: str, caption_column: str) -> CaptionSplit:
    import datasets

    for arg, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in ds.column_names:
            raise ValueError(f"{arg}: no column {column!r} in {source}; its columns are {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"path: {source} has no rows; expected images with captions")
    if isinstance(ds.features[image_column], datasets.Image):
        # Decode ourselves, so a bad file is reported with its name and row instead of deep inside datasets.
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    images = torch.empty((len(ds), image_size, image_size, 3), dtype=torch.uint8)
    captions = []
    for i, row in enumerate(ds.select_columns([image_column, caption_column])):
        where = f"{source} row {i}"
        caption = row[caption_column]
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"caption_column: {where} has {caption!r}; expected a non-empty string")
        images[i] = resize_to_square(_decode(row[image_column], base_dir, where), image_size)
        captions.append(caption.strip())
    return CaptionSplit(images, captions)


def _take(split: CaptionSplit, index: np.ndarray) -> CaptionSplit:
    index = np.sort(index)  # keep file order inside each split
    return CaptionSplit(split.images[torch.from_numpy(index)], [split.captions[i] for i in index])


def _carve(
    splits: dict[str, CaptionSplit], fractions: dict[str, float], seed: int, source: str
) -> dict[str, CaptionSplit]:
    """Fill missing val/test splits with a seeded random share of train: round(fraction * rows), at least
    one row when the fraction is above zero (a tiny data set still gets a val split to watch)."""
    missing = [split for split in ("val", "test") if split not in splits]
    if not missing:
        return splits
    train = splits["train"]
    n = len(train)
    order = np.random.default_rng(seed).permutation(n)
    start = 0
    carved = {}
    for split in missing:
        count = max(1, round(fractions[split] * n)) if fractions[split] > 0 else 0
        carved[split] = _take(train, order[start : start + count])
        start += count
    if start >= n:
        raise ValueError(
            f"val_fraction/test_fraction: carving {start} of the {n} train rows of {source} for "
            f"{missing} leaves an empty train split; add rows or lower the fractions"
        )
    return {"train": _take(train, order[start:]), **{s: splits.get(s, carved.get(s)) for s in ("val", "test")}}


def load_local_captions(
    path: str | Path,
    image_size: int,
    image_column: str = "image",
    caption_column: str = "caption",
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, CaptionSplit]:
    """Load local captioning data (see the module docstring for layouts) into train/val/test splits.

    Images are decoded, converted to RGB and resized (bicubic, no crop) to `image_size` squares.
    Only `datasets`' local builders are used, with a throw-away cache, so nothing is fetched or left behind.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected an int >= 1, got {image_size!r}")
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{arg}: expected a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction: expected < 1, got {val_fraction + test_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"path: {str(path)!r} does not exist")

    with tempfile.TemporaryDirectory(prefix="plait-datasets-") as cache_dir, _quiet_datasets():
        tables = _load_tables(path, cache_dir)
        splits = {
            split: _to_split(ds, base_dir, source, image_size, image_column, caption_column)
            for split, (ds, base_dir, source) in tables.items()
        }
    splits = _carve(splits, {"val": val_fraction, "test": test_fraction}, seed, str(path))
    return {split: splits[split] for split in ("train", "val", "test")}
