"""The native MiMo-V2-Flash through the trainer: text-only captions, MTP depths, balancing, export, resume."""

import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import MiMoV2FlashForCausalLM as Reference

import plait
from plait.config import load_config
from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
from plait.train import train
from tests.conftest import SMALL_DATA


def _config(tmp_path, data_cache, *overrides):
    return load_config("configs/mimo_v2_flash_tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}", *SMALL_DATA, "train.steps=6",
        "train.batch_size=16", "train.warmup_steps=1", "train.eval_every=0", "train.progress=false",
        "eval.num_samples=16", "eval.max_new_tokens=16", *overrides,
    ])


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mtp_training_logs_depth_losses_balances_experts_and_exports_mtp_weights(tmp_path, data_cache):
    result = train(_config(tmp_path, data_cache, "model.mtp.num_layers=2", "model.mtp.loss_scaling_factor=0.2"),
                   console=Console(quiet=True))
    rows = [r for r in _rows(result.output_dir) if "lm_loss" in r]
    assert len(rows) == 6
    for r in rows:
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.2 / 2 * (r["mtp_loss_1"] + r["mtp_loss_2"]), rel=1e-6)
        assert r["moe_load_imbalance"] >= 1.0
    names = set(load_file(result.checkpoint_dir / "model.safetensors"))
    assert "model.mtp.layers.1.eh_proj.weight" in names
    model = plait.from_pretrained(result.checkpoint_dir)
    assert isinstance(model, MiMoV2FlashForCausalLM) and model.mtp_config.num_layers == 2
    # the router biases moved (aux-loss-free balancing, rate 0.001 per step)
    assert model.model.layers["1"].mlp.gate.e_score_correction_bias.abs().max() > 0
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        theirs = Reference.from_pretrained(result.checkpoint_dir).eval()(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_mtp_run_resumed_from_an_earlier_checkpoint_repeats_the_same_losses(tmp_path, data_cache):
    cfg = _config(tmp_path, data_cache, "model.mtp.num_layers=1", "checkpoint.every_steps=3", "train.resume=auto")
    train(cfg, console=Console(quiet=True))
    uninterrupted = [(r["step"], r["loss"], r["mtp_loss_1"]) for r in _rows(cfg.output_dir) if "lm_loss" in r]
    shutil.rmtree(cfg.output_dir / "checkpoints" / "step_6")  # as if the run had died right after step 3's save
    console = Console(record=True, width=200)
    train(cfg, console=console)
    assert "resumed from step 3" in console.export_text()
    again = [(r["step"], r["loss"], r["mtp_loss_1"]) for r in _rows(cfg.output_dir) if "lm_loss" in r]
    assert again == uninterrupted  # bitwise: expert biases, MTP depths and optimizer state all restored


def test_mtp_on_a_stock_model_is_a_clear_error(small_config):
    from plait.train import prepare_run

    with pytest.raises(ValueError, match="multi-token prediction needs a native plait model"):
        prepare_run(small_config("model.mtp.num_layers=1", "model.implementation=transformers"))


def test_moe_aux_loss_is_trained_and_logged(tmp_path, data_cache):
    """`moe_aux_loss_coef` in the model config: the step minimises the mean aux loss of its micro-batches too."""
    cfg = _config(tmp_path, data_cache, "model.config.moe_aux_loss_coef=0.05", "train.grad_accum=2", "train.steps=3")
    rows = [r for r in _rows(train(cfg, console=Console(quiet=True)).output_dir) if "lm_loss" in r]
    assert len(rows) == 3
    for r in rows:
        # 0.05 x E x sum_e f_e P_e per layer, with sum_e f_e = top-k: about 0.05 x top-k per MoE layer when balanced
        assert 0.0 < r["moe_aux_loss"] < 1.0
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["moe_aux_loss"], rel=1e-6)
