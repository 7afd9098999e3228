import copy

import pytest
import torch
from rich.console import Console

import plait
from plait.compile import compile_layers, cxx_compiler, decoder_layers, eager
from plait.metrics import read_metrics
from plait.train import train
from tests.nn.reference import assert_close, assert_grads_close, m3_text_config, mimo_config, randomize_

needs_compiler = pytest.mark.skipif(cxx_compiler() is None, reason="TorchInductor on CPU needs a C++ compiler")
# Compiling is minutes on 2 cores with a cold TorchInductor cache (a fresh machine): these run with -m slow


def _train_steps(model, batches, lr=1e-3):
    """Forward + backward + AdamW per batch: the losses, and the gradients of the last step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for ids in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("config", [
    mimo_config(),  # sliding window with sinks, a dense and an MoE layer
    m3_text_config(layer_types=["full_attention", "minimax_m3_sparse"], mlp_layer_types=["dense", "sparse"],
                   index_n_heads=1, index_head_dim=8, index_block_size=4, index_topk_blocks=2),
], ids=["mimo_v2_flash", "minimax_m3"])
def test_compiled_layers_train_as_the_eager_model(config):
    eager_model = randomize_(plait.from_config(config), std=0.1)
    compiled = copy.deepcopy(eager_model)
    names = compile_layers(compiled)
    assert names == [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
    assert compiled.state_dict().keys() == eager_model.state_dict().keys()  # checkpoints see the same model
    g = torch.Generator().manual_seed(0)
    # two lengths: the second one recompiles with dynamic sizes, as a run with varying batches does
    batches = [torch.randint(0, config.vocab_size, shape, generator=g) for shape in ((2, 12), (2, 12), (3, 9))]
    expected, expected_grads = _train_steps(eager_model, batches)
    got, got_grads = _train_steps(compiled, batches)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, tol=1e-5, name=f"loss of step {step}")
    assert_grads_close(got_grads, expected_grads, rel=1e-4)
    for (name, p), q in zip(compiled.named_parameters(), eager_model.parameters()):
        assert_close(p, q, tol=1e-5, name=name)
    with eager():  # evaluation and generation run the same layers uncompiled
        assert_close(compiled(input_ids=batches[0]).logits, eager_model(input_ids=batches[0]).logits, tol=1e-5)


def test_compile_refuses_a_model_without_layers_and_a_cpu_without_a_compiler(monkeypatch):
    with pytest.raises(ValueError, match="decoder layers"):
        compile_layers(torch.nn.Linear(2, 2))
    model = plait.from_config(mimo_config())
    monkeypatch.setattr("plait.compile.shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        compile_layers(model)
    assert all(layer._compiled_call_impl is None for _, layer in decoder_layers(model))  # nothing was changed


def test_trainer_refuses_compile_without_a_compiler_before_writing(small_config, monkeypatch):
    monkeypatch.setattr("plait.compile.shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    cfg = small_config("train.steps=1", "train.compile=true")
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        train(cfg, console=Console(quiet=True))
    assert not cfg.output_dir.exists()


@needs_compiler
@pytest.mark.slow
def test_trainer_with_compiled_layers_logs_the_eager_losses(small_config, tmp_path):
    runs = {}
    for flag in ("false", "true"):
        cfg = small_config("train.steps=3", f"train.compile={flag}", f"output_dir={tmp_path / flag}")
        train(cfg, console=Console(quiet=True))
        runs[flag] = [r for r in read_metrics(cfg.output_dir / "metrics.jsonl") if "loss" in r]
        assert (cfg.output_dir / "checkpoints" / "step_3" / "config.json").exists()
    for a, b in zip(runs["true"], runs["false"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.dp=2"], ["parallel.pp=2", "parallel.microbatches=2"],
                                    ["parallel.dp_shard=2"]], ids=["ddp", "pipeline", "fsdp"])
def test_compiled_layers_under_each_parallelism_log_the_single_process_losses(small_config, tmp_path, layout):
    from tests.parallel.compare import launch_report
    from tests.parallel.test_data_parallel import overrides, spawn, step_rows

    single = small_config("train.steps=3")
    train(single, console=Console(quiet=True))
    res = spawn(2, "configs/default.yaml", *overrides(single, tmp_path / "par"), "train.compile=true", *layout)
    assert res.returncode == 0, launch_report(res)
    ours, ref = step_rows(tmp_path / "par"), step_rows(single.output_dir)
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
