"""Where plait's training step spends its time, module by module, by the wall clock.

    python benchmarks/step_split.py --model minimax_m3 --batch 1 --seq 2048   # about a minute on 2 cores

The torch profiler is the usual tool for this, but on a virtual machine it can misattribute time. Here it
reported 8-10 ms for MoE row gathers (`index_select`, [2048, 256] -> [8192, 256]) that take 0.5 ms in the same
step timed without it. This script uses only `time.perf_counter`, read in module hooks. It uses
`train_step.py`'s config, weights and batch, and runs forward + backward + AdamW(fused=True).

The parts are the direct children of every layer in a `layers` container (attention, MLP or MoE, norms; of the
decoder, the vision tower and the MTP depths), plus the modules outside the layers (embedding, vision patch
embedding, projector, final norm).
- A part's forward is the time from its forward pre-hook to its forward hook.
- Backward runs the parts in reverse, one after another. A part's backward is the time from its full backward
  pre-hook (its output's gradient is ready) to the next part's.
- What runs between parts goes to the part before it in that order: residual adds, and in backward the
  parameter-gradient accumulation. The rest of the forward (LM head, loss, masks, rotary tables) and the backward up
  to the first part's gradient are reported as one more row. plait's fused LM head and loss
  (`plait.nn.loss.linear_cross_entropy_sum`) compute their gradients in the forward, so that row's time is
  nearly all forward.
The hooks add a little to each part. Steps are timed with hooks on, and once more without them, to show the
difference.

Writes benchmarks/results/step_split-<model>-<batch>x<seq>-cpu.json and .png (`--quick`: a tiny config).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402

HEAD = "outside the parts: LM head, loss, masks"


def parts(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module, the parts that the module docstring lists, in the model's own order."""
    found: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, (nn.ModuleDict, nn.ModuleList)) and name == "layers":
                for index, layer in child.named_children():
                    for part, sub in layer.named_children():
                        found[f"{path}.{index}.{part}"] = sub
            elif any(n.split(".")[-1] == "layers" for n, _ in child.named_modules()):
                walk(child, f"{path}.")
            elif any(True for _ in child.parameters()):
                found[path] = child

    walk(model, "")
    return found


def kind(name: str) -> str:
    """'language_model.layers.3.self_attn' -> 'language_model self_attn': a part summed over its layers."""
    head, sep, tail = name.partition(".layers.")
    return f"{head} {tail.split('.', 1)[1]}" if sep else name


class StepClock:
    """Forward and backward seconds per part, from hooks; `reset` before each step."""

    def __init__(self, named: dict[str, nn.Module]):
        self.forward = collections.defaultdict(float)
        self.backward = collections.defaultdict(float)
        self._started: dict[str, float] = {}
        self._events: list[tuple[float, str]] = []
        self.handles = []
        for name, module in named.items():
            self.handles += [
                module.register_forward_pre_hook(lambda m, a, name=name: self._started.__setitem__(name, time.perf_counter())),
                module.register_forward_hook(lambda m, a, o, name=name: self._forward_done(name)),
                module.register_full_backward_pre_hook(lambda m, g, name=name: self._events.append((time.perf_counter(), name))),
            ]

    def _forward_done(self, name: str) -> None:
        self.forward[name] += time.perf_counter() - self._started.pop(name)

    def reset(self) -> None:
        self.forward.clear(), self.backward.clear(), self._events.clear()

    def close_backward(self, started: float, ended: float) -> float:
        """Turn the backward pre-hook times into per-part seconds; returns the head's share of backward."""
        times = [t for t, _ in self._events] + [ended]
        for (t, name), nxt in zip(self._events, times[1:]):
            self.backward[name] += nxt - t
        return (self._events[0][0] if self._events else ended) - started

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run(model_name: str, batch: int, seq: int, workdir: Path, steps: int, quick: bool = False) -> dict:
    cfg = train_step.CONFIGS[model_name](quick)
    inputs = train_step.batch_inputs(cfg, batch, seq)
    model = train_step.build(model_name, "plait", quick, workdir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    named = parts(model)
    clock = StepClock(named)
    # a part whose inputs need no gradient (the vision patch embedding) is still timed from its output's gradient
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    def step() -> dict:
        clock.reset()
        t0 = time.perf_counter()
        loss = model(**inputs).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        head_backward = clock.close_backward(t1, t2)
        return {"step": t3 - t0, "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                "head_forward": (t1 - t0) - sum(clock.forward.values()), "head_backward": head_backward,
                "parts_forward": dict(clock.forward), "parts_backward": dict(clock.backward)}

    for _ in range(2):
        step()
    records = [step() for _ in range(steps)]
    clock.remove()  # the same step without the hooks: what they add
    bare = [step()["step"] for _ in range(steps)]

    def median(key: str, name: str | None = None) -> float:
        return statistics.median(r[key][name] if name else r[key] for r in records)

    per_part = {name: {"forward_ms": 1e3 * median("parts_forward", name), "backward_ms": 1e3 * median("parts_backward", name)}
                for name in named if all(name in r["parts_forward"] and name in r["parts_backward"] for r in records)}
    kinds: dict[str, dict[str, float]] = {}
    for name, t in per_part.items():
        k = kinds.setdefault(kind(name), {"forward_ms": 0.0, "backward_ms": 0.0, "optimizer_ms": 0.0})
        k["forward_ms"] += t["forward_ms"]
        k["backward_ms"] += t["backward_ms"]
    kinds[HEAD] = {"forward_ms": 1e3 * median("head_forward"), "backward_ms": 1e3 * median("head_backward"),
                   "optimizer_ms": 0.0}
    kinds["AdamW and zero_grad"] = {"forward_ms": 0.0, "backward_ms": 0.0, "optimizer_ms": 1e3 * median("optimizer")}
    step_ms = 1e3 * median("step")
    for k in kinds.values():
        k["share_of_step"] = (k["forward_ms"] + k["backward_ms"] + k["optimizer_ms"]) / step_ms
    return {"model": model_name, "batch": batch, "seq": seq, "quick": quick, "threads": torch.get_num_threads(),
            "steps": steps, "step_ms": step_ms, "step_ms_without_hooks": 1e3 * statistics.median(bare),
            "forward_ms": 1e3 * median("forward"), "backward_ms": 1e3 * median("backward"),
            "kinds": kinds, "parts": per_part}


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(r["kinds"].items(), key=lambda kv: kv[1]["share_of_step"])
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.3 * len(kinds)))
    y = range(len(kinds))
    fwd = [k["forward_ms"] for _, k in kinds]
    ax.barh(y, fwd, color="tab:blue", label="forward")
    bwd = [k["backward_ms"] for _, k in kinds]
    ax.barh(y, bwd, left=fwd, color="tab:orange", label="backward")
    ax.barh(y, [k["optimizer_ms"] for _, k in kinds], left=[f + b for f, b in zip(fwd, bwd)], color="tab:green",
            label="optimizer")
    ax.set_yticks(list(y), [name for name, _ in kinds], fontsize=7)
    ax.set_xlabel("ms per step (median)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"plait {r['model']} {r['batch']} x {r['seq']}, CPU float32, {r['threads']} threads: "
                 f"step {r['step_ms']:.0f} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(train_step.CONFIGS), default="minimax_m3")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=train_step.RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from plait.host_memory import keep_freed_blocks

    keep_freed_blocks()  # plait's trainer setting: the split then shows compute, not page faults
    r = run(args.model, args.batch, args.seq, Path(tempfile.mkdtemp(prefix="plait-split-")), args.steps, args.quick)
    print(f"{args.model} {args.batch} x {args.seq}: step {r['step_ms']:.0f} ms with hooks, "
          f"{r['step_ms_without_hooks']:.0f} ms without")
    for name, k in sorted(r["kinds"].items(), key=lambda kv: -kv[1]["share_of_step"]):
        print(f"  {name:45s} forward {k['forward_ms']:7.1f} ms  backward {k['backward_ms']:7.1f} ms  "
              f"optimizer {k['optimizer_ms']:6.1f} ms  {100 * k['share_of_step']:5.1f}%")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step_split-{args.model}-{args.batch}x{args.seq}-cpu" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(r, indent=2))
    plot(r, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
