"""FSDP2 (`parallel.dp_shard`) against the single-process run: same global batch, same losses, gradient norms,
exported weights; its sharded training state resumes in a single process (gloo, 2 processes)."""

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import plait
from plait.parallel.fsdp import blocks
from plait.train import train
from tests.parallel.compare import launch_report
from tests.parallel.test_data_parallel import overrides, spawn, step_rows


def _config(*overrides: str):
    from plait.config import load_config

    return load_config("configs/default.yaml", list(overrides))


@pytest.fixture(scope="module")
def single_and_sharded(tmp_path_factory, data_cache):
    """The default model (MiniMax-M3-VL with an MTP depth), 4 steps with a checkpoint at step 2: once in one
    process, once sharded over 2. Returns the single run's config, its overrides without output_dir, the
    sharded run's dir and its launch."""
    from tests.conftest import SMALL_DATA

    out = tmp_path_factory.mktemp("fsdp")
    base = [f"data.cache_dir={data_cache}", *SMALL_DATA, "train.steps=4", "train.batch_size=16",
            "train.warmup_steps=1", "train.eval_every=0", "train.progress=false", "eval.num_samples=8",
            "eval.max_new_tokens=8", "checkpoint.every_steps=2"]
    single = _config(f"output_dir={out / 'single'}", *base)
    train(single, console=Console(quiet=True))
    res = spawn(2, "configs/default.yaml", *overrides(single, out / "sharded"), "parallel.dp_shard=2")
    assert res.returncode == 0, launch_report(res)
    return single, base, out / "sharded", res


def test_two_sharded_processes_log_the_single_process_losses(single_and_sharded):
    single, _, sharded, res = single_and_sharded
    ours, ref = step_rows(sharded), step_rows(single.output_dir)
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        assert a["world_size"] == 2
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["mtp_loss_1"] == pytest.approx(b["mtp_loss_1"], rel=1e-5)
    assert res.stdout.count("held-out accuracy: ") == 1  # every rank evaluates (the forward needs all), one speaks


def test_the_export_is_the_whole_model_and_the_state_is_sharded(single_and_sharded):
    single, _, sharded, _ = single_and_sharded
    ckpt, ref_ckpt = sharded / "checkpoints" / "step_4", single.output_dir / "checkpoints" / "step_4"
    ours, ref = load_file(ckpt / "model.safetensors"), load_file(ref_ckpt / "model.safetensors")
    earlier = load_file(single.output_dir / "checkpoints" / "step_2" / "model.safetensors")
    assert ours.keys() == ref.keys()
    # AdamW divides each gradient by its own running scale, so where a gradient is near zero its float noise
    # (1e-7 of the losses) becomes a visible share of the step: each tensor within 2% of how far its last two
    # steps moved it (measured: at most 0.6%)
    for name, t in ours.items():
        moved = (ref[name] - earlier[name]).abs().max().item()
        assert (t - ref[name]).abs().max().item() <= 0.02 * moved + 1e-7, name
    assert plait.from_pretrained(ckpt).config.model_type == "minimax_m3_vl"
    assert len(list((ckpt / "training_state").glob("*.distcp"))) == 2


def test_a_sharded_checkpoint_resumes_in_one_process_with_the_same_losses(single_and_sharded, tmp_path):
    import shutil

    import yaml

    single, base, sharded, _ = single_and_sharded
    # the sharded run's step-2 checkpoint, continued in a single process (DCP reshards the state on load); the
    # copy's saved run config names its new output_dir, so the resume accepts it as the same run
    run = tmp_path / "resumed"
    ckpt = run / "checkpoints" / "step_2"
    shutil.copytree(sharded / "checkpoints" / "step_2", ckpt)
    shutil.copy(sharded / "metrics.jsonl", run / "metrics.jsonl")
    saved = yaml.safe_load((ckpt / "plait_run.yaml").read_text())
    (ckpt / "plait_run.yaml").write_text(yaml.safe_dump({**saved, "output_dir": str(run)}, sort_keys=False))
    train(_config(f"output_dir={run}", *base, "train.resume=auto"), console=Console(quiet=True))
    ours, ref = step_rows(run), step_rows(single.output_dir)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(ours[2:], ref[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["world_size"] == 1


def _tiny_default_model():
    """The default run's model (MiniMax-M3-VL with one MTP depth) for a 64-token vocabulary."""
    from plait.models.build import build_model

    return build_model(_config().model, 64, {"pad": 0, "bos": 1, "eos": 2, "image": 3, "video": 4}, 48)


@pytest.fixture
def one_process_group():
    """A gloo group of this process alone: FSDP2 over a 1-rank mesh runs its gathers, casts and reductions."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_bfloat16_gathers_run_the_layers_on_bfloat16_weights_and_keep_float32_shards_and_gradients(
        one_process_group):
    from plait.models.vlm import vlm_spec
    from plait.parallel.fsdp import apply_fsdp

    torch.manual_seed(0)
    model = apply_fsdp(_tiny_default_model(), one_process_group, torch.bfloat16)
    seen = {}
    # a decoder layer's attention and router, a vision layer, an MTP depth's own layer and its fusion projection
    # (a group of its own), the root's projector and LM head
    watched = ("language_model.layers.0.self_attn.q_proj", "language_model.layers.1.mlp.gate",
               "vision_tower.layers.1.mlp.fc1", "language_model.mtp.layers.0.transformer_layer.self_attn",
               "language_model.mtp.layers.0.eh_proj", "multi_modal_projector", "lm_head")

    def record(name):
        def hook(module, args):
            seen.setdefault(name, {p.dtype for p in module.parameters()})
        return hook

    for name in watched:
        model.get_submodule(name).register_forward_pre_hook(record(name))
    ids = torch.randint(5, 64, (2, 12))
    ids[:, 1:10] = 3  # 9 image placeholders: one 48 px image each
    pixels = torch.rand(2, 3, 48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, **vlm_spec("minimax_m3_vl").vision_inputs(model.config, pixels))
    out.loss.backward()
    assert set(seen) == set(watched)
    assert all(dtypes == {torch.bfloat16} for dtypes in seen.values()), seen
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
    assert torch.isfinite(out.loss)


def test_under_bf16_autocast_two_shards_gather_bfloat16_and_follow_the_single_process_run(single_and_sharded,
                                                                                             tmp_path):
    # bf16 autocast on the CPU (slow matmuls, but these are tiny): the shards gather bfloat16 parameters
    # (parallel.fsdp_param_dtype=auto). Under autocast the sums over ranks, in another order than one process
    # sums, move bf16 roundings: measured 2e-4..6e-4 on the losses with float32 or bfloat16 gathers alike
    single, base, _, _ = single_and_sharded
    ref = _config(f"output_dir={tmp_path / 'single'}", *base, "train.autocast=bf16")
    train(ref, console=Console(quiet=True))
    res = spawn(2, "configs/default.yaml", *overrides(ref, tmp_path / "sharded"), "parallel.dp_shard=2",
                "train.autocast=bf16")
    assert res.returncode == 0, launch_report(res)
    ours, theirs = step_rows(tmp_path / "sharded"), step_rows(ref.output_dir)
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=3e-3)
    assert [r["mtp_loss_1"] for r in ours] == pytest.approx([r["mtp_loss_1"] for r in theirs], rel=3e-3)
    weights = load_file(tmp_path / "sharded" / "checkpoints" / "step_4" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the float32 master weights are exported


def test_bfloat16_parameters_need_bf16_autocast():
    from plait.config import ConfigError
    from plait.parallel.fsdp import fsdp_param_dtype

    assert fsdp_param_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert fsdp_param_dtype("auto", None) == torch.float32
    assert fsdp_param_dtype("float32", torch.bfloat16) == torch.float32
    with pytest.raises(ValueError, match="bfloat16 parameters need the step under bf16 autocast .* but it runs in "
                                         "float32"):
        fsdp_param_dtype("bfloat16", None)
    with pytest.raises(ConfigError, match="parallel.fsdp_param_dtype='bfloat16' with train.autocast='off'"):
        _config("parallel.dp_shard=2", "parallel.fsdp_param_dtype=bfloat16", "train.autocast=off")
    with pytest.raises(ConfigError, match="parallel.fsdp_param_dtype='float32': only used with parallel.dp_shard > 1"):
        _config("parallel.fsdp_param_dtype=float32")


def test_every_decoder_mtp_and_vision_layer_is_a_block_of_its_own():
    model = _tiny_default_model()
    found = blocks(model)
    text, vision = model.config.text_config, model.config.vision_config
    assert model.mtp_config.num_layers == 1
    assert len(found) == text.num_hidden_layers + vision.num_hidden_layers + model.mtp_config.num_layers
    assert len({id(b) for b in found}) == len(found)


def test_sharding_with_a_pipeline_or_a_mimo_model_is_refused_by_name(small_config):
    from plait.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.dp_shard=2 with parallel.pp=2: sharded pipeline stages are not "
                                          "supported yet"):
        small_config("parallel.dp_shard=2", "parallel.pp=2")
    cfg = small_config("parallel.dp_shard=2")
    with pytest.raises(ValueError, match=r"parallel.dp x parallel.dp_shard = 1 x 2 = 2 processes expected, but 1 "
                                         r"were launched"):
        train(cfg, console=Console(quiet=True))
    with pytest.raises(ConfigError, match=r"must be divisible by train.grad_accum x parallel.dp x parallel.dp_shard "
                                          r"\(1 x 1 x 3\)"):
        small_config("parallel.dp_shard=3")


@pytest.mark.slow
def test_hsdp_two_replicas_of_two_shards_log_the_single_process_losses(single_and_sharded, tmp_path):
    single, _, _, _ = single_and_sharded
    res = spawn(4, "configs/default.yaml", *overrides(single, tmp_path / "hsdp"), "parallel.dp=2",
                "parallel.dp_shard=2")
    assert res.returncode == 0, launch_report(res)
    ours, ref = step_rows(tmp_path / "hsdp"), step_rows(single.output_dir)
    assert [r["world_size"] for r in ours] == [4] * 4
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert [r["grad_norm"] for r in ours] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-5)


@pytest.mark.slow
def test_a_stock_transformers_model_shards_too(single_and_sharded, tmp_path):
    # Mistral3 through transformers' own classes: its decoder and vision layers are the blocks
    _, base, _, _ = single_and_sharded
    stock = ["model.preset=tiny-mistral3", "model.mtp.num_layers=0", "train.steps=3"]
    single = _config(f"output_dir={tmp_path / 'single'}", *base, *stock)
    train(single, console=Console(quiet=True))
    res = spawn(2, "configs/default.yaml", *overrides(single, tmp_path / "sharded"), *stock, "parallel.dp_shard=2")
    assert res.returncode == 0, launch_report(res)
    ours, ref = step_rows(tmp_path / "sharded"), step_rows(single.output_dir)
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert plait.from_pretrained(tmp_path / "sharded" / "checkpoints" / "step_3").config.model_type == "mistral3"
