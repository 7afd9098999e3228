import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import plait
from plait.checkpoint import CHECKSUMS_FILE, check_model_dir, write_dir_atomically
from plait.data.tokenizer import load_tokenizer
from plait.models.vlm import vlm_spec


def logits_of(model, ckpt):
    tok = load_tokenizer(ckpt)
    spec = vlm_spec(model.config.model_type)
    n = spec.image_token_count(model.config, 48)
    ids = torch.tensor([[tok.bos_token_id] + [model.config.image_token_index] * n + [10, 11, 12]])
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        return model(input_ids=ids, **spec.vision_inputs(model.config, pixels)).logits


def test_export_has_hf_layout(trained_checkpoint):
    names = {p.name for p in trained_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "plait_run.yaml"} <= names
    assert not any(n.startswith(".tmp") for n in names)


def test_exported_model_loads_back_with_identical_logits(trained_checkpoint):
    ours = plait.from_pretrained(trained_checkpoint).eval()
    again = plait.from_pretrained(trained_checkpoint).eval()
    theirs = AutoModelForImageTextToText.from_pretrained(trained_checkpoint, local_files_only=True).eval()
    ref = logits_of(ours, trained_checkpoint)
    assert torch.equal(ref, logits_of(again, trained_checkpoint))
    torch.testing.assert_close(logits_of(theirs, trained_checkpoint), ref, atol=1e-5, rtol=1e-5)


def test_trained_weights_are_what_was_saved(trained_checkpoint, tmp_path):
    model = plait.from_pretrained(trained_checkpoint)
    model.save_pretrained(tmp_path)
    reloaded = plait.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture
def ckpt_copy(trained_checkpoint, tmp_path):
    """A copy without plait's checksum file, as another tool would have written it: these tests edit files and
    check what the loader's own checks say (the checksums would flag every edit first)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, dst)
    (dst / CHECKSUMS_FILE).unlink()
    return dst


def test_bytes_changed_inside_an_intact_file_are_caught_by_the_checksums(trained_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, ckpt)
    manifest = json.loads((ckpt / CHECKSUMS_FILE).read_text())
    # the weights and the training state (loading the model reads only the weights' entries)
    assert set(manifest["files"]) == {"model.safetensors", "training_state/.metadata", "training_state/__0_0.distcp"}
    weights = ckpt / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-4:] = b"\x00\x00\xc0\x7f"  # the last float becomes NaN: length and header as they were
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors: damaged or changed after plait wrote it: "
                                         r"plait_checksums.json records \d+ bytes with sha256 [0-9a-f]{16}"):
        plait.from_pretrained(ckpt)
    weights.write_bytes(original)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config, indent=4))  # text files are the user's to edit
    plait.from_pretrained(ckpt)
    for text in ("{", json.dumps({"files": {"model.safetensors": {"bytes": "many"}}})):
        (ckpt / CHECKSUMS_FILE).write_text(text)
        with pytest.raises(ValueError, match="plait_checksums.json: malformed checksum file"):
            check_model_dir(ckpt)
    (ckpt / CHECKSUMS_FILE).write_text(json.dumps({"files": {"model-2.safetensors": {"bytes": 1, "sha256": "0"}}}))
    with pytest.raises(ValueError, match="model-2.safetensors is listed in plait_checksums.json but missing"):
        check_model_dir(ckpt)


def test_truncated_weights_are_rejected(ckpt_copy):
    weights = ckpt_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        plait.from_pretrained(ckpt_copy)
    weights.write_bytes(data[:4])
    with pytest.raises(ValueError, match="corrupt safetensors file"):
        check_model_dir(ckpt_copy)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[100:])
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        check_model_dir(ckpt_copy)


def test_incomplete_dirs_are_rejected(ckpt_copy, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        plait.from_pretrained(tmp_path / "nope")
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        plait.from_pretrained(ckpt_copy)
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON"):
        check_model_dir(ckpt_copy)
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(ValueError, match="missing config.json"):
        check_model_dir(ckpt_copy)


def test_missing_shard_is_rejected(ckpt_copy):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors' listed in the index is missing"):
        check_model_dir(ckpt_copy)


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header through `edit(header)`, keeping its tensor bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_malformed_headers_and_indexes_are_rejected(ckpt_copy):
    weights = ckpt_copy / "model.safetensors"
    original = weights.read_bytes()
    name = next(k for k in load_file(weights) if k.endswith("embed_tokens.weight"))
    for edit, match in [
        (lambda h: h[name].pop("data_offsets"), "needs dtype, shape and two increasing data_offsets"),
        (lambda h: h.__setitem__(name, [1, 2]), "needs dtype, shape"),
        (lambda h: h[name].__setitem__("data_offsets", [8, 4]), "increasing data_offsets"),
        (lambda h: h[name].__setitem__("shape", [h[name]["shape"][0] + 1, h[name]["shape"][1]]), "corrupt safetensors"),
    ]:
        weights.write_bytes(original)
        _rewrite_header(weights, edit)
        with pytest.raises(ValueError, match=match):
            plait.from_pretrained(ckpt_copy)
    weights.write_bytes(original)
    index = ckpt_copy / "model.safetensors.index.json"
    for weight_map, match in [([], "'weight_map' key of type dict"), ({"a": 3}, "malformed weight index"),
                              ({"a": "../model.safetensors"}, "malformed weight index")]:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        with pytest.raises(ValueError, match=match):
            check_model_dir(ckpt_copy)


def test_tensors_of_the_wrong_kind_and_bad_configs_are_rejected(ckpt_copy):
    weights = ckpt_copy / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("embed_tokens.weight"))
    save_file({**state, name: state[name].to(torch.int32)}, weights)
    with pytest.raises(ValueError, match=rf"wrong dtype 1: \['.*embed_tokens.weight \(expected torch.float32, got torch.int32"):
        plait.from_pretrained(ckpt_copy)
    save_file({**state, name: state[name].to(torch.bfloat16)}, weights)  # another float dtype loads as it is
    assert plait.from_pretrained(ckpt_copy).get_input_embeddings().weight.dtype == torch.bfloat16
    save_file(state, weights)
    config = json.loads((ckpt_copy / "config.json").read_text())
    for text_config, match in [({"num_attention_heads": "x"}, "config.json: .*num_attention_heads"),
                               ({"hidden_size": -3}, "hidden_size: expected a positive integer, got -3")]:
        bad = {**config, "text_config": {**config["text_config"], **text_config}}
        (ckpt_copy / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            plait.from_pretrained(ckpt_copy)
    # a VLM config relabelled as a text model: transformers fails inside its own config handling
    (ckpt_copy / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"cannot build LlamaForCausalLM from this checkpoint's config.json"):
        plait.from_pretrained(ckpt_copy)


def test_broken_tokenizer_is_rejected(ckpt_copy):
    (ckpt_copy / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(ckpt_copy)


def test_atomic_write_leaves_nothing_on_a_crash(tmp_path):
    target = tmp_path / "out"

    def crash(d):
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_dir_atomically(target, crash)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_dir_atomically(target, lambda d: (d / "a.txt").write_text("1"))
    with pytest.raises(RuntimeError):
        write_dir_atomically(target, crash)
    assert (target / "a.txt").read_text() == "1"  # the previous complete dir survives a failed replace
    write_dir_atomically(target, lambda d: (d / "b.txt").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_training_state_of_a_model_with_a_never_used_parameter_resumes(tmp_path):
    """A parameter that never gets a gradient has no AdamW state; the saved state still loads into a fresh
    optimizer, and the used parameters' states come back exactly."""
    import torch
    from torch import nn

    from plait.checkpoint import load_training_state, save_training_state

    def build():
        torch.manual_seed(0)
        model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    model, optimizer = build()
    model["used"](torch.randn(3, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "step_1").mkdir()
    save_training_state(tmp_path / "step_1", model, optimizer, {"step": 1})
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # saving moved nothing
    (tmp_path / "step_1" / "config.json").write_text('{"model_type": "llama"}')  # what check_model_dir reads
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "step_1" / "model.safetensors")
    again, fresh = build()
    load_training_state(tmp_path / "step_1", again, fresh)
    for k, v in again.state_dict().items():
        assert torch.equal(v, weights[k]), k
    used = optimizer.state[model["used"].weight]
    restored = fresh.state[again["used"].weight]
    assert torch.equal(restored["exp_avg"], used["exp_avg"]) and torch.equal(restored["exp_avg_sq"], used["exp_avg_sq"])
