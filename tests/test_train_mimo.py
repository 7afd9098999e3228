"""A MIMO model (M3 vision tower + Whisper encoder + Llama decoder) through the trainer: mixed image and audio
batches, per-modality held-out figures, a loadable export, `plait eval`, and bitwise resume."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from rich.console import Console

import plait
from plait.config import load_config
from plait.metrics import read_metrics
from plait.models.mimo import MimoModel
from plait.train import prepare_run, train
from tests.conftest import SMALL_DATA

CONFIG = "configs/mimo_image_audio.yaml"


def _config(tmp_path, data_cache, *overrides):
    return load_config(CONFIG, [
        f"output_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}", *SMALL_DATA, "data.audio.num_train=96",
        "data.audio.num_val=16", "data.audio.num_test=16", "train.steps=4", "train.batch_size=16",
        "train.warmup_steps=1", "train.eval_every=0", "train.progress=false", "eval.num_samples=8",
        "eval.max_new_tokens=8", *overrides,
    ])


def _losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "lm_loss" in r]


def test_mixed_batches_train_report_per_modality_export_evaluate_and_resume(tmp_path, data_cache):
    cfg = _config(tmp_path, data_cache, "checkpoint.every_steps=2", "train.resume=auto")
    console = Console(record=True, width=250)
    result = train(cfg, console=console)
    text = console.export_text()
    # the trainer's last held-out line is the pooled exact match; each modality has its own line before it
    held_out = [line for line in text.splitlines() if line.startswith("held-out")]
    assert held_out[-1] == f"held-out accuracy: {result.final_metrics['exact_match']:.4f}"
    assert any(line.startswith("held-out images (8 samples): loss ") and "colour" in line for line in held_out)
    assert any(line.startswith("held-out audio (8 samples): loss ") and "pitch" in line for line in held_out)
    m = result.final_metrics
    assert m["samples"] == 16 and m["exact_match"] == pytest.approx((m["images_exact_match"] + m["audio_exact_match"]) / 2)
    losses = _losses(cfg.output_dir)
    assert len(losses) == 4 and losses[-1] < losses[0]

    # the export is a MIMO model dir plait loads back whole, with the trained weights
    ckpt = result.checkpoint_dir
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "plait_mimo"
    loaded = plait.from_pretrained(ckpt)
    assert isinstance(loaded, MimoModel)
    run = prepare_run(cfg)  # a fresh, untrained model of the same config
    trained = {k: v for k, v in loaded.state_dict().items()}
    fresh = run.model.mimo.state_dict()
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)

    # `plait eval` on the checkpoint reproduces the trainer's figures
    res = subprocess.run([sys.executable, "-m", "plait", "eval", str(ckpt), f"data.cache_dir={data_cache}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == held_out[-1]

    # resume from step 2 repeats steps 3 and 4 bit for bit
    shutil.rmtree(cfg.output_dir / "checkpoints" / "step_4")
    console = Console(record=True, width=200)
    train(cfg, console=console)
    assert "resumed from step 2" in console.export_text()
    assert _losses(cfg.output_dir) == losses


@pytest.mark.parametrize("overrides, match", [
    (["model.preset=tiny-minimax-m3"], "model.mimo: set model.preset and model.pretrained to null"),
    (["model.mimo=null", "model.preset=tiny-minimax-m3"], "data.audio: audio clips are fed to MIMO models only"),
    (["data.packing=true", "data.pack_length=64"], "pipelined and packed MIMO training are not supported"),
    (["model.mimo.special_token_ids={images: 3, audio: 4}"], "special_token_ids: the run's tokenizer gives"),
    (["data.audio=null"], r"model.mimo.modalities: 'audio' needs its data \(data.audio"),
    (["data.audio.n_mels=16"], "the whisper encoder takes 32 mel bands, got 16"),
    (["data.audio.hop_length=128"], r"the whisper encoder takes 32 frames \(2 x max_source_positions\), got 63"),
    (["model.mimo.modalities.video={}"], r"the trainer feeds \['audio', 'images'\], got \['video'\]"),
])
def test_bad_mimo_runs_are_refused_before_anything_is_written(tmp_path, data_cache, overrides, match):
    with pytest.raises(ValueError, match=match):
        prepare_run(_config(tmp_path, data_cache, *overrides))
    assert not (tmp_path / "run").exists()
