"""Building blocks side by side with transformers 5.23.0, same weights and inputs, one process.

    python benchmarks/blocks.py                 # full sizes (a few minutes on 2 CPU cores)
    python benchmarks/blocks.py --quick         # tiny sizes, to check the script runs

Each case times forward + backward (median of --repeats, implementations interleaved so machine
load hits them alike), reports the ratio to the transformers peer, achieved FLOP/s as a fraction of
this machine's float32 matmul peak (measured at the start of the same run), and peak memory. Peak
memory is measured in a fresh subprocess per implementation: the rise of the resident set's
high-water mark (VmHWM, reset just before the step) over the resident set at the step's start
(CPU has no allocator statistics). Gradient buffers from the warm-up step stay allocated, as in a
training loop, so the figure is the step's activations and temporaries.

Writes benchmarks/results/blocks-<device>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Cases: each builds its inputs and returns {impl name: step function}, plus the useful FLOPs
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    peer: str  # the transformers implementation the ratios are taken against
    flops: float  # useful forward + backward FLOPs of one step
    steps: dict  # impl -> callable running forward + backward


def _backward(out: torch.Tensor) -> None:
    out.backward(torch.ones_like(out) / out.numel())


def moe_case(quick: bool) -> Case:
    from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLSparseMoeBlock

    from plait.nn.mlp import Activation
    from plait.nn.moe import MoE, MoEConfig

    T, H, I, E, K = (256, 64, 64, 8, 2) if quick else (2048, 1024, 1024, 8, 2)
    cfg = MiniMaxM3VLTextConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                                shared_intermediate_size=I, num_attention_heads=8, num_key_value_heads=2,
                                head_dim=H // 8, num_hidden_layers=1, routed_scaling_factor=1.0)
    torch.manual_seed(0)
    peers = {}
    for impl in ("grouped_mm", "eager"):
        cfg._experts_implementation = impl
        peers[impl] = MiniMaxM3VLSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in peers["grouped_mm"].parameters():
            p.normal_(0, 0.02)
    peers["eager"].load_state_dict(peers["grouped_mm"].state_dict())
    ours = {}
    for impl in ("grouped", "loop"):
        ours[impl] = MoE(MoEConfig(H, E, K, I, Activation("swigluoai", cfg.swiglu_alpha, cfg.swiglu_limit), "sigmoid",
                                   score_correction_bias=True, shared_intermediate_size=I, experts_impl=impl))
        state = dict(peers["grouped_mm"].state_dict())
        gate, up = state.pop("shared_experts.gate_up_proj.weight").chunk(2)
        state |= {"shared_experts.gate_proj.weight": gate, "shared_experts.up_proj.weight": up}
        ours[impl].load_state_dict(state)
    x = torch.randn(1, T, H, requires_grad=True)
    flops = 3 * (T * K * 6 * H * I + T * 6 * H * I + 2 * T * H * E)  # routed + shared + router, x3 for backward
    return Case(f"MoE block (M3: {T} tokens, H {H}, I {I}, {E} experts, top-{K}, shared)", "transformers grouped_mm",
                flops, {
                    "plait grouped": lambda: _backward(ours["grouped"](x)),
                    "plait loop": lambda: _backward(ours["loop"](x)),
                    "transformers grouped_mm": lambda: _backward(peers["grouped_mm"](x)),
                    "transformers eager": lambda: _backward(peers["eager"](x)),
                })


def attention_case(quick: bool, window: int | None, sinks: bool) -> Case:
    """The attention core (q, k, v -> output) of a MiMo-V2-Flash layer: transformers' eager function
    (the only one MiMo supports) with its mask, against plait's SDPA and eager backends."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.mimo_v2_flash.configuration_mimo_v2_flash import MiMoV2FlashConfig
    from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import eager_attention_forward

    from plait.nn.attention import AttentionMask, attend, num_flops_attention

    S, Hq, Hkv, D, Dv = (256, 4, 2, 48, 32) if quick else (2048, 8, 4, 192, 128)
    w = None if window is None else (16 if quick else window)
    cfg = MiMoV2FlashConfig(hidden_size=Hq * 64, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D,
                            v_head_dim=Dv, sliding_window=w or 128, num_hidden_layers=1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    q = torch.randn(1, Hq, S, D, requires_grad=True)
    k = torch.randn(1, Hkv, S, D, requires_grad=True)
    v = torch.randn(1, Hkv, S, Dv, requires_grad=True)
    sink = torch.randn(Hq, requires_grad=True) if sinks else None
    embeds = torch.zeros(1, S, 8)
    make_mask = create_sliding_window_causal_mask if w else create_causal_mask
    hf_mask = make_mask(cfg, embeds, None, None, position_ids=torch.arange(S).view(1, S))

    class Layer:  # what transformers' attention function reads off its module
        num_key_value_groups = Hq // Hkv
        training = True

    Layer.sinks = sink
    mask = AttentionMask.build(1, S, "cpu")
    scale = D**-0.5

    def peer():
        out, _ = eager_attention_forward(Layer, q, k, v, hf_mask, scaling=scale)
        _backward(out)

    def ours(backend):
        return lambda: _backward(attend(q, k, v, mask, scale=scale, window=w, sinks=sink, backend=backend))

    kind = f"sliding window {w}" if w else "full causal"
    flops = 3 * num_flops_attention(1, Hq, S, D, Dv, w)  # backward ~ 2x forward
    return Case(f"attention core ({kind}{', sinks' if sinks else ''}; S {S}, {Hq}/{Hkv} heads, d {D}/{Dv})",
                "transformers eager", flops,
                {"plait sdpa": ours("sdpa"), "plait eager": ours("eager"), "transformers eager": peer})


def loss_case(quick: bool) -> Case:
    from transformers.loss.loss_utils import ForCausalLMLoss

    from plait.nn.loss import causal_lm_chunked_loss_sum

    T, H, V = (128, 32, 20_000) if quick else (1024, 512, 200_000)
    torch.manual_seed(0)
    hidden = torch.randn(1, T, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (1, T))

    def peer():  # what a transformers causal LM does: full logits, upcast to float32, cross-entropy
        logits = hidden @ weight.T
        ForCausalLMLoss(logits, labels, vocab_size=V).backward()

    def ours():
        (causal_lm_chunked_loss_sum(hidden, weight, labels) / (T - 1)).backward()

    return Case(f"LM head + cross-entropy ({T} tokens, H {H}, vocab {V:,})", "transformers (plain CE)",
                3 * 2 * T * H * V, {"plait chunked": ours, "transformers (plain CE)": peer})


CASES = {
    "moe": lambda q: moe_case(q),
    "attn_full": lambda q: attention_case(q, None, False),
    "attn_swa": lambda q: attention_case(q, 128, False),
    "attn_swa_sinks": lambda q: attention_case(q, 128, True),
    "loss": lambda q: loss_case(q),
}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def matmul_peak_flops(quick: bool, repeats: int = 5) -> float:
    n = 512 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_case(case: Case, repeats: int) -> dict[str, float]:
    for fn in case.steps.values():  # warm-up
        fn()
    times = {name: [] for name in case.steps}
    for _ in range(repeats):
        for name, fn in case.steps.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_child(case_key: str, impl: str, quick: bool) -> None:
    """Subprocess body: build the case, warm up, reset the resident high-water mark, run one step and
    print how far the resident set rose above where it started (bytes)."""
    case = CASES[case_key](quick)
    fn = case.steps[impl]
    fn()  # first-call allocations (thread pools, kernels) are not the step's memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    print(json.dumps({"peak_bytes": max(_status_kib("VmHWM") - before, 0) * 1024}))


def peak_memory(case_key: str, impl: str, quick: bool) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-child", case_key, impl] + (["--quick"] if quick else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def run(quick: bool, repeats: int, only: list[str] | None) -> dict:
    torch.manual_seed(0)
    peak = matmul_peak_flops(quick)
    results = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(), "matmul_peak_gflops": peak / 1e9,
               "quick": quick, "cases": []}
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    for key, make in CASES.items():
        if only and key not in only:
            continue
        case = make(quick)
        times = time_case(case, repeats)
        row = {"key": key, "case": case.name, "peer": case.peer, "matmul_peak_gflops": peak / 1e9, "impls": {}}
        for impl, t in times.items():
            mem = peak_memory(key, impl, quick)
            row["impls"][impl] = {
                "seconds": t,
                "speedup_vs_peer": times[case.peer] / t,
                "fraction_of_matmul_peak": case.flops / t / peak,
                "peak_mib": mem / 2**20,
            }
        results["cases"].append(row)
        print(f"\n{case.name}")
        for impl, r in row["impls"].items():
            print(f"  {impl:26s} {r['seconds'] * 1e3:9.1f} ms  x{r['speedup_vs_peer']:5.2f} vs peer  "
                  f"{100 * r['fraction_of_matmul_peak']:5.1f}% of peak  {r['peak_mib']:8.1f} MiB")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 2.2 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        names = list(case["impls"])
        colors = ["tab:blue" if n.startswith("plait") else "tab:gray" for n in names]
        row[0].barh(names, [case["impls"][n]["speedup_vs_peer"] for n in names], color=colors)
        row[0].axvline(1.0, color="black", lw=0.8)
        row[0].set_title(case["case"], fontsize=8, loc="left")
        row[0].set_xlabel("speed-up vs " + case["peer"], fontsize=8)
        row[1].barh(names, [case["impls"][n]["peak_mib"] for n in names], color=colors)
        row[1].set_xlabel("peak memory of one step (MiB)", fontsize=8)
        for ax in row:
            ax.tick_params(labelsize=7)
    fig.suptitle(f"plait building blocks vs transformers 5.23 (CPU, {results['threads']} threads, "
                 f"matmul peak {results['matmul_peak_gflops']:.0f} GFLOP/s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(results: dict) -> str:
    lines = ["| case | implementation | fwd+bwd ms | vs peer | % of matmul peak | peak MiB |", "|---|---|---:|---:|---:|---:|"]
    for case in results["cases"]:
        for impl, r in case["impls"].items():
            lines.append(f"| {case['case']} | {impl} | {r['seconds'] * 1e3:.1f} | {r['speedup_vs_peer']:.2f}x | "
                         f"{100 * r['fraction_of_matmul_peak']:.0f}% | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=list(CASES), help="run only these cases")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(*args.memory_child, args.quick)
        return
    results = run(args.quick, args.repeats, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "blocks-cpu-quick" if args.quick else "blocks-cpu"
    previous = args.out / f"{stem}.json"
    if args.only and previous.exists():  # re-measured cases replace theirs; the others are kept
        kept = [c for c in json.loads(previous.read_text())["cases"] if c["key"] not in args.only]
        results["cases"] = sorted(kept + results["cases"], key=lambda c: list(CASES).index(c["key"]))
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"{stem}.png")
    print("\n" + markdown_table(results))
    print(f"\nwrote {args.out / (stem + '.json')} and .png")


if __name__ == "__main__":
    main()
