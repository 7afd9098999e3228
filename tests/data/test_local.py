import csv
import json
import socket

import pandas as pd
import pytest
import torch
from PIL import Image

from plait.data.local import load_local_captions
from plait.data.types import CaptionSplit


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: the loader must only read local files."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def _write_images(directory, n, start=0, prefix="img"):
    """Solid-colour images of assorted sizes and modes; the caption names the colour, so tests can check
    that each image stays with its caption through loading, resizing and carving."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        name = f"{prefix}{i}.png"
        size = (12 + i % 5, 9 + i % 7)
        Image.new("RGB", size, _colour(i)).save(directory / name)
        rows.append({"file": name, "caption": f"colour {' '.join(map(str, _colour(i)))}"})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _check_alignment(split: CaptionSplit, size: int):
    assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (size, size, 3)
    for image, caption in zip(split.images, split.captions):
        rgb = tuple(int(v) for v in caption.split()[1:])
        assert (image == torch.tensor(rgb, dtype=torch.uint8)).all(), caption


def _all_captions(splits):
    return sorted(c for s in splits.values() for c in s.captions)


def test_jsonl_file_with_relative_paths_is_carved(tmp_path):
    rows = _write_images(tmp_path / "pics", 40)
    _write_jsonl(tmp_path / "data.jsonl", [{"image": f"pics/{r['file']}", "caption": r["caption"]} for r in rows])
    splits = load_local_captions(tmp_path / "data.jsonl", image_size=8)
    assert list(splits) == ["train", "val", "test"]
    assert [len(s) for s in splits.values()] == [36, 2, 2]  # 0.05 * 40 each
    assert _all_captions(splits) == sorted(r["caption"] for r in rows)
    for split in splits.values():
        _check_alignment(split, 8)


def test_carving_is_deterministic_by_seed(tmp_path):
    rows = _write_images(tmp_path, 30)
    _write_jsonl(tmp_path / "data.jsonl", [{"image": r["file"], "caption": r["caption"]} for r in rows])
    kwargs = dict(image_size=4, val_fraction=0.2, test_fraction=0.1)
    a = load_local_captions(str(tmp_path / "data.jsonl"), **kwargs, seed=1)
    b = load_local_captions(tmp_path / "data.jsonl", **kwargs, seed=1)
    c = load_local_captions(tmp_path / "data.jsonl", **kwargs, seed=2)
    assert [len(s) for s in a.values()] == [21, 6, 3]
    for split in a:
        assert a[split].captions == b[split].captions and torch.equal(a[split].images, b[split].images)
    assert a["val"].captions != c["val"].captions
    assert not set(a["val"].captions) & set(a["test"].captions)
    # A zero fraction is an explicitly empty split.
    none = load_local_captions(tmp_path / "data.jsonl", image_size=4, val_fraction=0.0, test_fraction=0.0)
    assert [len(s) for s in none.values()] == [30, 0, 0]


def test_json_array_and_parquet_with_absolute_paths(tmp_path):
    rows = _write_images(tmp_path / "pics", 6)
    records = [{"path": str(tmp_path / "pics" / r["file"]), "text": r["caption"]} for r in rows]
    (tmp_path / "data.json").write_text(json.dumps(records))
    pd.DataFrame(records).to_parquet(tmp_path / "elsewhere.parquet")
    for file in ("data.json", "elsewhere.parquet"):
        splits = load_local_captions(
            tmp_path / file,
            image_size=5,
            image_column="path",
            caption_column="text",
            val_fraction=0.3,
            test_fraction=0.3,
        )
        assert [len(s) for s in splits.values()] == [2, 2, 2]  # round(0.3 * 6) each
        assert _all_captions(splits) == sorted(r["caption"] for r in rows)
        for split in splits.values():
            _check_alignment(split, 5)


def test_directory_of_split_files(tmp_path):
    train = _write_images(tmp_path / "img", 10)
    val = _write_images(tmp_path / "img", 3, start=10)
    _write_jsonl(tmp_path / "train.jsonl", [{"image": f"img/{r['file']}", "caption": r["caption"]} for r in train])
    _write_jsonl(tmp_path / "validation.jsonl", [{"image": f"img/{r['file']}", "caption": r["caption"]} for r in val])
    splits = load_local_captions(tmp_path, image_size=6, test_fraction=0.2)
    assert splits["val"].captions == [r["caption"] for r in val]  # from its file, in file order
    assert [len(s) for s in splits.values()] == [8, 3, 2]  # test carved from train
    assert _all_captions(splits) == sorted(r["caption"] for r in train + val)
    for split in splits.values():
        _check_alignment(split, 6)


def test_directory_of_parquet_splits(tmp_path):
    rows = _write_images(tmp_path, 9)
    for name, part in (("train", rows[:5]), ("val", rows[5:7]), ("test", rows[7:])):
        frame = pd.DataFrame([{"image": r["file"], "caption": r["caption"]} for r in part])
        frame.to_parquet(tmp_path / f"{name}.parquet")
    splits = load_local_captions(tmp_path, image_size=4)
    assert [s.captions for s in splits.values()] == [[r["caption"] for r in p] for p in (rows[:5], rows[5:7], rows[7:])]


def test_parquet_with_embedded_image_bytes(tmp_path):
    """Parquet exported by `datasets` holds images as {bytes, path} structs."""
    import io

    rows = _write_images(tmp_path / "src", 4)
    records = []
    for r in rows:
        buffer = io.BytesIO()
        Image.open(tmp_path / "src" / r["file"]).save(buffer, format="PNG")
        records.append({"image": {"bytes": buffer.getvalue(), "path": None}, "caption": r["caption"]})
    pd.DataFrame(records).to_parquet(tmp_path / "train.parquet")
    splits = load_local_captions(tmp_path / "train.parquet", image_size=3, val_fraction=0.25, test_fraction=0.25)
    assert _all_captions(splits) == sorted(r["caption"] for r in rows)
    for split in splits.values():
        _check_alignment(split, 3)


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_image_folder(tmp_path, metadata):
    rows = _write_images(tmp_path, 20)
    if metadata == "jsonl":
        _write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": r["file"], "caption": r["caption"]} for r in rows])
    else:
        with open(tmp_path / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "caption"])
            writer.writerows([r["file"], r["caption"]] for r in rows)
    splits = load_local_captions(tmp_path, image_size=7)
    assert [len(s) for s in splits.values()] == [18, 1, 1]
    assert _all_captions(splits) == sorted(r["caption"] for r in rows)
    for split in splits.values():
        _check_alignment(split, 7)


def test_image_folder_with_split_folders(tmp_path):
    train = _write_images(tmp_path / "train", 6)
    test = _write_images(tmp_path / "test", 2, start=6)
    for name, rows in (("train", train), ("test", test)):
        metadata = [{"file_name": r["file"], "caption": r["caption"]} for r in rows]
        _write_jsonl(tmp_path / name / "metadata.jsonl", metadata)
    splits = load_local_captions(tmp_path, image_size=4, val_fraction=0.2)
    assert sorted(splits["test"].captions) == sorted(r["caption"] for r in test)
    assert [len(s) for s in splits.values()] == [5, 1, 2]  # val: round(0.2 * 6)
    for split in splits.values():
        _check_alignment(split, 4)


# ------------------------------------------------------------------------------------------ errors


def _error(path, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        load_local_captions(path, **{"image_size": 4, **kwargs})


def test_missing_path_and_unknown_formats(tmp_path):
    _error(tmp_path / "nope.jsonl", "does not exist")
    (tmp_path / "data.txt").write_text("hello")
    _error(tmp_path / "data.txt", r"unknown format '\.txt'")
    (tmp_path / "empty_dir").mkdir()
    _error(tmp_path / "empty_dir", "unknown format for directory")
    (tmp_path / "only_val").mkdir()
    _write_jsonl(tmp_path / "only_val" / "val.jsonl", [{"image": "a.png", "caption": "x"}])
    _error(tmp_path / "only_val", "no train file")
    (tmp_path / "two").mkdir()
    for name in ("train.jsonl", "train.parquet"):
        (tmp_path / "two" / name).write_text("x")
    _error(tmp_path / "two", "two files for split 'train'")


def test_missing_column_lists_the_columns(tmp_path):
    rows = _write_images(tmp_path, 3)
    _write_jsonl(tmp_path / "d.jsonl", [{"image": r["file"], "text": r["caption"]} for r in rows])
    _error(tmp_path / "d.jsonl", r"caption_column: no column 'caption'.*\['image', 'text'\]")
    _error(tmp_path / "d.jsonl", r"image_column: no column 'img'", image_column="img", caption_column="text")


def test_missing_and_unreadable_images_name_file_and_row(tmp_path):
    rows = _write_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    records = [{"image": r["file"], "caption": r["caption"]} for r in rows]
    _write_jsonl(tmp_path / "missing.jsonl", records[:2] + [{"image": "ghost.png", "caption": "boo"}])
    _error(tmp_path / "missing.jsonl", r"missing\.jsonl row 2: missing or unreadable image file .*ghost\.png")
    _write_jsonl(tmp_path / "broken.jsonl", [records[0], {"image": "broken.png", "caption": "boo"}, records[1]])
    _error(tmp_path / "broken.jsonl", r"broken\.jsonl row 1: .*broken\.png")
    _write_jsonl(tmp_path / "null.jsonl", [records[0], {"image": None, "caption": "boo"}])
    _error(tmp_path / "null.jsonl", r"null\.jsonl row 1: expected an image path")


def test_image_folder_missing_file(tmp_path):
    rows = _write_images(tmp_path, 3)
    _write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": r["file"], "caption": r["caption"]} for r in rows])
    (tmp_path / rows[1]["file"]).unlink()
    with pytest.raises(ValueError, match=rows[1]["file"]):
        load_local_captions(tmp_path, image_size=4)


def test_bad_captions_are_rejected(tmp_path):
    rows = _write_images(tmp_path, 3)
    _write_jsonl(
        tmp_path / "blank.jsonl",
        [{"image": rows[0]["file"], "caption": "ok"}, {"image": rows[1]["file"], "caption": "  "}],
    )
    _error(tmp_path / "blank.jsonl", r"caption_column: .*blank\.jsonl row 1 has '  '")
    _write_jsonl(
        tmp_path / "number.jsonl",
        [{"image": rows[0]["file"], "caption": 5}, {"image": rows[1]["file"], "caption": 7}],
    )
    _error(tmp_path / "number.jsonl", r"caption_column: .*number\.jsonl row 0 has 5")


def test_empty_data_and_empty_splits(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    _error(tmp_path / "empty.jsonl", "has no rows")
    empty = pd.DataFrame({"image": pd.Series([], dtype=str), "caption": pd.Series([], dtype=str)})
    empty.to_parquet(tmp_path / "empty.parquet")
    _error(tmp_path / "empty.parquet", "has no rows")
    rows = _write_images(tmp_path, 2)
    _write_jsonl(tmp_path / "two.jsonl", [{"image": r["file"], "caption": r["caption"]} for r in rows])
    _error(tmp_path / "two.jsonl", "leaves an empty train split")  # one row each for val and test


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=0), "image_size"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(test_fraction=-0.1), "test_fraction"),
        (dict(val_fraction=0.5, test_fraction=0.5), r"val_fraction \+ test_fraction"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    _error(tmp_path, match, **kwargs)
