"""A training step of a native plait model against the transformers model, same config and weights.

    python benchmarks/train_step.py --model mimo_v2_flash   # ~16M parameters, 1 x 2048 and 2 x 256 (minutes on 2 cores)
    python benchmarks/train_step.py --model minimax_m3      # MiniMax-M3-VL, ~20M parameters, one image per sample
    python benchmarks/train_step.py --quick                 # a tiny config, to check the script runs
    python benchmarks/train_step.py --model minimax_m3 --device cuda   # on a GPU: bf16 autocast, + 8 x 2048

A step is forward + backward + AdamW on a random token batch (MiniMax-M3-VL: each sample starts with one
224 x 224 random image (64 placeholder tokens), and the rest are text tokens). transformers runs its default
experts implementation (grouped_mm) and its attention: eager for MiMo-V2-Flash (the only one it has), SDPA
for MiniMax-M3. plait runs its defaults (SDPA, block-local sliding windows, block-sparse indexer layers, grouped_mm
experts, chunked cross-entropy; the step reads only the loss, so plait never makes the logits, which it makes when
read, while transformers always does). Both are timed in this process, steps interleaved, median of --steps after
a warm-up. Every step's time is kept in the JSON, and so is the spread of the speed-up over the rounds (one step of
each implementation, back to back), and the median count of minor page faults the process took in a step: on a
shared VM the peer's step swings most, and its page faults cost what the host makes them cost that minute.

Model FLOPs utilisation (MFU) = model FLOPs per step / step time / float32 matmul peak (measured here):
model FLOPs = 6 x active parameters x tokens (embedding lookups excluded, LM head included)
            + 3 x sum over layers of 2 x heads x (qk_dim + v_dim) x visible (query, key) pairs
            + for a vision tower, 6 x its parameters x patches + 3 x its attention over each image's patches,
where a full layer sees S(S+1)/2 pairs per row, a window-w layer w(w+1)/2 + (S - w) w, and an M3
indexer-sparse layer only the keys in the blocks it selects: query p sees min(p + 1, (k - 1) b + p mod b + 1)
keys for top-k blocks of b keys. The indexer itself (no gradient) adds 2 x its projections x tokens
+ 2 x index heads x index dim x S(S+1)/2 for its scores.

Both use AdamW(fused=True): transformers' Trainer default, and what plait's trainer runs.

Saved for backward: the bytes of the distinct tensors autograd keeps from one training forward, parameters
excluded (activation memory, before any allocator overhead).

Peak memory: in a fresh subprocess per implementation, the resident high-water mark (VmHWM) minus the
resident set after imports; model construction, optimizer state and the steps are all inside. "Live peak" is the
most the C library had handed out at once over the same span (glibc's mallinfo2, sampled every 0.2 ms by a thread):
what the tensors needed; the rest of the resident peak is freed heap the allocator kept.

Host allocator (`--host-allocator`): "default" leaves glibc as a plain Python process has it; "keep_freed" applies
what plait's trainer sets (`plait.host_memory`: freed blocks up to 32 MiB kept in the heap, no trimming) to this
whole process and to the memory subprocesses, so both implementations run under it.

On a GPU (`--device cuda`) both run the way their trainers do on one: float32 weights and AdamW state, the
forward under bf16 autocast. MFU is then against the bf16 matmul peak measured here (8192^3), peak memory is
torch's allocator high-water mark above what was allocated before the model was built (model, gradients,
optimizer state and the steps' activations; each implementation measured alone after the timing), and a batch
of 8 x 2048 is added, a size at which a GPU has enough work per kernel. `--flex` adds plait with its compiled
FlexAttention backend. `--compile` adds plait with each decoder layer compiled (`plait.compile.compile_layers`,
what the trainer runs with train.compile=true; its first steps, which compile, are in the warm-up, not timed).

Writes benchmarks/results/train_step-<model>-<device>.json and .png ("-keep_freed" added to the name for that
allocator).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ("plait", "transformers")


def mimo_config(quick: bool):
    from transformers import MiMoV2FlashConfig

    if quick:
        sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=3, num_attention_heads=2, head_dim=32, v_head_dim=16, sliding_window=16,
                     layer_types=["full_attention", "sliding_attention", "full_attention"],
                     mlp_layer_types=["dense", "sparse", "sparse"], n_routed_experts=8, num_experts_per_tok=2)
    else:
        # MiMo-like expert shape: many small experts (the release has 256, top-8), here 32, top-4
        sizes = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=96,
                     num_hidden_layers=6, num_attention_heads=4, head_dim=96, v_head_dim=64, sliding_window=128,
                     layer_types=["full_attention"] + ["sliding_attention"] * 4 + ["full_attention"],
                     mlp_layer_types=["dense"] + ["sparse"] * 5, n_routed_experts=32, num_experts_per_tok=4)
    return MiMoV2FlashConfig(num_key_value_heads=1, n_group=4, topk_group=2, max_position_embeddings=4096,
                             tie_word_embeddings=False, **sizes)


IMAGE_TOKEN = 5


def m3_config(quick: bool):
    from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLConfig

    if quick:
        text = dict(vocab_size=512, hidden_size=64, intermediate_size=32, dense_intermediate_size=128,
                    shared_intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=32, layer_types=["full_attention", "minimax_m3_sparse", "full_attention"],
                    mlp_layer_types=["dense", "sparse", "sparse"], num_local_experts=8, num_experts_per_tok=2,
                    index_n_heads=1, index_head_dim=16, index_block_size=16, index_topk_blocks=4)
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    else:
        text = dict(vocab_size=4096, hidden_size=256, intermediate_size=96, dense_intermediate_size=1024,
                    shared_intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                    head_dim=64, layer_types=["full_attention", "minimax_m3_sparse"] * 3,
                    mlp_layer_types=["dense"] + ["sparse"] * 5, num_local_experts=32, num_experts_per_tok=4,
                    index_n_heads=1, index_head_dim=64, index_block_size=128, index_topk_blocks=8)
        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    text_config = dict(max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                        "partial_rotary_factor": 0.5}, **text)
    vision_config = dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, image_size=56 if quick else 224,
                         **vision)
    return MiniMaxM3VLConfig(text_config=text_config, vision_config=vision_config, image_token_index=IMAGE_TOKEN,
                             video_token_index=IMAGE_TOKEN + 1, projector_hidden_size=4 * text["hidden_size"],
                             tie_word_embeddings=False)


def _peer_class(model: str):
    if model == "mimo_v2_flash":
        from transformers import MiMoV2FlashForCausalLM

        return MiMoV2FlashForCausalLM, "eager"
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3SparseForConditionalGeneration

    return MiniMaxM3SparseForConditionalGeneration, "sdpa"


CONFIGS = {"mimo_v2_flash": mimo_config, "minimax_m3": m3_config}


def build(model: str, impl: str, quick: bool, workdir: Path, device: str = "cpu"):
    """Every implementation from one saved checkpoint, so the weights are the same."""
    import plait

    reference, attn = _peer_class(model)
    ckpt = workdir / f"checkpoint-{model}"
    if not (ckpt / "config.json").exists():
        torch.manual_seed(0)
        reference(CONFIGS[model](quick)).save_pretrained(ckpt)
    if impl == "plait":
        return plait.from_pretrained(ckpt).to(device)
    if impl == "plait-flex":
        return plait.from_pretrained(ckpt, attn_implementation="flex").to(device)
    if impl == "plait-compiled":
        from plait.compile import compile_layers

        model = plait.from_pretrained(ckpt).to(device)
        compile_layers(model)
        return model
    return reference.from_pretrained(ckpt, attn_implementation=attn).to(device)


def batch_inputs(cfg, batch: int, seq: int, device: str = "cpu") -> dict:
    """Random token ids; a vision-language config also gets one random image per sample at the start."""
    g = torch.Generator().manual_seed(1)
    text = getattr(cfg, "text_config", cfg)
    ids = torch.randint(IMAGE_TOKEN + 2, text.vocab_size, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "labels": ids}
    if cfg.model_type == "minimax_m3_vl":
        from plait.models.minimax_m3_vision import patchify_images

        v = cfg.vision_config
        pixels, grid = patchify_images(torch.rand(batch, 3, v.image_size, v.image_size, generator=g), v.patch_size,
                                  v.spatial_merge_size, v.temporal_patch_size)
        n = image_tokens(cfg)
        ids[:, 1 : 1 + n] = IMAGE_TOKEN
        inputs.update(pixel_values=pixels, image_grid_thw=grid,
                      labels=ids.masked_fill(ids == IMAGE_TOKEN, -100))
    return {k: v.to(device) for k, v in inputs.items()}


def image_tokens(cfg) -> int:
    v = cfg.vision_config
    return (v.image_size // v.patch_size // v.spatial_merge_size) ** 2


def step_autocast(model):
    """The forward's precision context: bf16 autocast on a GPU (how both trainers run there), none on the CPU."""
    cuda = next(model.parameters()).device.type == "cuda"
    return partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else nullcontext


def make_step(model, inputs: dict):
    # fused AdamW: transformers' Trainer default since torch 2.8, and what plait's trainer runs
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    autocast = step_autocast(model)

    def step() -> float:
        with autocast():
            out = model(**inputs)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def saved_for_backward_bytes(model, inputs: dict) -> int:
    """Bytes of the tensors autograd keeps from one training forward for its backward: distinct storages,
    parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), step_autocast(model)():
        out = model(**inputs)
    del out
    return sum(sizes.values())


def sparse_pairs(seq: int, block: int, topk: int) -> int:
    """(query, key) pairs an indexer-sparse layer attends: each query's top-k blocks, its own among them."""
    return sum(min(p + 1, (topk - 1) * block + p % block + 1) for p in range(seq))


def model_flops(cfg, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (the module docstring's formula)."""
    from plait.nn.attention import num_flops_attention

    vl = cfg.model_type == "minimax_m3_vl"
    text = cfg.text_config if vl else cfg
    H = text.hidden_size
    mimo = text.model_type == "mimo_v2_flash"
    v_dim = text.v_head_dim if mimo else text.head_dim
    active, attention, indexer = 0, 0.0, 0.0
    for layer_type, mlp in zip(text.layer_types, text.mlp_layer_types):
        sliding = layer_type == "sliding_attention"
        kv = text.num_key_value_heads * (2 if mimo and sliding else 1)
        active += H * text.num_attention_heads * text.head_dim + H * kv * (text.head_dim + v_dim)
        active += text.num_attention_heads * v_dim * H
        if mimo:
            active += 3 * H * text.intermediate_size if mlp == "dense" else \
                3 * H * text.moe_intermediate_size * text.num_experts_per_tok + H * text.n_routed_experts
        else:
            active += 3 * H * text.dense_intermediate_size if mlp == "dense" else \
                3 * H * (text.intermediate_size * text.num_experts_per_tok + text.shared_intermediate_size) \
                + H * text.num_local_experts
        if layer_type == "minimax_m3_sparse":
            pairs = sparse_pairs(seq, text.index_block_size, text.index_topk_blocks)
            attention += 2.0 * batch * text.num_attention_heads * pairs * (text.head_dim + v_dim)
            d = text.index_head_dim
            indexer += 2.0 * batch * seq * H * d * (text.index_n_heads + 1)
            indexer += 2.0 * batch * text.index_n_heads * d * seq * (seq + 1) / 2
        else:
            attention += num_flops_attention(batch, text.num_attention_heads, seq, text.head_dim, v_dim,
                                             text.sliding_window if sliding else None)
    active += H * text.vocab_size  # LM head
    flops = 6 * active * batch * seq + 3 * attention + indexer
    if vl:
        flops += vision_flops(cfg, batch)
    return flops


def vision_flops(cfg, images: int) -> float:
    """The vision tower (bidirectional attention over each image's patches) and the projector."""
    v = cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    Hv = v.hidden_size
    per_layer = 4 * Hv * Hv + 2 * Hv * v.intermediate_size
    params = v.num_hidden_layers * per_layer + Hv * v.num_channels * v.temporal_patch_size * v.patch_size**2
    attention = v.num_hidden_layers * 2.0 * v.num_attention_heads * patches * patches * 2 * (Hv // v.num_attention_heads)
    text_h, merged = cfg.text_config.hidden_size, image_tokens(cfg)
    # projector: vision -> projector_hidden -> text width per patch, then the m^2 -> 1 merge MLP per token
    projector = patches * (Hv * cfg.projector_hidden_size + cfg.projector_hidden_size * text_h)
    projector += merged * (cfg.merged_hidden_size * cfg.projector_hidden_size + cfg.projector_hidden_size * text_h)
    return images * (6.0 * (params * patches + projector) + 3 * attention)


def matmul_peak(quick: bool, device: str = "cpu") -> float:
    if device == "cuda":
        return cuda_matmul_peak()
    n = 512 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def cuda_matmul_peak(n: int = 8192) -> float:
    """bf16 matmul FLOP/s: the mean of 10 products after 3 warm-ups, timed with CUDA events."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3)


def cuda_peak_memory(model_name: str, impl: str, batch: int, seq: int, quick: bool, workdir: Path) -> dict:
    """Allocator high-water mark of building the model and two steps, above what was allocated before."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build(model_name, impl, quick, workdir, "cuda")
    step = make_step(model, batch_inputs(CONFIGS[model_name](quick), batch, seq, "cuda"))
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return {"peak_bytes": peak, "live_peak_bytes": None}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(model_name: str, impl: str, batch: int, seq: int, quick: bool, workdir: Path, steps: int,
                 allocator: str) -> None:
    import transformers  # noqa: F401  (imports are outside the measured growth)

    import threading

    import plait  # noqa: F401
    from plait.host_memory import configure_host_allocator, heap_in_use_bytes

    configure_host_allocator(allocator)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    live_base, live_peak, done = heap_in_use_bytes(), [0], threading.Event()

    def sample_live() -> None:
        while not done.wait(0.0002):
            live_peak[0] = max(live_peak[0], heap_in_use_bytes() - live_base)

    sampler = threading.Thread(target=sample_live, daemon=True)
    if live_base is not None:
        sampler.start()
    model = build(model_name, impl, quick, workdir)
    step = make_step(model, batch_inputs(CONFIGS[model_name](quick), batch, seq))
    for _ in range(steps):
        step()
    done.set()
    if live_base is not None:
        sampler.join()
    print(json.dumps({"peak_bytes": (_status_kib("VmHWM") - base) * 1024,
                      "live_peak_bytes": live_peak[0] if live_base is not None else None}))


def peak_memory(model_name: str, impl: str, batch: int, seq: int, quick: bool, workdir: Path, allocator: str) -> dict:
    cmd = [sys.executable, __file__, "--model", model_name, "--memory-child", impl, str(batch), str(seq),
           "--workdir", str(workdir), "--host-allocator", allocator]
    out = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(model_name: str, quick: bool, steps: int, workdir: Path, allocator: str = "default", device: str = "cpu",
        flex: bool = False, save=None, compiled: bool = False) -> dict:
    from plait.host_memory import configure_host_allocator

    configure_host_allocator(allocator)
    cuda = device == "cuda"
    impls = ("plait",) + (("plait-flex",) if flex else ()) + (("plait-compiled",) if compiled else ()) + ("transformers",)
    peak = matmul_peak(quick, device)
    cfg = CONFIGS[model_name](quick)
    shapes = [(1, 256), (2, 64)] if quick else [(1, 2048), (2, 256)] + ([(8, 2048)] if cuda else [])
    models = {impl: build(model_name, impl, quick, workdir, device) for impl in impls}
    n_params = sum(p.numel() for p in models["plait"].parameters())
    results = {"model": model_name, "device": torch.cuda.get_device_name() if cuda else "cpu",
               "precision": "bf16 autocast, float32 weights" if cuda else "float32",
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "matmul_peak_gflops": peak / 1e9, "parameters": n_params, "quick": quick,
               "optimizer": "AdamW(fused=True)", "host_allocator": allocator, "shapes": []}
    print(f"{'bf16' if cuda else 'float32'} matmul peak {peak / 1e9:.0f} GFLOP/s; {n_params:,} parameters")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for batch, seq in shapes:
        inputs = batch_inputs(cfg, batch, seq, device)
        fns = {impl: make_step(m, inputs) for impl, m in models.items()}
        losses = {impl: fn() for impl, fn in fns.items()}  # warm-up; same weights, same batch: same loss
        if cuda or compiled:  # a second warm-up: compiled kernels (a second shape recompiles), cuBLAS plans and the
            # caching allocator settle
            for fn in fns.values():
                fn()
        times = {impl: [] for impl in impls}
        faults = {impl: [] for impl in impls}  # minor page faults of the process during each step
        for _ in range(steps):
            for impl, fn in fns.items():
                sync()
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                fn()  # reads the loss: waits for the step's kernels
                times[impl].append(time.perf_counter() - t)
                faults[impl].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        flops = model_flops(cfg, batch, seq)
        row = {"batch": batch, "seq": seq, "first_step_loss": losses, "impls": {}}
        for impl in impls:
            t = statistics.median(times[impl])
            memory = (cuda_peak_memory(model_name, impl, batch, seq, quick, workdir) if cuda
                      else peak_memory(model_name, impl, batch, seq, quick, workdir, allocator))
            row["impls"][impl] = {"step_seconds": t, "step_seconds_each": times[impl],
                                  "page_faults_per_step": statistics.median(faults[impl]),
                                  "tokens_per_s": batch * seq / t, "mfu": flops / t / peak,
                                  # compiled layers: the graph decides what it saves, and dynamo would trace the hooks
                                  "saved_for_backward_mib": (saved_for_backward_bytes(models[impl], inputs) / 2**20
                                                             if impl != "plait-compiled" else None),
                                  "peak_mib": memory["peak_bytes"] / 2**20,
                                  "live_peak_mib": (memory["live_peak_bytes"] / 2**20
                                                    if memory["live_peak_bytes"] is not None else None)}
        p, r = row["impls"]["plait"], row["impls"]["transformers"]
        row["speedup"] = p["tokens_per_s"] / r["tokens_per_s"]
        per_round = [peer / ours for ours, peer in zip(times["plait"], times["transformers"])]
        row["speedup_per_round"] = {"min": min(per_round), "median": statistics.median(per_round), "max": max(per_round)}
        row["memory_ratio"] = p["peak_mib"] / r["peak_mib"]
        for impl, key in (("plait-flex", "flex"), ("plait-compiled", "compiled")):
            if impl in row["impls"]:
                f = row["impls"][impl]
                row[f"{key}_speedup"] = f["tokens_per_s"] / r["tokens_per_s"]
                row[f"{key}_memory_ratio"] = f["peak_mib"] / r["peak_mib"]
                print(f"  {impl}: {f['tokens_per_s']:,.0f} tok/s (MFU {100 * f['mfu']:.0f}%, {f['peak_mib']:.0f} MiB): "
                      f"x{row[f'{key}_speedup']:.2f} speed, x{row[f'{key}_memory_ratio']:.2f} memory")
        results["shapes"].append(row)
        print(f"{batch} x {seq}: plait {p['tokens_per_s']:,.0f} tok/s (MFU {100 * p['mfu']:.0f}%, {p['peak_mib']:.0f} MiB), "
              f"transformers {r['tokens_per_s']:,.0f} tok/s (MFU {100 * r['mfu']:.0f}%, {r['peak_mib']:.0f} MiB): "
              f"x{row['speedup']:.2f} speed (rounds {row['speedup_per_round']['min']:.2f} to {row['speedup_per_round']['max']:.2f}), "
              f"x{row['memory_ratio']:.2f} memory; page faults a step {p['page_faults_per_step']:,.0f} / "
              f"{r['page_faults_per_step']:,.0f}; saved for backward {p['saved_for_backward_mib']:.0f} / "
              f"{r['saved_for_backward_mib']:.0f} MiB; live peak {_mib(p['live_peak_mib'])} / {_mib(r['live_peak_mib'])}; "
              f"first losses {losses}")
        if save is not None:  # after each shape: a run stopped part-way keeps the rows it measured
            save(results)
    return results


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['batch']} x {r['seq']}" for r in results["shapes"]]
    impls = list(results["shapes"][0]["impls"])
    width = 0.8 / len(impls)
    colors = {"plait": "tab:blue", "plait-flex": "tab:cyan", "plait-compiled": "tab:green", "transformers": "tab:gray"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens/s (train step)"), (axes[1], "peak_mib", "peak MiB")):
        for i, impl in enumerate(impls):
            ax.bar([x + width * i for x in range(len(labels))], [r["impls"][impl][key] for r in results["shapes"]],
                   width=width, label=impl, color=colors[impl])
        ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(labels))], labels)
        ax.set_title(title, fontsize=9)
        if results["device"] != "cpu":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    where = (f"CPU float32, {results['threads']} threads, host allocator {results.get('host_allocator', 'default')}"
             if results["device"] == "cpu" else f"{results['device']}, {results['precision']}")
    fig.suptitle(f"{results['model']} {results['parameters'] / 1e6:.1f}M, {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(CONFIGS), default="mimo_v2_flash")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--host-allocator", choices=("default", "keep_freed"), default="default",
                        help="glibc malloc settings for the whole process, both implementations (plait.host_memory)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--flex", action="store_true", help="add plait with its FlexAttention backend (GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="add plait with each decoder layer compiled (plait.compile, what train.compile=true runs)")
    parser.add_argument("--memory-child", nargs=3, metavar=("IMPL", "BATCH", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="plait-bench-"))
    if args.memory_child:
        impl, batch, seq = args.memory_child
        memory_child(args.model, impl, int(batch), int(seq), args.quick, workdir, steps=2, allocator=args.host_allocator)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.flex and args.device != "cuda":
        parser.error("--flex needs --device cuda (FlexAttention has no CPU backward)")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (f"train_step-{args.model}-{args.device}" + ("-keep_freed" if args.host_allocator == "keep_freed" else "")
            + ("-compile" if args.compile else "") + ("-quick" if args.quick else ""))

    def save(results: dict) -> None:
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
        plot(results, args.out / f"{stem}.png")

    run(args.model, args.quick, args.steps, workdir, args.host_allocator, args.device, args.flex, save, args.compile)
    print(f"wrote {args.out / (stem + '.json')} and .png")


if __name__ == "__main__":
    main()
