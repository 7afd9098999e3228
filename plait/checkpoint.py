"""HF-format model directories: check them before loading, write them atomically.

A model dir is `config.json` + `model.safetensors` (or shards listed in `model.safetensors.index.json`),
plus `tokenizer.json` and plait's `plait_run.yaml` when plait trained it. Loading checks every file first,
so a truncated download or a half-written save is a clear `ValueError`, not a crash deep in a loader.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def check_safetensors_file(path: Path) -> None:
    """Read the header and check the file holds every byte the header promises (catches truncation)."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: corrupt safetensors file ({size} bytes, the header alone needs 8)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(f"{path}: corrupt safetensors file (header of {header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise ValueError(
            f"{path}: truncated safetensors file: the header needs {8 + header_len + data_end} bytes, the file has {size}"
        )


def check_model_dir(path: str | Path) -> Path:
    """Raise `ValueError` naming the problem unless `path` is a complete HF model dir."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model dir {str(path)!r}: not a directory")
    config = path / CONFIG_FILE
    if not config.is_file():
        raise ValueError(f"model dir {str(path)!r}: missing {CONFIG_FILE}")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: malformed JSON: {e}") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ValueError(f"{config}: expected a JSON object with a 'model_type' key")
    index = path / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: malformed weight index: {e}") from None
    elif (path / WEIGHTS_FILE).is_file():
        shards = [WEIGHTS_FILE]
    else:
        raise ValueError(f"model dir {str(path)!r}: no {WEIGHTS_FILE} and no {WEIGHTS_INDEX_FILE}")
    for shard in shards:
        if not (path / shard).is_file():
            raise ValueError(f"model dir {str(path)!r}: weight shard {shard!r} listed in the index is missing")
        check_safetensors_file(path / shard)
    return path


def write_dir_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move the finished dir to `target` in one rename.

    A crash mid-write leaves only a `.tmp-*` dir beside the target, never a partial `target`.
    An existing `target` is replaced (moved aside first, removed after the rename).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
