"""Pipeline bubble per schedule: measured from per-stage compute time, against the theoretical fraction.

    python benchmarks/pipeline_bubble.py              # 2 and 4 processes (gloo, CPU, one thread each)
    python benchmarks/pipeline_bubble.py --quick      # a tiny model and one step, to check the script runs

A stock transformers Llama (hidden 256, one decoder layer per stage, a 512-token vocabulary so that the
embedding and the head stay small beside a layer: the stages are near equal, as the theory assumes) is split with
plait's stock-model pipeline (`build_hf_pipeline`) and trained for a few steps per schedule. On each rank the
time spent inside the stages' forward, backward and weight-gradient chunks (`PipelineStage.forward_one_chunk`,
`backward_one_chunk`, `backward_weight_one_chunk`) is compute; the rest of the step (waiting for the
neighbour, the loss, the schedule's bookkeeping) is idle:

    bubble = 1 - compute / step wall time          (mean over ranks, median over the timed steps)

Theory, for p ranks, m microbatches and equal stages (the schedules' papers):
    gpipe, 1f1b                    (p - 1) / (m + p - 1)
    interleaved_1f1b, looped_bfs   (p - 1) / (v m + p - 1)     with v stages per rank
The zero-bubble schedules (interleaved_zb, zbv, dualpipev) have no closed form that holds without their
timing assumptions (equal F, B, W); they are measured only.

A rank is a process with one thread; with more processes than cores (4 on a 2-core machine) ranks also wait
for a core, which this measures as compute time stretched, not as bubble: read the 4-process figures as
contention-bound. Writes benchmarks/results/pipeline_bubble-cpu.json and .png (or under --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev")


def theoretical_bubble(schedule: str, ranks: int, microbatches: int, stages_per_rank: int) -> float | None:
    if schedule in ("gpipe", "1f1b"):
        return (ranks - 1) / (microbatches + ranks - 1)
    if schedule in ("interleaved_1f1b", "looped_bfs"):
        return (ranks - 1) / (stages_per_rank * microbatches + ranks - 1)
    return None


class ComputeClock:
    """Wall time spent inside the stages' compute chunks on this rank (class-level wrappers)."""

    METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self):
        from torch.distributed.pipelining.stage import _PipelineStageBase

        self.seconds = 0.0
        for name in self.METHODS:
            original = getattr(_PipelineStageBase, name)
            setattr(_PipelineStageBase, name, self._timed(original))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return wrapper


def llama(layers: int, quick: bool):
    from plait.models.hf import build_stock_model, to_hf_config

    hidden = 64 if quick else 256
    torch.manual_seed(0)
    return build_stock_model(to_hf_config({
        "model_type": "llama", "vocab_size": 512, "hidden_size": hidden,
        "intermediate_size": 4 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": False}))


def worker(args) -> None:
    import torch.distributed as dist

    from plait.nn.loss import causal_lm_loss_sum
    from plait.parallel.hf_pipeline import build_hf_pipeline
    from plait.parallel.pipeline import stages_per_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    clock = ComputeClock()
    rows, seq = args.microbatches * args.rows_per_microbatch, args.seq
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (rows, seq), generator=g)
    results = {}
    for schedule in args.schedules:
        per_rank = stages_per_rank(schedule)
        run = build_hf_pipeline(llama(ranks * per_rank, args.quick), rank=rank, ranks=ranks, schedule=schedule,
                                microbatches=args.microbatches, device=torch.device("cpu"),
                                loss_fn=lambda logits, labels: causal_lm_loss_sum(logits, labels) / labels.numel())
        run.step(ids, ids)  # the first step also infers the stages' shapes: not timed
        walls, computes = [], []
        for _ in range(args.steps):
            dist.barrier()
            clock.seconds = 0.0
            t0 = time.perf_counter()
            run.step(ids, ids)
            walls.append(time.perf_counter() - t0)
            computes.append(clock.seconds)
            for m in run.modules:
                m.zero_grad(set_to_none=True)
        wall, compute = statistics.median(walls), statistics.median(computes)
        everyone = [None] * ranks
        dist.all_gather_object(everyone, {"wall_s": wall, "compute_s": compute, "bubble": 1 - compute / wall})
        results[schedule] = {
            "stages_per_rank": per_rank,
            "ranks": everyone,
            "bubble_measured": statistics.mean(r["bubble"] for r in everyone),
            "bubble_theoretical": theoretical_bubble(schedule, ranks, args.microbatches, per_rank),
            "step_s": max(r["wall_s"] for r in everyone),
        }
    if rank == 0:
        Path(args.worker).write_text(json.dumps(results))
    dist.barrier()  # no rank tears gloo down while a neighbour's last transfers are in flight
    dist.destroy_process_group()


def run_processes(n: int, args, out: Path) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(n), __file__, "--worker", str(out),
           "--microbatches", str(args.microbatches), "--rows-per-microbatch", str(args.rows_per_microbatch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--schedules", *args.schedules]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-4000:])
    return json.loads(out.read_text())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["processes"]), figsize=(5 * len(results["processes"]), 3.2), squeeze=False)
    for ax, (n, by_schedule) in zip(axes[0], results["processes"].items()):
        names = list(by_schedule)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [by_schedule[s]["bubble_measured"] for s in names], width=0.4,
               label="measured", color="tab:blue")
        ax.bar([x + 0.2 for x in xs], [by_schedule[s]["bubble_theoretical"] or 0.0 for s in names], width=0.4,
               label="theory (where a formula applies)", color="tab:gray")
        ax.set_xticks(list(xs), names, rotation=30, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{n} processes, {results['microbatches']} microbatches", fontsize=9)
    axes[0][0].set_ylabel("bubble fraction")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"stock Llama pipeline, gloo on CPU ({os.cpu_count()} cores), one thread per process", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--rows-per-microbatch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and PNG go")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.seq, args.steps, args.processes = 16, 1, [2]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"model": "llama (transformers, patched stages)", "microbatches": args.microbatches,
               "rows_per_microbatch": args.rows_per_microbatch, "seq": args.seq, "steps": args.steps,
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "processes": {}}
    for n in args.processes:
        part = args.out / f".pipeline_bubble-{n}.json"
        results["processes"][str(n)] = run_processes(n, args, part)
        part.unlink()
        for schedule, r in results["processes"][str(n)].items():
            theory = r["bubble_theoretical"]
            print(f"{n} processes {schedule:17s} bubble {r['bubble_measured']:.3f} (theory "
                  f"{'-' if theory is None else f'{theory:.3f}'}), step {r['step_s'] * 1e3:.0f} ms")
    stem = "pipeline_bubble-cpu" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
