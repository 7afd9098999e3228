"""The command line, run as a user runs it (a subprocess through `python -m plait`)."""

import json
import subprocess
import sys

import pytest

import numpy as np

from plait.data.shapes import ShapeObject, render


def plait_cmd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "plait", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_print_config_shows_the_resolved_run():
    res = plait_cmd("train", "configs/default.yaml", "train.steps=12", "--print-config")
    assert res.returncode == 0, res.stderr
    assert "steps: 12" in res.stdout and "preset: tiny-minimax-m3" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "configs/default.yaml", "train.stepz=3"], "train.stepz: unknown key"),
    (["train", "configs/missing.yaml"], "not found"),
    (["train", "configs/default.yaml", "model.mtp.train_only=true", "model.mtp.num_layers=0"],
     "set model.mtp.num_layers >= 1"),
    (["train", "configs/default.yaml", "model.mtp.train_only=true", "model.mtp.num_layers=1"],
     "set model.pretrained"),
    (["train", "configs/default.yaml", "parallel.pp=2"], "2 processes expected, but 1 were launched"),
    (["eval", "/nonexistent/ckpt"], "not a directory"),
    (["inspect", "configs/default.yaml", "model.preset=huge"], "unknown preset 'huge'"),
    (["inspect", "configs/default.yaml", "model.config.text_config.num_hiden_layers=1"],
     "model.config.text_config.num_hiden_layers: not a setting of MiniMaxM3VLTextConfig"),
    (["bench", "nope"], "benchmark 'nope': expected one of"),
    (["inspect", "{tmp}/blob.png"], "expected UTF-8 YAML text, got binary data"),
    (["train", "configs/default.yaml", "output_dir={tmp}/blob.png", "data.num_train=64", "data.num_val=8",
      "data.num_test=8", "data.cache_dir={tmp}/cache"], "File exists"),  # an OSError, named, not a traceback
])
def test_bad_input_is_one_clear_error(args, message, tmp_path):
    (tmp_path / "blob.png").write_bytes(bytes([0x89, 0x50, 0x4E, 0x47, 0xFF, 0xFE, 0x00]))
    res = plait_cmd(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert res.returncode == 2
    assert "error:" in res.stderr and message in res.stderr
    assert "Traceback" not in res.stderr


def test_generate_captions_an_image_file(trained_checkpoint, tmp_path):
    img = render([ShapeObject("circle", "red", "large", "center")], 48, np.random.default_rng(0))
    path = tmp_path / "circle.png"
    img.save(path)
    res = plait_cmd("generate", trained_checkpoint, "--image", path, "--max-new-tokens", "5")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{path}: ")
    assert 1 <= len(line.split(": ", 1)[1].split()) <= 5


def test_generate_native_resolution_takes_images_of_any_size(trained_checkpoint, tmp_path):
    paths = []
    for name, (w, h) in {"wide": (72, 40), "tall": (30, 90)}.items():
        img = render([ShapeObject("square", "blue", "large", "center")], 48, np.random.default_rng(1)).resize((w, h))
        paths.append(tmp_path / f"{name}.png")
        img.save(paths[-1])
    res = plait_cmd("generate", trained_checkpoint, "--image", paths[0], "--image", paths[1], "--native-resolution",
                    "--min-pixels", "1024", "--max-pixels", "4096", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()[-2:]
    assert [line.split(": ", 1)[0] for line in lines] == [str(p) for p in paths]
    assert all(1 <= len(line.split(": ", 1)[1].split()) <= 4 for line in lines)


def test_generate_native_resolution_names_bad_pixel_bounds(trained_checkpoint, tmp_path):
    path = tmp_path / "img.png"
    render([ShapeObject("circle", "red", "large", "center")], 48, np.random.default_rng(0)).save(path)
    res = plait_cmd("generate", trained_checkpoint, "--image", path, "--native-resolution", "--max-pixels", "100")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--min-pixels / --max-pixels: max_pixels: expected at least (patch_size x merge_size)^2 = 256" in res.stderr


def test_generate_rejects_a_missing_image(trained_checkpoint, tmp_path):
    res = plait_cmd("generate", trained_checkpoint, "--image", tmp_path / "nope.png")
    assert res.returncode == 2 and "nope.png" in res.stderr


def test_eval_reports_one_accuracy_line(trained_checkpoint, data_cache):
    res = plait_cmd("eval", trained_checkpoint, f"data.cache_dir={data_cache}", "eval.num_samples=8",
                    "eval.max_new_tokens=12")
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stdout.splitlines() if l.startswith("held-out accuracy: ")]
    assert len(lines) == 1
    assert 0.0 <= float(lines[0].split(": ")[1]) <= 1.0
    assert "held-out attribute accuracy: shape" in res.stdout


def test_inspect_a_checkpoint(trained_checkpoint):
    res = plait_cmd("inspect", trained_checkpoint, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["model_type"] == "minimax_m3_vl"
    assert info["total_parameters"] > 900_000
    # 3 MoE layers (2 decoder layers, 1 MTP depth) x 4 experts (top-2) x 3 matrices of 128 x 128: half the
    # routed weights are idle per token
    routed = 3 * 4 * 3 * 128 * 128
    assert info["total_parameters"] - info["active_parameters"] == routed // 2
    names = [m[0] for m in info["modules"]]
    assert "vision_tower" in names and "lm_head" in names
    assert info["layer_types"] == ["full_attention", "full_attention"]


def test_convert_writes_a_model_dir_that_transformers_loads(trained_checkpoint, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    import plait

    out = tmp_path / "hf"
    res = plait_cmd("convert", trained_checkpoint, out)
    assert res.returncode == 0, res.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "training_state").exists()
    from plait.checkpoint import read_model_weights

    saved, converted = read_model_weights(trained_checkpoint), read_model_weights(out)
    assert saved.keys() == converted.keys() and all(torch.equal(saved[k], converted[k]) for k in saved)
    ours = plait.from_pretrained(trained_checkpoint).eval()
    theirs = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    placeholders = {ours.config.image_token_index, ours.config.video_token_index}  # text only: no placeholders
    ids = torch.tensor([[i for i in range(1, 20) if i not in placeholders][:5]])
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() < 1e-4


def test_convert_fp8_writes_the_release_format(trained_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    import plait

    out = tmp_path / "fp8"
    res = plait_cmd("convert", trained_checkpoint, out, "--fp8", "--fp8-block", 32)
    assert res.returncode == 0, res.stderr
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["weight_block_size"] == [32, 32] and "language_model.lm_head" in quantization["ignored_layers"]
    on_disk = load_file(out / "model.safetensors")
    assert any(t.dtype == torch.float8_e4m3fn for t in on_disk.values())
    assert all(t.dtype != torch.float8_e4m3fn for k, t in on_disk.items() if k.startswith("vision_tower."))
    ours, theirs = plait.from_pretrained(out).eval(), AutoModelForImageTextToText.from_pretrained(out).eval()
    placeholders = {ours.config.image_token_index, ours.config.video_token_index}  # text only: no placeholders
    ids = torch.tensor([[i for i in range(1, 20) if i not in placeholders][:5]])
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() < 1e-4


def test_convert_refuses_an_existing_output_and_leaves_it_alone(trained_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = plait_cmd("convert", trained_checkpoint, out)
    assert res.returncode != 0 and "does not exist yet" in res.stderr + res.stdout
    assert (out / "notes.txt").read_text() == "keep me" and [p.name for p in out.iterdir()] == ["notes.txt"]
