"""Stock transformers models as pipeline stages against transformers' own single-process forward: same losses,
same gradient for every parameter (gloo; one spawn per model family runs every schedule)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plait.parallel.pipeline import SCHEDULES
from tests.parallel.compare import launch_report, max_relative_diff
from tests.parallel.hf_pipeline_models import build_model, reference_step

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("hf_pipeline_worker.py")
ROOT = Path(__file__).resolve().parents[2]


FAMILIES = ["llama", "mistral3", "gemma4", "gemma4_moe", "gemma4_vlm"]


def run_schedules(out: Path, nproc: int, microbatches: int, layers: int) -> dict[tuple[str, str], list[dict]]:
    """One launch: every family, every schedule; {(family, schedule): each rank's gradients and losses}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), str(WORKER), str(out), str(microbatches),
           str(layers), ",".join(FAMILIES), *SCHEDULES]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, launch_report(res)
    return {(k, s): [torch.load(out / f"{k}.{s}.rank{r}.pt") for r in range(nproc)] for k in FAMILIES for s in SCHEDULES}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_schedules(tmp_path_factory.mktemp("hf-pp2"), 2, microbatches=4, layers=4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_schedule_on_two_ranks_matches_the_single_process_step(two_ranks, kind):
    ref_grads, ref_losses = reference_step(kind, microbatches=4)
    for schedule in SCHEDULES:
        worst = max_relative_diff(two_ranks[kind, schedule], ref_grads, ref_losses)
        print(f"{kind} {schedule}: max relative gradient difference {worst:.2e}")


@pytest.mark.slow
def test_every_schedule_on_four_ranks_matches_the_single_process_step(tmp_path):
    # 8 layers: the looped and V schedules place two one-layer stages on each of the 4 ranks
    runs = run_schedules(tmp_path, 4, microbatches=8, layers=8)
    for kind in FAMILIES:
        ref_grads, ref_losses = reference_step(kind, microbatches=8, layers=8)
        for schedule in SCHEDULES:
            worst = max_relative_diff(runs[kind, schedule], ref_grads, ref_losses)
            print(f"{kind} {schedule} x4: max relative gradient difference {worst:.2e}")


def _stages(model, num_stages: int):
    from plait.parallel.hf_pipeline import hf_layer_keys, make_hf_stage
    from plait.parallel.pipeline import split_layers

    split = split_layers(hf_layer_keys(model), num_stages)
    return [make_hf_stage(model, s, split) for s in range(num_stages)]


def test_stages_chained_in_one_process_give_transformers_logits():
    from tests.parallel.hf_pipeline_models import _images_of_rows, make_batch

    for kind in ("llama", "mimo_v2_flash", "mistral3", "gemma4", "gemma4_vlm"):
        model = build_model(kind)
        ids, _, vision = make_batch(kind)
        ref = model(input_ids=ids, **_images_of_rows(vision, slice(0, 8)) if vision else {}).logits
        stages = _stages(model, 4)
        hidden = stages[0](*stages[0].feed(ids, vision, 1))
        for stage in stages[1:]:
            hidden = stage(hidden)
        assert torch.equal(hidden, ref), kind
        # pruned like plait's own stages: layer keys unchanged, embedding / vision first, norm and head last
        names = [{n for n, _ in s.model.named_parameters()} for s in stages]
        assert set().union(*names) == {n for n, _ in model.named_parameters()}
        assert not any(n.startswith(("model.vision_tower", "model.multi_modal_projector")) for n in names[1])
        assert "lm_head.weight" in names[3] and "lm_head.weight" not in names[2]


def test_stock_models_split_by_module_names_or_balanced_by_estimated_compute():
    """The names and the compute estimate of plait's native split, for stock models: Gemma4's per-layer input
    embeddings go with the embedding, its vision tower's compute to the first stage; a transformers MoE layer
    counts top_k / num_experts of its experts."""
    from plait.parallel.hf_pipeline import hf_stage_parts, make_hf_stage
    from plait.parallel.pipeline import choose_split, estimated_stage_costs

    model = build_model("gemma4_vlm")
    parts = hf_stage_parts(model)
    first = ["vision_tower", "embed_vision", "embed_tokens", "embed_tokens_per_layer", "per_layer_model_projection",
             "per_layer_projection_norm"]
    assert parts.names() == [*first, "layers.0", "layers.1", "layers.2", "layers.3", "norm", "lm_head"]
    split = choose_split(parts, 2, stage_modules=[[*first, "layers.0", "layers.1", "layers.2"],
                                                  ["layers.3", "norm", "lm_head"]])
    assert split == [["0", "1", "2"], ["3"]]
    last = make_hf_stage(model, 1, split)
    assert list(last.model.model.language_model.layers.keys()) == ["3"]
    assert not any("embed" in n or "vision" in n for n, _ in last.model.named_parameters())
    with pytest.raises(ValueError, match=r"'embed_tokens_per_layer' runs on the first stage; expected it in stage 0"):
        choose_split(parts, 2, stage_modules=[[f for f in first if f != "embed_tokens_per_layer"] + ["layers.0"],
                                              ["embed_tokens_per_layer", "layers.1", "layers.2", "layers.3", "norm",
                                               "lm_head"]])
    # the vision tower costs more than any decoder layer: balanced, the first stage keeps one layer (even: two)
    costs, first_extra, _ = estimated_stage_costs(parts)
    assert first_extra > max(costs)
    assert [len(s) for s in choose_split(parts, 2, split="balanced")] == [1, 3]
    assert [len(s) for s in choose_split(parts, 2)] == [2, 2]
    moe = build_model("mimo_v2_flash")  # transformers' MiMo-V2-Flash: 2 of 8 experts per token
    layer = moe.model.layers[1]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    costs, _, _ = estimated_stage_costs(hf_stage_parts(moe))
    assert costs[1] == pytest.approx(count(layer) - count(layer.mlp.experts) * (1 - 2 / 8))


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_the_cached_causal_mask_equals_the_rebuilt_one(sliding_window):
    from transformers import MistralForCausalLM

    from plait.models.hf import to_hf_config
    from plait.parallel.hf_pipeline import _build_masks, _build_or_reuse_pp_causal_mask

    cfg = to_hf_config({"model_type": "mistral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "sliding_window": sliding_window, "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = MistralForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 10))
    ref = model(input_ids=ids).logits
    (stage,) = _stages(model, 1)
    embeds = torch.zeros(2, 10, 32)
    cached = _build_or_reuse_pp_causal_mask(stage.model.model, embeds, None, None)
    assert _build_or_reuse_pp_causal_mask(stage.model.model, embeds, None, None) is cached  # built once per stage
    rebuilt = _build_masks(stage.model.model, embeds, torch.ones(2, 10, dtype=torch.long), None)
    assert cached.keys() == rebuilt.keys() == {"full_attention"}
    a, b = cached["full_attention"], rebuilt["full_attention"]
    assert torch.equal(a.expand_as(b), b)
    blocked = (b[0, 0] != 0)
    assert blocked[9, 0] == (sliding_window is not None) and not blocked[9, 9] and blocked[0, 9]
    # the whole stage: cached path, rebuilt path (explicit all-ones mask) and transformers agree
    assert torch.equal(stage(ids), ref)
    assert torch.equal(stage.model(ids, attention_mask=torch.ones(2, 10, dtype=torch.long)), ref)


def test_pixel_values_are_cut_per_microbatch_even_after_text_only_microbatches():
    from plait.parallel.hf_pipeline import _vlm_pixel_values_chunks

    pixels = torch.arange(4.0).view(4, 1, 1, 1)
    sizes = torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4]])
    chunks = _vlm_pixel_values_chunks(pixels, [0, 0, 0, 0, 1, 2, 1, 0], 4, image_sizes=sizes)
    assert chunks[0] is None and chunks[1] is None
    assert chunks[2]["pixel_values"].flatten().tolist() == [0.0, 1.0, 2.0]
    assert chunks[2]["image_sizes"].tolist() == [[1, 1], [2, 2], [3, 3]]
    assert chunks[3]["pixel_values"].flatten().tolist() == [3.0]
    with pytest.raises(ValueError, match=r"adding up to the 4 images in pixel_values, got \[0, 0, 0, 0, 1, 2, 1, 1\]"):
        _vlm_pixel_values_chunks(pixels, [0, 0, 0, 0, 1, 2, 1, 1], 4)
    with pytest.raises(ValueError, match="8 rows do not split into 3 equal microbatches"):
        _vlm_pixel_values_chunks(pixels, [0, 0, 0, 0, 1, 2, 1, 0], 3)
    with pytest.raises(ValueError, match=r"image_sizes: expected one entry per image \(4\), got 3"):
        _vlm_pixel_values_chunks(pixels, [0, 0, 0, 0, 1, 2, 1, 0], 4, image_sizes=sizes[:3])


def test_what_cannot_be_pipelined_is_refused_with_the_reason():
    from transformers import T5ForConditionalGeneration

    from plait.models.hf import build_stock_model, to_hf_config
    from plait.parallel.hf_pipeline import validate_hf_model_for_pipeline_support
    from tests.parallel.hf_pipeline_models import CONFIGS

    tied = build_stock_model(to_hf_config({**CONFIGS["llama"](2), "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="expected untied input and output embeddings"):
        validate_hf_model_for_pipeline_support(tied)
    t5 = T5ForConditionalGeneration._from_config(to_hf_config({"model_type": "t5", "vocab_size": 64, "d_model": 16,
                                                               "d_ff": 32, "num_layers": 1, "num_heads": 2, "d_kv": 8}))
    with pytest.raises(ValueError, match="encoder-decoder model; expected a decoder-only one"):
        validate_hf_model_for_pipeline_support(t5)
    llava = build_stock_model(to_hf_config({
        "model_type": "llava", "text_config": {**CONFIGS["llama"](2), "model_type": "llama"},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 4, "image_size": 16}}))
    with pytest.raises(ValueError, match="model_type 'llava' .* has no pipeline forward that routes its images"):
        validate_hf_model_for_pipeline_support(llava)
    type(llava)._pp_keep_self_forward = True  # a class whose own forward is stage-aware opts out
    try:
        validate_hf_model_for_pipeline_support(llava)
    finally:
        del type(llava)._pp_keep_self_forward
    model = build_model("llama")
    model.config.use_cache = True
    validate_hf_model_for_pipeline_support(model)
    assert model.config.use_cache is False  # switched off, not refused


@pytest.mark.parametrize("kind", ["mistral3", "gemma4_vlm"])  # YaRN + vision rotary; per-type rotary + embed scales
def test_buffers_are_recomputed_after_meta_construction(kind):
    from plait.parallel.hf_pipeline import init_hf_model_buffers
    from tests.parallel.hf_pipeline_models import _images_of_rows, make_batch

    ref = build_model(kind)
    with torch.device("meta"):
        model = build_model(kind)
    model = model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    init_hf_model_buffers(model, "cpu")
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        assert torch.equal(b, ref_buffers[name]), name
    ids, _, vision = make_batch(kind)
    images = _images_of_rows(vision, slice(0, 8))
    assert torch.equal(model(input_ids=ids, **images).logits, ref(input_ids=ids, **images).logits)


STOCK_RUNS = {
    # the default VLM preset as stock transformers Mistral3 (untied: the head lives on the last stage only), its
    # layers split by estimated compute
    "tiny-mistral3": ("configs/default.yaml", ["model.preset=tiny-mistral3", "model.config.tie_word_embeddings=false",
                                               "model.config.text_config.tie_word_embeddings=false"],
                      ["parallel.schedule=1f1b", "parallel.split=balanced"], "sdpa"),
    # a stock text LM: transformers' own MiMo-V2-Flash (sliding + full layers, MoE), two stages per rank, each
    # named module by module
    "stock-mimo-v2-flash": ("configs/mimo_v2_flash_tiny.yaml", [],
                            ["parallel.schedule=interleaved_1f1b", "parallel.stage_modules=[[embed_tokens,layers.0],"
                             "[layers.1],[layers.2],[layers.3,norm,lm_head]]"], "eager"),
}


@pytest.mark.parametrize("run", sorted(STOCK_RUNS))
def test_pipelined_training_of_stock_models_logs_the_single_process_losses(tmp_path, data_cache, run):
    """A single-process checkpoint trained on by a pipelined run and by a single process: same losses, and the
    pipelined export loads in a single process with the same weights (checkpoints go both ways)."""
    from rich.console import Console

    import plait
    from plait.config import load_config
    from plait.metrics import read_metrics
    from plait.train import train
    from tests.conftest import SMALL_DATA

    config, preset_overrides, pipeline, attn = STOCK_RUNS[run]
    common = [f"data.cache_dir={data_cache}", *SMALL_DATA, "train.steps=2", "train.batch_size=8",
              "train.warmup_steps=1", "train.eval_every=0", "train.progress=false", "eval.num_samples=8",
              "eval.max_new_tokens=8", "model.implementation=transformers", f"model.attn_implementation={attn}",
              "model.mtp.num_layers=0"]  # stock models have no MTP depths (the default config trains one)
    start = train(load_config(config, [f"output_dir={tmp_path / 'start'}", "train.num_threads=1", *common,
                                       *preset_overrides]), console=Console(quiet=True)).checkpoint_dir
    common += ["model.preset=null", f"model.pretrained={start}"]
    # the single process accumulates the pipeline's 4 microbatches (same sums in the same order)
    single = load_config(config, [f"output_dir={tmp_path / 'single'}", "train.num_threads=1", "train.grad_accum=4",
                                  *common])
    train(single, console=Console(quiet=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "plait", "train", config,
           f"output_dir={tmp_path / 'pp2'}", *common, "parallel.pp=2", "parallel.microbatches=4", *pipeline]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, launch_report(res)
    ours = [r for r in read_metrics(tmp_path / "pp2" / "metrics.jsonl") if "lm_loss" in r]
    ref = [r for r in read_metrics(single.output_dir / "metrics.jsonl") if "lm_loss" in r]
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # rank 0 gathers every stage into one stock model dir that loads in a single process. The two runs clip with
    # norms equal to ~1e-7 and AdamW divides each gradient entry by its own RMS, so entries with near-zero
    # gradients (an expert that saw few tokens) move apart by up to ~2e-6 (measured). Each tensor moved by
    # ~1.5e-3 over the two steps: a stage left out of the gather, or trained wrongly, differs by that much.
    whole, alone, before = (plait.from_pretrained(d / "checkpoints" / "step_2", attn_implementation=attn,
                                                  implementation="transformers")
                            for d in (tmp_path / "pp2", single.output_dir, tmp_path / "start"))
    ref, start = alone.state_dict(), before.state_dict()
    assert whole.state_dict().keys() == ref.keys()
    for name, a in whole.named_parameters():
        assert (a - ref[name]).abs().max() < 1e-5, name
        assert (ref[name] - start[name]).abs().max() > 1e-3, name


def test_a_tied_stock_model_is_refused_before_any_stage_is_built(tmp_path, data_cache):
    from tests.conftest import SMALL_DATA

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "plait", "train", "configs/default.yaml",
           f"output_dir={tmp_path / 'tied'}", f"data.cache_dir={data_cache}", *SMALL_DATA, "train.steps=1",
           "train.batch_size=8", "train.progress=false", "model.preset=tiny-mistral3", "model.mtp.num_layers=0",
           "model.implementation=transformers", "parallel.pp=2", "parallel.microbatches=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode != 0
    assert "expected untied input and output embeddings (tie_word_embeddings=false)" in res.stderr + res.stdout
    assert not (tmp_path / "tied").exists()


def test_a_stage_refuses_what_it_would_drop_and_input_of_the_wrong_kind():
    stages = _stages(build_model("llama"), 2)
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match=r"unexpected arguments \['labels'\]"):
        stages[0].model(ids, labels=ids)
    with pytest.raises(ValueError, match="expected integer token ids, got torch.float32"):
        stages[0](torch.zeros(2, 6, 32))
    with pytest.raises(ValueError, match=r"expected hidden states \(B, S, H\) in a float dtype, got \(2, 6\) torch.int64"):
        stages[1](ids)
    with pytest.raises(ValueError, match="LlamaForCausalLM is a text model, got images"):
        stages[0].feed(ids, {"pixel_values": torch.zeros(1, 3, 4, 4), "images_per_row": [1, 0]}, 1)
