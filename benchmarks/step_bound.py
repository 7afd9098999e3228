"""How fast plait's training step could be with the kernels it runs: every matmul of one step timed alone.

    python benchmarks/step_bound.py --model mimo_v2_flash --batch 2 --seq 256   # about a minute on 2 cores

One step (forward + backward + AdamW, `train_step.py`'s config, weights and batch) runs under the profiler, which
records the shape of every matmul (`mm`, `addmm`, `bmm`, the per-expert ones inside grouped_mm included), the time
of the attention kernels and of the fused AdamW. Each matmul shape is then timed alone, hot (same operands, many
repetitions), and the sum over the step's calls is the matmul time no implementation of the same step can beat with
these kernels. The rest of the measured step (routing, norms, element-wise work, matmuls slower in the step than
alone) is what is left to win. transformers' step on the same weights and batch is timed in the same process,
interleaved with plait's, so the report also says how far ahead of it a plait step made of nothing but these
kernels would be: the ceiling of the tokens/s ratio with them. The process keeps freed heap blocks
(`plait.host_memory.keep_freed_blocks`), so neither step pays page faults for memory it had a step before: the
figures are the steps' compute.

Writes benchmarks/results/step_bound-<model>-<batch>x<seq>-cpu.json and .png (`--quick`: a tiny config).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


def _operand_shapes(name: str, shapes: list) -> tuple[tuple, tuple]:
    return (tuple(shapes[1]), tuple(shapes[2])) if name.startswith("aten::addmm") else (tuple(shapes[0]), tuple(shapes[1]))


def time_alone(a_shape: tuple, b_shape: tuple) -> tuple[float, float]:
    """(seconds, FLOPs) of one hot matmul of these operand shapes."""
    a, b = torch.randn(*a_shape), torch.randn(*b_shape)
    if len(a_shape) == 3:
        out = torch.empty(a_shape[0], a_shape[1], b_shape[2])
        flops = 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
        fn = lambda: torch.bmm(a, b, out=out)  # noqa: E731
    else:
        out = torch.empty(a_shape[0], b_shape[1])
        flops = 2 * a_shape[0] * a_shape[1] * b_shape[1]
        fn = lambda: torch.mm(a, b, out=out)  # noqa: E731
    for _ in range(3):
        fn()
    reps = min(2000, max(3, int(2e8 / max(flops, 1))))  # an expert that got no token: a 0-FLOP call, a few reps
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best, flops


def run(model_name: str, batch: int, seq: int, workdir: Path, quick: bool = False) -> dict:
    from torch.profiler import profile

    cfg = train_step.CONFIGS[model_name](quick)
    inputs = train_step.batch_inputs(cfg, batch, seq)
    steps = {impl: train_step.make_step(train_step.build(model_name, impl, quick, workdir), inputs)
             for impl in train_step.IMPLS}
    step = steps["plait"]
    times = {impl: [] for impl in steps}
    for fn in steps.values():
        fn(), fn()
    for _ in range(5):  # interleaved: a change in the machine's speed reaches both
        for impl, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - t)
    with profile(record_shapes=True) as prof:
        step()
    calls, kernels = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.name in MATMULS and e.input_shapes:
            calls[_operand_shapes(e.name, e.input_shapes)] += 1
        elif e.name.startswith("aten::_scaled_dot_product_flash") or e.name == "aten::_fused_adamw_":
            kernels[e.name] += e.cpu_time_total / 1e6
    alone, flops = 0.0, 0
    for (a, b), n in calls.items():
        seconds, f = time_alone(a, b)
        alone, flops = alone + n * seconds, flops + n * f
    bound = alone + sum(kernels.values())
    peer = statistics.median(times["transformers"])
    return {"model": model_name, "batch": batch, "seq": seq, "quick": quick, "threads": torch.get_num_threads(),
            "step_seconds": statistics.median(times["plait"]), "transformers_step_seconds": peer,
            "matmul_calls": sum(calls.values()), "matmul_gflop": flops / 1e9, "matmuls_alone_seconds": alone,
            "kernels_in_step_seconds": dict(kernels), "bound_seconds": bound,
            "speedup": peer / statistics.median(times["plait"]), "speedup_ceiling": peer / bound}


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = r["kernels_in_step_seconds"]
    attention = sum(v for k, v in kernels.items() if "flash" in k)
    adamw = kernels.get("aten::_fused_adamw_", 0.0)
    parts = [("matmuls alone, hot", r["matmuls_alone_seconds"]), ("attention kernels", attention), ("AdamW", adamw)]
    fig, ax = plt.subplots(figsize=(7, 2.4))
    left = 0.0
    for (label, seconds), color in zip(parts, ("tab:blue", "tab:orange", "tab:green")):
        ax.barh([0], [1000 * seconds], left=1000 * left, color=color, label=label)
        left += seconds
    ax.barh([1], [1000 * r["step_seconds"]], color="tab:gray", label="plait step")
    ax.barh([2], [1000 * r["transformers_step_seconds"]], color="tab:red", label="transformers step")
    ax.set_yticks([0, 1, 2], ["bound", "plait", "transformers"])
    ax.set_xlabel("ms")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{r['model']} {r['batch']} x {r['seq']}, CPU float32, {r['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(train_step.CONFIGS), default="mimo_v2_flash")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", type=Path, default=train_step.RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from plait.host_memory import keep_freed_blocks

    keep_freed_blocks()
    r = run(args.model, args.batch, args.seq, Path(tempfile.mkdtemp(prefix="plait-bound-")), args.quick)
    kernels = sum(r["kernels_in_step_seconds"].values())
    print(f"{args.model} {args.batch} x {args.seq}: step {1000 * r['step_seconds']:.0f} ms; {r['matmul_calls']} matmuls, "
          f"{r['matmul_gflop']:.1f} GFLOP, {1000 * r['matmuls_alone_seconds']:.0f} ms alone and hot; attention and "
          f"AdamW kernels {1000 * kernels:.0f} ms in the step ({r['kernels_in_step_seconds']}); transformers' step "
          f"{1000 * r['transformers_step_seconds']:.0f} ms: x{r['speedup']:.2f} now, x{r['speedup_ceiling']:.2f} for a step "
          f"of these kernels alone")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step_bound-{args.model}-{args.batch}x{args.seq}-cpu" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(r, indent=2))
    plot(r, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
