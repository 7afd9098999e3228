"""Pipeline parallelism against the single-process run: same losses, same gradient for every parameter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plait.parallel.pipeline import split_layers, stage_indices, stages_per_rank
from tests.parallel.compare import launch_report, max_relative_diff
from tests.parallel.pipeline_models import build_model, reference_step

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("pipeline_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_pipeline(tmp_path: Path, nproc: int, schedule: str, microbatches: int, kind: str, dp: int = 1) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), str(WORKER), str(tmp_path), schedule,
           str(microbatches), kind, str(dp)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, launch_report(res)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]


@pytest.mark.parametrize("kind, schedule, microbatches", [
    ("mimo", "gpipe", 4),
    ("mimo", "1f1b", 4),
    ("mimo", "interleaved_1f1b", 4),
    ("mimo", "zbv", 4),
    ("m3", "1f1b", 2),
    # MTP depths on the last stage, fed the rolled embeddings stage 0 sends on
    ("mimo_mtp", "1f1b", 4),
    ("mimo_mtp", "zbv", 2),
    ("m3_mtp", "gpipe", 2),
    # an MoE aux loss on every stage: each MoE layer adds its gradient in the stage's own backward
    ("mimo_aux", "1f1b", 4),
    ("m3_mtp_aux", "zbv", 2),
    ("mimo-composition", "1f1b", 4),
    # MiniMax-M3-VL: vision tower and projector on stage 0, each microbatch fed its own images; MTP on the last
    ("m3vl_mtp", "1f1b", 4),
    ("m3vl", "gpipe", 2),
])
def test_two_ranks_match_the_single_process_step(tmp_path, kind, schedule, microbatches):
    ranks = run_pipeline(tmp_path, 2, schedule, microbatches, kind)
    max_relative_diff(ranks, *reference_step(kind, microbatches))


def test_two_replicas_of_a_two_stage_pipeline_sum_to_the_single_process_step(tmp_path):
    """pp=2 x dp=2 on plait's mesh: each replica runs half the rows, the stages' gradients are summed over the
    replicas, so every replica ends with the single-process gradient of the whole batch (an MoE aux loss on
    every stage, weighted over all four forwards of the step), and the gradient norm counts each parameter once."""
    microbatches = 2
    ranks = run_pipeline(tmp_path, 4, "1f1b", microbatches, "mimo_aux", dp=2)
    ref_grads, ref_losses = reference_step("mimo_aux", microbatches * 2)  # replica 0's forwards, then replica 1's
    assert [r["mesh"] for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # pipeline outermost, as in torchtitan
    for replica in (0, 1):
        worst = max_relative_diff([r for r in ranks if r["mesh"][1] == replica], ref_grads,
                                  ref_losses[replica * microbatches : (replica + 1) * microbatches])
        print(f"pp=2 x dp=2, replica {replica}: max relative gradient difference {worst:.1e}")
    ref_norm = sum(float(g.pow(2).sum()) for g in ref_grads.values()) ** 0.5
    assert [r["grad_norm"] for r in ranks] == pytest.approx([ref_norm] * 4, rel=1e-5)


def test_stage_placement_and_layer_splits():
    assert stage_indices("1f1b", 1, 2) == [1]
    assert stage_indices("interleaved_1f1b", 1, 2) == [1, 3]
    assert stage_indices("zbv", 0, 2) == [0, 3] and stage_indices("zbv", 1, 2) == [1, 2]
    assert stages_per_rank("interleaved_1f1b", 3) == 3
    keys = [str(i) for i in range(7)]
    assert [len(s) for s in split_layers(keys, 3)] == [3, 2, 2]
    assert [len(s) for s in split_layers(keys, 3, [1, 2, 4])] == [1, 2, 4]
    # balanced: the expensive last layer and the head get a stage of their own
    assert [len(s) for s in split_layers(keys, 2, layer_costs=[1, 1, 1, 1, 1, 1, 6], last_extra=1)] == [6, 1]
    with pytest.raises(ValueError, match="every stage needs at least one layer"):
        split_layers(keys, 8)
    with pytest.raises(ValueError, match="layers_per_stage"):
        split_layers(keys, 3, [1, 2, 3])
    with pytest.raises(ValueError, match="schedule"):
        stages_per_rank("zigzag")


def test_unsupported_models_are_refused_before_any_process_group_work():
    from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
    from plait.parallel.pipeline import check_pipelinable
    from tests.nn.reference import mimo_config

    with pytest.raises(ValueError, match="untied"):
        check_pipelinable(MiMoV2FlashForCausalLM.from_config(mimo_config(tie_word_embeddings=True)))
    assert build_model("mimo") is not None


# AdamW moves every element by up to lr per step, whatever its gradient's size, so float noise in a gradient
# that is mathematically zero (the key bias in the dimensions that RoPE leaves unrotated, for one) becomes
# update noise that grows with the activations' scale. A tenth of one step's largest update stays far above
# that noise (~1e-6 at lr 1e-3 over 4 steps) and far below what a missed or doubled update moves (~lr).
STEP_LR = 1e-3


def train_alone_and_under_torchrun(tmp_path: Path, data_cache, config: str, nproc: int, common: list[str],
                                   parallel: list[str]) -> tuple[list[dict], list[dict], subprocess.CompletedProcess]:
    """The same run in one process (tmp_path/single) and as `torchrun --nproc-per-node nproc` with the
    `parallel` overrides (tmp_path/parallel): (its step rows, the single process's step rows, its result)."""
    from rich.console import Console

    from plait.config import load_config
    from plait.metrics import read_metrics
    from plait.train import train
    from tests.conftest import SMALL_DATA

    common = [f"data.cache_dir={data_cache}", *SMALL_DATA, "train.steps=4", "train.batch_size=16",
              f"train.lr={STEP_LR}", "train.warmup_steps=1", "train.eval_every=0", "train.progress=false", "eval.num_samples=16",
              "eval.max_new_tokens=16", "checkpoint.every_steps=2", *common]
    train(load_config(config, [f"output_dir={tmp_path / 'single'}", *common]), console=Console(quiet=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "plait", "train", config,
           f"output_dir={tmp_path / 'parallel'}", *common, *parallel]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, launch_report(res)
    rows = [[r for r in read_metrics(tmp_path / d / "metrics.jsonl") if "lm_loss" in r] for d in ("parallel", "single")]
    return rows[0], rows[1], res


def assert_same_steps(ours: list[dict], ref: list[dict], keys: tuple[str, ...]) -> float:
    """Every logged step agrees within 1e-5 relative on `keys`; returns the largest relative difference."""
    assert len(ours) == len(ref) == 4
    worst = 0.0
    for a, b in zip(ours, ref):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
            worst = max(worst, abs(a[key] - b[key]) / abs(b[key]))
    return worst


def assert_same_weights(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], names) -> None:
    """`ours[name]` and `ref[name]` agree, for every name, within a tenth of one optimizer step's update."""
    for name in names:
        assert torch.allclose(ours[name], ref[name], rtol=1e-4, atol=0.1 * STEP_LR), (
            name, float((ours[name] - ref[name]).abs().max()))


def assert_same_export(tmp_path: Path) -> None:
    """The rank-0 export of the parallel run (every stage's weights) loads in one process and matches the
    single process's."""
    import plait

    whole = plait.from_pretrained(tmp_path / "parallel" / "checkpoints" / "step_4").state_dict()
    alone = plait.from_pretrained(tmp_path / "single" / "checkpoints" / "step_4").state_dict()
    assert whole.keys() == alone.keys()
    assert_same_weights(whole, alone, alone)


@pytest.mark.parametrize("config, depths, split", [
    # two MTP depths train on the last stage (their losses match too); layers split by estimated compute
    ("configs/mimo_v2_flash_tiny.yaml", 2, ["parallel.split=balanced"]),
    # the default model (native M3-VL with its MTP depth): the vision tower on stage 0, fed each microbatch's
    # images, the depth on the last; the stages named module by module
    ("configs/default.yaml", 1, ["parallel.stage_modules=[[vision_tower,multi_modal_projector,embed_tokens,layers.0],"
                                 "[layers.1,norm,lm_head,mtp]]"]),
], ids=["mimo-mtp-balanced", "m3vl-stage-modules"])
def test_pipelined_training_logs_the_single_process_losses_and_exports_a_whole_model(tmp_path, data_cache, config,
                                                                                      depths, split):
    ours, ref, res = train_alone_and_under_torchrun(
        tmp_path, data_cache, config, 2, [f"model.mtp.num_layers={depths}"],
        ["parallel.pp=2", "parallel.microbatches=4", "parallel.schedule=1f1b", *split])
    assert_same_steps(ours, ref, ("loss", "lm_loss", "grad_norm", *(f"mtp_loss_{d}" for d in range(1, depths + 1))))
    assert_same_export(tmp_path)
    assert res.stdout.count("held-out accuracy: ") == 1


def test_two_replicas_of_a_pipeline_log_the_single_process_steps(tmp_path, data_cache):
    """pp=2 x dp=2: four processes, each replica a 2-stage pipeline over its half of every batch. The logged
    losses (an MTP depth's too), grad norms, token counts and expert loads are the whole step's, and the
    export matches the single process's."""
    ours, ref, res = train_alone_and_under_torchrun(
        tmp_path, data_cache, "configs/mimo_v2_flash_tiny.yaml", 4, ["model.mtp.num_layers=1"],
        ["parallel.pp=2", "parallel.dp=2", "parallel.microbatches=2", "parallel.schedule=1f1b"])
    worst = assert_same_steps(ours, ref, ("loss", "lm_loss", "mtp_loss_1", "grad_norm", "moe_load_imbalance"))
    print(f"pp=2 x dp=2: largest relative difference from the single process {worst:.1e}")
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in ref]
    assert {r["world_size"] for r in ours} == {4}
    assert_same_export(tmp_path)
    assert res.stdout.count("held-out accuracy: ") == 1


def test_the_training_state_resumes_across_pipeline_layouts(tmp_path, data_cache):
    """The DCP training state (model, AdamW state by full-model names, scheduler, data position, RNG) of a
    single-process run resumes under parallel.pp=2, and the one the pipelined run saves resumes in a single
    process: both continue with the losses of the uninterrupted run."""
    import shutil

    from rich.console import Console

    from plait.config import load_config
    from plait.metrics import read_metrics
    from plait.train import train
    from tests.conftest import SMALL_DATA

    config, out = "configs/mimo_v2_flash_tiny.yaml", tmp_path / "run"
    common = [f"output_dir={out}", f"data.cache_dir={data_cache}", *SMALL_DATA, "train.steps=6", "train.batch_size=8",
              "train.warmup_steps=1", "train.eval_every=0", "train.progress=false", "eval.num_samples=8",
              "eval.max_new_tokens=8", "checkpoint.every_steps=2", "train.resume=auto", "model.mtp.num_layers=1"]

    def steps() -> dict[int, dict]:
        return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "lm_loss" in r}

    def drop(*names: str) -> None:
        for name in names:
            shutil.rmtree(out / "checkpoints" / name)

    train(load_config(config, common), console=Console(quiet=True))
    uninterrupted = steps()
    drop("step_4", "step_6")  # as if the run had died after saving step 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "plait", "train", config, *common,
           "parallel.pp=2", "parallel.microbatches=2", "parallel.layers_per_stage=[3,1]"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, launch_report(res)
    assert "resumed from step 2" in res.stdout
    assert len(list((out / "checkpoints" / "step_4" / "training_state").glob("*.distcp"))) == 2  # one per stage
    drop("step_6")  # the pipelined run died after saving step 4: continue it in one process
    console = Console(record=True, width=200)
    train(load_config(config, common), console=console)
    assert "resumed from step 4" in console.export_text()
    resumed = steps()
    assert sorted(resumed) == sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    worst = 0.0
    for step in (3, 4, 5, 6):  # 3 and 4 by the pipeline, 5 and 6 by the single process again
        for key in ("loss", "lm_loss", "mtp_loss_1", "grad_norm"):
            a, b = resumed[step][key], uninterrupted[step][key]
            assert a == pytest.approx(b, rel=1e-5), (step, key)
            worst = max(worst, abs(a - b) / abs(b))
    print(f"resumed across layouts: largest relative difference from the uninterrupted run {worst:.1e}")


def test_patch_flattened_images_are_cut_per_microbatch():
    """M3-style pixels (one row per patch, a grid per image): each microbatch gets exactly its rows' patches."""
    from plait.parallel.pipeline import _vlm_pixel_values_chunks

    grid = torch.tensor([[1, 2, 2], [1, 2, 3], [1, 1, 2]])  # 4, 6 and 2 patches
    pixels = torch.arange(12).float().unsqueeze(1)
    chunks = _vlm_pixel_values_chunks(pixels, [0, 1, 0, 2], 2, pixel_rows_per_image=grid.prod(-1), image_grid_thw=grid)
    assert torch.equal(chunks[0]["pixel_values"], pixels[:4]) and torch.equal(chunks[0]["image_grid_thw"], grid[:1])
    assert torch.equal(chunks[1]["pixel_values"], pixels[4:]) and torch.equal(chunks[1]["image_grid_thw"], grid[1:])
    with pytest.raises(ValueError, match="pixel_rows_per_image: expected counts adding up to the 12 rows"):
        _vlm_pixel_values_chunks(pixels, [0, 1, 0, 2], 2, pixel_rows_per_image=torch.tensor([4, 6, 1]))


def test_balanced_split_weighs_active_parameters_and_the_first_and_last_stage_extras():
    """MoE layers count top_k / num_experts of their experts; the vision tower goes to the first stage's bill,
    the head and the MTP depths to the last's."""
    from plait.nn.moe import MoE
    from plait.parallel.pipeline import estimated_stage_costs, native_stage_parts
    from tests.parallel.pipeline_models import build_model

    def count(module):
        return sum(p.numel() for p in module.parameters())

    model = build_model("m3vl_mtp")
    layer = model.language_model.layers["1"]
    moe = next(m for m in layer.modules() if isinstance(m, MoE))
    costs, first, last = estimated_stage_costs(native_stage_parts(model))
    assert len(costs) == len(model.language_model.layers)
    assert costs[1] == pytest.approx(count(layer) - count(moe.experts) * (1 - moe.cfg.top_k / moe.cfg.num_experts))
    head = model.lm_head.weight.numel()
    assert first == pytest.approx(count(model.vision_tower) + count(model.multi_modal_projector))  # lookups are free
    assert last > 3 * head  # the head, plus the head again for each of the two MTP depths
    # MiMo-V2-Flash with two MTP depths: the head-heavy last stage gets one of the four layers, not two
    mimo = build_model("mimo_mtp")
    costs, first, last = estimated_stage_costs(native_stage_parts(mimo))
    assert first == 0.0 and last > sum(costs[-2:])
    assert split_layers(list(mimo.model.layers.keys()), 2, layer_costs=costs, first_extra=first,
                        last_extra=last) == [["0", "1", "2"], ["3"]]


def test_stage_modules_name_every_stage_and_a_bad_list_is_refused_naming_the_entry():
    from plait.parallel.pipeline import choose_split, native_stage_parts

    parts = native_stage_parts(build_model("m3vl_mtp"))
    assert parts.names() == ["vision_tower", "multi_modal_projector", "embed_tokens", "layers.0", "layers.1",
                             "layers.2", "norm", "lm_head", "mtp"]
    first, last = ["vision_tower", "multi_modal_projector", "embed_tokens"], ["norm", "lm_head", "mtp"]
    assert choose_split(parts, 2, stage_modules=[[*first, "layers.0"], ["layers.1", "layers.2", *last]]) == [
        ["0"], ["1", "2"]]
    bad = {
        "expected 2 stages .*, got 3": [[*first, "layers.0"], ["layers.1"], ["layers.2", *last]],
        r"\[1\]: 'layers.3' is not a module of this model; expected one of \['vision_tower'":
            [[*first, "layers.0", "layers.1"], ["layers.2", "layers.3", *last]],
        "'layers.1' is listed on stage 0 and again on stage 1": [[*first, "layers.0", "layers.1"],
                                                                ["layers.1", "layers.2", *last]],
        r"\[1\]: 'embed_tokens' runs on the first stage; expected it in stage 0, got it in stage 1":
            [["vision_tower", "multi_modal_projector", "layers.0"], ["embed_tokens", "layers.1", "layers.2", *last]],
        r"\[0\]: 'lm_head' runs on the last stage; expected it in stage 1, got it in stage 0":
            [[*first, "layers.0", "lm_head"], ["layers.1", "layers.2", "norm", "mtp"]],
        r"\['mtp'\] not listed": [[*first, "layers.0"], ["layers.1", "layers.2", "norm", "lm_head"]],
        r"\['layers.2'\] not listed": [[*first, "layers.0"], ["layers.1", *last]],
        "out of model order: 'layers.1' where 'layers.0' comes next": [[*first, "layers.1"],
                                                                       ["layers.0", "layers.2", *last]],
        r"\[1\]: \['norm', 'lm_head', 'mtp'\] holds no decoder layer": [[*first, "layers.0", "layers.1", "layers.2"],
                                                                          last],
    }
    for message, stage_modules in bad.items():
        with pytest.raises(ValueError, match=message):
            choose_split(parts, 2, stage_modules=stage_modules)


def test_the_stages_of_one_rank_merge_under_the_full_models_names():
    """A looped or V schedule puts several stages on a rank: one module tree holds them at the whole model's
    paths (so the optimizer and the checkpoint name parameters as a single process does), shared, not copied."""
    from plait.parallel.pipeline import make_stage_module, merge_stage_models

    model = build_model("mimo_mtp")
    split = split_layers(list(model.model.layers.keys()), 4)
    stages = [make_stage_module(model, s, split).model for s in (0, 3)]  # rank 0 of a V schedule on 2 ranks
    own = [dict(m.named_parameters()) for m in stages]
    merged = dict(merge_stage_models(stages).named_parameters())
    assert merged.keys() == own[0].keys() | own[1].keys()
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.gate.weight",
            "lm_head.weight", "model.mtp.layers.0.eh_proj.weight"} <= merged.keys()
    assert all(merged[name] is p for params in own for name, p in params.items())
    assert [dict(m.named_parameters()).keys() for m in stages] == [params.keys() for params in own]  # left as they are
    assert merge_stage_models(stages).state_dict().keys() <= model.state_dict().keys()
    twice = [make_stage_module(model, 0, split).model for _ in range(2)]
    with pytest.raises(ValueError, match="parameter 'model.embed_tokens.weight' is held by two stages"):
        merge_stage_models(twice)


def test_split_settings_are_checked():
    from plait.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="set one of them"):
        load_config("configs/default.yaml", ["parallel.pp=2", "parallel.split=balanced", "parallel.layers_per_stage=[1,1]"])
    with pytest.raises(ConfigError, match="only used with parallel.pp > 1"):
        load_config("configs/default.yaml", ["parallel.split=balanced"])


def test_training_only_the_mtp_depths_in_a_pipeline_logs_the_single_process_losses(tmp_path, data_cache,
                                                                                   trained_checkpoint_without_mtp):
    """model.mtp.train_only under parallel.pp=2: the last stage's copy of the fresh depths trains, every other
    stage stays frozen (and saves no optimizer state), and the run logs the single process's losses; the
    export's trunk is the checkpoint's, bit for bit, and its depths are the single process's."""
    from safetensors.torch import load_file

    ours, ref, _ = train_alone_and_under_torchrun(
        tmp_path, data_cache, "configs/default.yaml", 2,
        ["model.preset=null", f"model.pretrained={trained_checkpoint_without_mtp}", "model.mtp.num_layers=1",
         "model.mtp.train_only=true"],
        ["parallel.pp=2", "parallel.microbatches=2", "parallel.schedule=1f1b"])
    # (not moe_load_imbalance: the pipeline pads every batch to the longest sample, and expert loads count pads)
    assert_same_steps(ours, ref, ("loss", "mtp_loss_1", "grad_norm"))
    before = load_file(trained_checkpoint_without_mtp / "model.safetensors")
    after = load_file(tmp_path / "parallel" / "checkpoints" / "step_4" / "model.safetensors")
    alone = load_file(tmp_path / "single" / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(after[name], t) for name, t in before.items())
    depths = [n for n in after if ".mtp." in n]
    assert depths
    assert_same_weights(after, alone, depths)
