"""Held-out evaluation of a native model: its chunked loss (no logits held) equals the loss of its logits, and each
MTP depth gets a held-out loss of its own."""

import torch

from plait.cli import _checkpoint_run_config
from plait.data.collate import collate_padded
from plait.data.tokenizer import load_tokenizer
from plait.evaluate import evaluate_captions
from plait.models import is_native
from plait.mtp import mtp_labels
from plait.nn.loss import causal_lm_loss_sum, count_targets
from plait.train import prepare_run


def test_native_eval_loss_and_mtp_depth_losses_match_the_logits(trained_checkpoint, data_cache):
    cfg = _checkpoint_run_config(trained_checkpoint, [f"data.cache_dir={data_cache}"])
    run = prepare_run(cfg, tokenizer=load_tokenizer(trained_checkpoint))
    model, dataset = run.model, run.datasets[cfg.eval.split]
    assert is_native(model) and model.language_model.mtp is not None
    metrics = evaluate_captions(model, dataset, run.model_inputs, run.tokenizer, num_samples=12, batch_size=5,
                                max_new_tokens=4, device=torch.device("cpu"))

    # the same figures from the logits, batch by batch (12 samples in batches of 5: sizes 5, 5, 2)
    model.eval()
    loss_sum, depth_sum, targets, depth_targets = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, 12, 5):
            batch = collate_padded([dataset[i] for i in range(start, min(12, start + 5))], dataset.pad_id)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                        return_mtp_logits=True, **run.model_inputs(batch))
            loss_sum += float(causal_lm_loss_sum(out.logits, batch["labels"]))
            targets += count_targets(batch["labels"])
            depth_1 = mtp_labels(batch["labels"], 1)
            depth_sum += float(causal_lm_loss_sum(out.mtp_logits[0], depth_1))
            depth_targets += count_targets(depth_1)
    assert abs(metrics["loss"] - loss_sum / targets) < 1e-5 * (loss_sum / targets)
    assert abs(metrics["mtp_loss_1"] - depth_sum / depth_targets) < 1e-5 * (depth_sum / depth_targets)
    assert "mtp_loss_2" not in metrics  # the default model has one depth
