import math

import pytest
from rich.console import Console

from plait.config import load_config
from plait.metrics import read_metrics
from plait.train import SampleOrder, lr_multiplier, train


def settings(**kw):
    return load_config("configs/default.yaml", [f"train.{k}={v}" for k, v in kw.items()]).train


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    s = settings(steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_multiplier(i, s) for i in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_wsd_schedule_is_flat_then_decays_linearly():
    s = settings(steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_multiplier(i, s) for i in range(100)]
    assert lrs[10:82] == [1.0] * 72
    assert lrs[-1] == pytest.approx(0.0)
    assert lrs[90] == pytest.approx(1 - 9 / 18)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_any_positive_run_length_is_valid(steps):
    s = settings(steps=steps, warmup_steps=100)  # warm-up longer than the run is clipped
    lrs = [lr_multiplier(i, s) for i in range(steps)]
    assert all(0 < x <= 1 and math.isfinite(x) for x in lrs)


def test_sample_order_covers_every_sample_once_per_epoch():
    order = SampleOrder(10, seed=3)
    first = order.take(7) + order.take(3)
    assert sorted(first) == list(range(10)) and order.epoch == 0
    second = order.take(10)
    assert sorted(second) == list(range(10)) and order.epoch == 1 and second != first
    assert SampleOrder(10, seed=3).take(10) == first


def losses(cfg):
    train(cfg, console=Console(quiet=True))
    return [r for r in read_metrics(cfg.output_dir / "metrics.jsonl") if "loss" in r]


def test_two_runs_of_one_config_log_identical_losses(small_config, tmp_path):
    a = losses(small_config("train.steps=3"))
    b = losses(small_config("train.steps=3", f"output_dir={tmp_path / 'again'}"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]


def test_metrics_rows_have_the_documented_keys(small_config):
    cfg = small_config("train.steps=2")
    train(cfg, console=Console(quiet=True))
    rows = read_metrics(cfg.output_dir / "metrics.jsonl")
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [1, 2]
    for r in step_rows:
        assert {"step", "loss", "lm_loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert len(eval_rows) == 1 and {"eval_exact_match", "eval_shape", "eval_position"} <= set(eval_rows[0])
    assert (cfg.output_dir / "loss_curve.png").stat().st_size > 1000
    assert any((cfg.output_dir / "tensorboard").iterdir())


def test_output_router_logits_trains_on_transformers_pooled_balance_loss(small_config, tmp_path):
    """`output_router_logits` in the text config: every forward's loss adds router_aux_loss_coef x the pooled
    load-balancing loss (as transformers' own loss does), a mean over the step's forwards, logged as moe_aux_loss."""
    def cfg_dir(pooled):
        return tmp_path / f"pooled-{pooled}"

    runs = {}
    for pooled in (False, True):
        cfg = small_config("train.steps=2", "train.grad_accum=2", "model.mtp.num_layers=0",
                           f"model.config.text_config.output_router_logits={str(pooled).lower()}",
                           "model.config.text_config.router_aux_loss_coef=0.1", f"output_dir={cfg_dir(pooled)}")
        train(cfg, console=Console(quiet=True))
        runs[pooled] = [r for r in read_metrics(cfg.output_dir / "metrics.jsonl") if "loss" in r]
    for r in runs[True]:
        assert 0.05 < r["moe_aux_loss"] < 0.5  # 0.1 x a balance loss of about 1 (balanced) and more
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["moe_aux_loss"], rel=1e-6)
    assert all("moe_aux_loss" not in r for r in runs[False])
    # same first batch, same weights: the first step's CE agrees, and its update, which the aux loss joined, not
    assert runs[True][0]["lm_loss"] == pytest.approx(runs[False][0]["lm_loss"], rel=1e-6)
    assert runs[True][1]["lm_loss"] != pytest.approx(runs[False][1]["lm_loss"], rel=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_gradient_accumulation_matches_one_big_batch(small_config, tmp_path, packing):
    extra = ["data.packing=true", "data.pack_length=64"] if packing else []
    one = losses(small_config("train.steps=1", "train.grad_accum=1", *extra))
    four = losses(small_config("train.steps=1", "train.grad_accum=4", f"output_dir={tmp_path / 'acc'}", *extra))
    assert four[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert four[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)


def test_packing_gives_the_same_loss_as_padding(small_config, tmp_path):
    padded = losses(small_config("train.steps=1"))
    packed = losses(small_config("train.steps=1", "data.packing=true", "data.pack_length=96",
                                 f"output_dir={tmp_path / 'packed'}"))
    assert packed[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-5)


def test_pack_length_shorter_than_a_sample_fails_before_training(small_config):
    cfg = small_config("data.packing=true", "data.pack_length=10")
    with pytest.raises(ValueError, match="data.pack_length: 10 is shorter than the longest training sample"):
        train(cfg, console=Console(quiet=True))
    assert not (cfg.output_dir / "metrics.jsonl").exists()


def test_a_short_run_learns_far_above_chance(small_config):
    """End to end on the bundled data: the model must read the image, not just the caption prior.

    Chance is 1/9 for position and 1/2 for size; a model that ignores the image stays there (its loss
    plateaus near 0.73 nats per caption token, the entropy of the captions without the image).
    """
    cfg = small_config("data.num_train=30000", "data.num_val=500", "data.num_test=500", "train.steps=400",
                       "train.batch_size=64", "train.warmup_steps=100", "train.lr=1e-3",
                       "eval.num_samples=64", "eval.max_new_tokens=12")
    train(cfg, console=Console(quiet=True))
    final = [r for r in read_metrics(cfg.output_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    assert final["eval_position"] >= 0.8, final
    assert final["eval_size"] >= 0.8, final
    assert final["eval_loss"] < 0.5, final


def test_training_on_local_jsonl_data(small_config, tmp_path):
    """A user's own captions and images, through the same loop (word-level tokenizer trained on them)."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        colour = ["red", "green", "blue"][i % 3]
        pixels = np.zeros((40, 56, 3), dtype=np.uint8)  # not square: resized to data.image_size
        pixels[..., "rgb".index(colour[0]) if colour != "green" else 1] = 200 + rng.integers(0, 50)
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        rows.append({"file": f"img{i}.png", "text": f"A {colour} picture, number {i % 4}."})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = small_config("data.dataset=local", f"data.path={tmp_path / 'data.jsonl'}", "data.image_column=file",
                       "data.caption_column=text", "data.val_fraction=0.2", "data.test_fraction=0.2",
                       "train.steps=2", "train.batch_size=8", "data.prompt=describe")
    result = train(cfg, console=Console(quiet=True))
    final = [r for r in read_metrics(cfg.output_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    assert final["eval_samples"] == 8 and 0.0 <= final["eval_exact_match"] <= 1.0
    assert "eval_shape" not in final  # per-attribute scores only for shapes captions
    assert (result.checkpoint_dir / "tokenizer.json").is_file()


def test_periodic_exports_keep_the_newest(small_config):
    cfg = small_config("train.steps=5", "checkpoint.every_steps=2", "checkpoint.keep_last=2")
    result = train(cfg, console=Console(quiet=True))
    assert sorted(p.name for p in (cfg.output_dir / "checkpoints").iterdir()) == ["step_4", "step_5"]
    assert result.checkpoint_dir.name == "step_5"


@pytest.mark.parametrize("packed", [False, True])
def test_native_model_losses_from_hidden_states_equal_the_losses_from_logits(packed):
    """The trainer's two ways to a micro-batch's loss sums: a native model's own chunked cross-entropy (no
    logits) and the cross-entropy of its logits: same sums per depth, same gradients."""
    import torch

    from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
    from plait.models import is_native
    from plait.nn.loss import micro_batch_loss_sums
    from plait.train import _depth_labels
    from tests.nn.reference import assert_close, assert_grads_close, mimo_config

    torch.manual_seed(0)
    cfg = mimo_config(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"],
                      mlp_layer_types=["dense", "sparse"])
    model = MiMoV2FlashForCausalLM.from_config(cfg, num_mtp_layers=2)
    assert is_native(model)
    ids = torch.randint(0, 64, (2, 13))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # row 0 holds two documents
        batch["position_ids"] = torch.tensor([list(range(6)) + list(range(7)), list(range(13))])
    else:
        batch["attention_mask"] = (labels != -100) | (torch.arange(13) < 4)
    depth_labels = _depth_labels(batch, 2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    results = {}
    for from_hidden in (True, False):
        model.zero_grad(set_to_none=True)
        lm, depths, router_aux = micro_batch_loss_sums(model, from_hidden, inputs, {}, labels, depth_labels)
        assert router_aux is None  # no output_router_logits
        (lm + 0.5 * depths[0] + 0.25 * depths[1]).backward()
        results[from_hidden] = (lm.detach(), [d.detach() for d in depths],
                                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (lm_h, depths_h, grads_h), (lm_l, depths_l, grads_l) = results[True], results[False]
    for a, b in zip([lm_h, *depths_h], [lm_l, *depths_l], strict=True):  # sums over ~20 targets
        assert_close(a, b, tol=1e-6 * b.abs().item())
    assert any("mtp" in n for n in grads_h)
    assert_grads_close(grads_h, grads_l)
    # labels for fewer depths than the model has, or more: a clear error either way, on both paths
    for from_hidden in (True, False):
        for wrong in (depth_labels[:1], depth_labels + depth_labels[:1]):
            with pytest.raises(ValueError, match=f"for {len(wrong)} depths .* got 2"):
                micro_batch_loss_sums(model, from_hidden, inputs, {}, labels, wrong)
