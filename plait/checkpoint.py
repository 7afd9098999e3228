"""HF-format model directories: check them before loading, write them atomically.

A model dir is `config.json` + `model.safetensors` (or shards listed in `model.safetensors.index.json`),
plus `tokenizer.json` and plait's `plait_run.yaml` when plait trained it. Loading checks every file first,
so a truncated download or a half-written save is a clear `ValueError`, not a crash deep in a loader.

Where plait wrote the dir, `plait_checksums.json` records the size and SHA-256 of each binary file (weights,
and a training checkpoint's optimizer and model shards), and loading compares them: bytes changed inside a file
whose length and header are intact are caught too. Text files (config, tokenizer, run config) are not in it:
their parsers check them, and users edit them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Callable

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
CHECKSUMS_FILE = "plait_checksums.json"


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
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or not isinstance(entry.get("dtype"), str)
                or not isinstance(entry.get("shape"), list)):
            raise ValueError(f"{path}: corrupt safetensors header: tensor {name!r} needs dtype, shape and two "
                             f"increasing data_offsets, got {entry!r:.200}")
        data_end = max(data_end, offsets[1])
    if 8 + header_len + data_end > size:
        raise ValueError(
            f"{path}: truncated safetensors file: the header needs {8 + header_len + data_end} bytes, the file has {size}"
        )


def _read_json_object(dir_kind: str, path: Path, name: str, key: str, key_type: type = object) -> dict:
    """A required JSON object file of a checkpoint dir, with `key` of `key_type`; `ValueError` otherwise."""
    file = path / name
    if not file.is_file():
        raise ValueError(f"{dir_kind} {str(path)!r}: missing {name}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: malformed JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), key_type):
        raise ValueError(f"{file}: expected a JSON object with a {key!r} key of type {key_type.__name__}")
    return data


def check_model_dir(path: str | Path) -> Path:
    """Raise `ValueError` naming the problem unless `path` is a complete HF model dir."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model dir {str(path)!r}: not a directory")
    _read_json_object("model dir", path, CONFIG_FILE, "model_type", str)
    for shard in _weight_file_names(path):
        if not (path / shard).is_file():
            raise ValueError(f"model dir {str(path)!r}: weight shard {shard!r} listed in the index is missing")
        check_safetensors_file(path / shard)
    verify_checksums(path, "weights")
    return path


def _binary_files(path: Path) -> list[Path]:
    """The files a checksum covers: the weights, and everything under a training checkpoint's state dir."""
    state = path / TRAINING_STATE_DIR
    return sorted(path.glob("*.safetensors")) + (sorted(p for p in state.rglob("*") if p.is_file())
                                                 if state.is_dir() else [])


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(path: str | Path, keep_recorded: bool = False) -> None:
    """Record the size and SHA-256 of the dir's binary files in `plait_checksums.json`. `keep_recorded`: keep
    the entries a writer of this same fresh dir made moments ago (the model's weights, hashed as they were
    written) and hash only the files they do not cover; else every file is hashed and any old record replaced."""
    path = Path(path)
    manifest = path / CHECKSUMS_FILE
    recorded = json.loads(manifest.read_text())["files"] if keep_recorded and manifest.is_file() else {}
    files = {}
    for p in _binary_files(path):
        name = p.relative_to(path).as_posix()
        files[name] = recorded.get(name) or {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def verify_checksums(path: Path, part: str) -> None:
    """Compare the files of one `part` ("weights": the safetensors files; "training_state": everything under
    the training state dir) that `plait_checksums.json` lists with what is on disk; a dir without that file
    (written by another tool) passes. `ValueError` naming the first file that differs."""
    manifest = path / CHECKSUMS_FILE
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest}: malformed checksum file ({type(e).__name__}: {str(e)[:100]}); expected "
                         '{"algorithm": "sha256", "files": {name: {"bytes": N, "sha256": HEX}}}') from None
    in_part = (lambda name: name.startswith(f"{TRAINING_STATE_DIR}/")) if part == "training_state" \
        else (lambda name: not name.startswith(f"{TRAINING_STATE_DIR}/"))
    for name, size, digest in entries:
        if not in_part(name):
            continue
        file = path / name
        if not file.is_file():
            raise ValueError(f"{path}: {name} is listed in {CHECKSUMS_FILE} but missing")
        actual_size = file.stat().st_size
        actual = _sha256(file) if actual_size == size else None
        if actual != digest:
            found = f"{actual_size} bytes" if actual is None else f"sha256 {actual[:16]}..."
            raise ValueError(f"{file}: damaged or changed after plait wrote it: {CHECKSUMS_FILE} records "
                             f"{size} bytes with sha256 {digest[:16]}..., the file has {found} (replaced it on "
                             f"purpose? delete {CHECKSUMS_FILE})")


def _weight_file_names(path: Path) -> list[str]:
    """The safetensors files of a model dir: the shards its index lists (sorted), or the single file."""
    index = path / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = _read_json_object("model dir", path, WEIGHTS_INDEX_FILE, "weight_map", dict)["weight_map"]
        shards = set(weight_map.values())
        if not shards or not all(isinstance(s, str) and s and Path(s).name == s for s in shards):
            raise ValueError(f"{index}: malformed weight index: expected a weight_map of tensor names to shard file "
                             f"names in the model dir, got {sorted(map(repr, shards))[:5]}")
        return sorted(shards)
    if (path / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    raise ValueError(f"model dir {str(path)!r}: no {WEIGHTS_FILE} and no {WEIGHTS_INDEX_FILE}")


def read_model_weights(path: str | Path) -> dict:
    """Every tensor of a local HF model dir (one file or index + shards), checked first; names as on disk."""
    from safetensors.torch import load_file

    path = check_model_dir(path)
    state = {}
    for file in (path / name for name in _weight_file_names(path)):
        # pread: each tensor in memory of its own. The default memory map stays resident as long as any one
        # tensor of the file lives, so a parameter loaded as is would keep the bytes of the experts (copied
        # when stacked) resident too: about the model's size again in a training process's peak memory.
        try:
            tensors = load_file(file, backend="pread")
        except Exception as e:  # safetensors' own error type: a header that does not describe the bytes
            raise ValueError(f"{file}: corrupt safetensors file: {e}") from None
        clash = state.keys() & tensors.keys()
        if clash:
            raise ValueError(f"model dir {str(path)!r}: tensor {sorted(clash)[0]!r} appears in more than one shard")
        state.update(tensors)
    return state


def write_model_weights(path: str | Path, state: dict, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `state` (names as on disk) as `model.safetensors`, or as shards plus an index past
    `max_shard_bytes`, the layout transformers writes and reads."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / WEIGHTS_FILE, metadata={"format": "pt"})
        write_checksums(path)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / WEIGHTS_INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_checksums(path)


def make_temp_dir(target: str | Path) -> Path:
    """A fresh `.tmp-*` dir beside `target`, to be filled and then committed with `commit_dir`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))


def commit_dir(tmp: Path, target: str | Path) -> Path:
    """Move a finished temp dir to `target` in one rename; an existing `target` is replaced."""
    target = Path(target)
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def write_dir_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move the finished dir to `target` in one rename.

    A crash mid-write leaves only a `.tmp-*` dir beside the target, never a partial `target`.
    """
    tmp = make_temp_dir(target)
    try:
        write(tmp)
        return commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- Resumable training state -------------------------------------------------------------------------
# A training checkpoint is a model dir (above) plus the optimizer and model state via
# torch.distributed.checkpoint (so sharded runs save the same way later) and a small JSON of the
# trainer's own state: step, scheduler, data position, RNG. The whole dir appears in one rename.

TRAINING_STATE_DIR = "training_state"
TRAINER_STATE_FILE = "trainer_state.json"


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Optimizer state flattened to one key per parameter and setting ("state.model.layers.0...exp_avg",
    # "param_groups.model.layers.0....lr"), as torchtitan saves it: a rank holding some pipeline stages saves
    # and loads exactly its own parameters' keys, hyperparameters included, whatever the other ranks hold.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _dcp_state(model, optimizer) -> dict:
    """Model and optimizer state keyed by the full model's parameter names (`model` is the whole model, or a
    pipeline rank's stages merged under the whole model's names). An optimizer with nothing to train (a
    frozen pipeline stage under model.mtp.train_only) has no state to save."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if _optimizes_something(optimizer):
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=_state_dict_options())
    return state


def _optimizes_something(optimizer) -> bool:
    return any(group["params"] for group in optimizer.param_groups)


# DCP warns that it runs in a single process when no process group exists; that is intended here.
_SINGLE_PROCESS_WARNING = ".*torch.distributed is disabled.*"


def _give_every_parameter_optimizer_state(optimizer) -> None:
    """A parameter that never had a gradient (an unused head, say) has no optimizer state, while a resumed run's
    optimizer is laid out by torch's zero-gradient initialisation, with state for every parameter: loading would
    miss its keys. Initialise those the same way before saving: a zero gradient at lr 0, so no weight moves, and
    parameters that already have state are left alone (their gradients are set aside for the step)."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    missing = {id(p) for p in params if p not in optimizer.state}
    if not missing:
        return
    grads = {p: p.grad for p in params}
    lrs = [group["lr"] for group in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p) if id(p) in missing else None
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        with torch.no_grad():
            optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        for p, g in grads.items():
            p.grad = g


def save_training_state(target: Path, model, optimizer, trainer_state: dict, write_trainer_state: bool = True) -> None:
    """Collective under a process group: every rank calls it; one rank (`write_trainer_state`) writes the JSON."""
    import torch.distributed.checkpoint as dcp

    _give_every_parameter_optimizer_state(optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(target / TRAINING_STATE_DIR))
    if write_trainer_state:
        (target / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state))


def check_training_checkpoint(path: Path) -> dict:
    """Check a training checkpoint dir is complete and return its trainer state; `ValueError` otherwise."""
    check_model_dir(path)
    state = _read_json_object("training checkpoint", path, TRAINER_STATE_FILE, "step", int)
    if path.name.startswith("step_") and path.name[5:].isdigit() and int(path.name[5:]) != state["step"]:
        raise ValueError(f"training checkpoint {str(path)!r}: {TRAINER_STATE_FILE} says step {state['step']}, "
                         f"the directory step {int(path.name[5:])}")
    if not (path / TRAINING_STATE_DIR / ".metadata").is_file():
        raise ValueError(f"training checkpoint {str(path)!r}: missing {TRAINING_STATE_DIR}/.metadata")
    verify_checksums(path, "training_state")  # the weights' entries: check_model_dir above
    return state


def load_training_state(path: Path, model, optimizer, checked_state: dict | None = None) -> dict:
    """Restore model and optimizer in place from a training checkpoint; return the trainer state.
    `checked_state`: what `check_training_checkpoint(path)` returned, where the caller has checked the dir
    already (its checksums are then not read a second time)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    trainer_state = check_training_checkpoint(path) if checked_state is None else checked_state
    state = _dcp_state(model, optimizer)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            dcp.load(state, checkpoint_id=str(path / TRAINING_STATE_DIR))
    except (Exception, CheckpointException) as e:  # CheckpointException wraps the per-rank errors (EOF, ...)
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"training checkpoint {str(path)!r}: cannot read {TRAINING_STATE_DIR}: {first_line}") from None
    set_model_state_dict(model, state["model"])
    if "optim" in state:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_state_dict_options())
    return trainer_state


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """`step_N` dirs under `root`, oldest first; half-written `.tmp-*` dirs are not among them."""
    if not root.is_dir():
        return []
    found = [(int(p.name[5:]), p) for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
             and p.name[5:].isdigit()]
    return sorted(found)


def latest_training_checkpoint(root: Path) -> Path | None:
    """The newest `step_N` dir that holds a training state (exports without one are skipped)."""
    for _, path in reversed(step_dirs(root)):
        if (path / TRAINER_STATE_FILE).exists() or (path / TRAINING_STATE_DIR).exists():
            return path
    return None
