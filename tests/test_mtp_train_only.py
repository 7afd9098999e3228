"""model.mtp.train_only: fresh MTP depths on a trained checkpoint, trained alone, then used to decode."""

import json

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import plait
from plait.config import load_config
from plait.data.shapes import ShapeObject, render
from plait.train import train
from tests.conftest import SMALL_DATA
from tests.test_cli import plait_cmd


@pytest.fixture(scope="module")
def mtp_run(trained_checkpoint_without_mtp, tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("mtp-only")
    cfg = load_config("configs/default.yaml", [
        f"output_dir={out}", f"data.cache_dir={data_cache}", *SMALL_DATA, "model.preset=null",
        f"model.pretrained={trained_checkpoint_without_mtp}", "model.mtp.num_layers=2", "model.mtp.train_only=true",
        "model.mtp.loss_scaling_factor=0.5", "train.steps=4", "train.batch_size=16", "train.warmup_steps=1",
        "train.eval_every=0", "train.progress=false", "eval.num_samples=8", "eval.max_new_tokens=12",
    ])
    return trained_checkpoint_without_mtp, train(cfg, console=Console(quiet=True))


def test_only_the_new_depths_change(mtp_run):
    base, result = mtp_run
    before = load_file(base / "model.safetensors")
    after = load_file(result.checkpoint_dir / "model.safetensors")
    new = sorted(n for n in after if ".mtp." in n)
    assert not any(".mtp." in n for n in before)
    assert any(n.endswith("mtp.layers.1.eh_proj.weight") for n in new)
    # every trunk tensor, the MoE balancing biases included, is bit for bit the checkpoint's
    assert set(after) - set(new) == set(before)
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "lm_loss" in r]
    assert len(rows) == 4
    for r in rows:
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.5 / 2 * (r["mtp_loss_1"] + r["mtp_loss_2"]), rel=1e-6)
    assert rows[-1]["mtp_loss_1"] < rows[0]["mtp_loss_1"]
    model = plait.from_pretrained(result.checkpoint_dir)
    assert model.mtp_config.num_layers == 2


def test_the_depths_decode_speculatively_to_the_greedy_captions(mtp_run, tmp_path):
    _, result = mtp_run
    images = []
    for i, (shape, colour) in enumerate((("circle", "red"), ("square", "blue"))):
        images += ["--image", tmp_path / f"{i}.png"]
        render([ShapeObject(shape, colour, "large", "center")], 48, np.random.default_rng(i)).save(images[-1])
    plain = plait_cmd("generate", result.checkpoint_dir, *images, "--max-new-tokens", "12")
    fast = plait_cmd("generate", result.checkpoint_dir, *images, "--max-new-tokens", "12", "--speculative")
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    caption = plain.stdout.strip().splitlines()
    assert fast.stdout.strip().splitlines()[: len(caption)] == caption
    assert "tokens per forward" in fast.stdout and "depth 2" in fast.stdout


def test_a_checkpoint_with_another_depth_count_is_a_clear_error(mtp_run, data_cache, tmp_path):
    _, result = mtp_run
    cfg = load_config("configs/default.yaml", [
        f"output_dir={tmp_path}", f"data.cache_dir={data_cache}", *SMALL_DATA, "model.preset=null",
        f"model.pretrained={result.checkpoint_dir}", "model.mtp.num_layers=3", "train.steps=1",
        "train.batch_size=16", "train.progress=false",
    ])
    with pytest.raises(ValueError, match="the checkpoint has 2 MTP depths"):
        train(cfg, console=Console(quiet=True))
