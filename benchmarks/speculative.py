"""Self-speculative decoding with a model's MTP depths against plain greedy decoding, on held-out images.

    make train                                                # the default model, with its MTP depth
    .venv/bin/python benchmarks/speculative.py --checkpoint runs/default/checkpoints/step_1500 --tag default
    .venv/bin/python -m plait train configs/mtp_draft.yaml    # 2 fresh depths on a model without any
    .venv/bin/python benchmarks/speculative.py --checkpoint runs/mtp-draft/checkpoints/step_400
    .venv/bin/python benchmarks/speculative.py --quick        # a random model with MTP depths: the script runs

For each batch size, the captions of --samples held-out images (the run's eval split) are decoded by:
- plait plain greedy decoding with the KV cache (`plait.generate`), the baseline;
- plait self-speculative decoding (`plait.speculative`) drafting 1..D tokens per step;
- transformers' `generate` (greedy) on the same weights, the stock class (it ignores the MTP weights).
Every output is checked to be token for token the baseline's. Reported per method: new tokens per second
(tokens up to and including each caption's eos), the speed-up over the baseline, and for speculative
decoding the acceptance rate per depth (the fraction of verification forwards whose drafts 1..d were all
kept) and the new tokens per verification forward. Methods run interleaved, --repeats times; the median
time counts. One process, float32, the threads torch is given.

Writes benchmarks/results/speculative-cpu.json and .png (speculative-<tag>-cpu with --tag, suffix -quick in
quick mode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def load_run(checkpoint: Path | None, quick: bool):
    """The model, its held-out captions dataset and vision inputs: from a checkpoint, or (quick) a random
    default model with 2 MTP depths on a small slice of the bundled data."""
    from plait.cli import _checkpoint_run_config
    from plait.config import load_config
    from plait.data.tokenizer import load_tokenizer
    from plait.train import prepare_run

    if checkpoint is not None:
        cfg = _checkpoint_run_config(checkpoint, [])
        run = prepare_run(cfg, tokenizer=load_tokenizer(checkpoint))
    else:
        cache = Path(tempfile.mkdtemp(prefix="plait-spec-"))
        cfg = load_config("configs/default.yaml", [f"data.cache_dir={cache}", "data.num_train=64", "data.num_val=8",
                                                   "data.num_test=64", "model.mtp.num_layers=2"])
        run = prepare_run(cfg)
    if not getattr(run.model, "mtp_config", None) or not run.model.mtp_config.enabled:
        raise SystemExit(f"{checkpoint}: the model has no MTP depths (train some with configs/mtp_draft.yaml)")
    return run, cfg


def stock_model(checkpoint: Path | None, run):
    """The transformers class on the same weights, or None when there is no saved dir to load it from."""
    if checkpoint is None:
        return None
    import plait

    return plait.from_pretrained(checkpoint, implementation="transformers").eval()


def new_token_count(tokens: torch.Tensor, eos: int) -> int:
    """Tokens the rows produced: each up to and including its first eos (or every column without one)."""
    is_eos = (tokens == eos).int()
    return int(((is_eos.cumsum(dim=1) - is_eos) == 0).sum())


def run_benchmark(checkpoint: Path | None, quick: bool, samples: int, batch_sizes: list[int], repeats: int,
                  max_new_tokens: int | None = None) -> dict:
    from plait.data.collate import collate_padded
    from plait.data.images import normalize
    from plait.generate import generate
    from plait.speculative import SpeculativeStats, generate_speculative

    run, cfg = load_run(checkpoint, quick)
    model = run.model.eval()
    stock = stock_model(checkpoint, run)
    dataset = run.datasets[cfg.eval.split]
    samples = min(samples, len(dataset))
    depths = model.mtp_config.num_layers
    prompt = dataset.prompt_ids()
    eos, pad = dataset.eos_id, dataset.pad_id
    max_new = max_new_tokens or cfg.eval.max_new_tokens
    methods = ["plain"] + [f"speculative_{k}" for k in range(1, depths + 1)] + (["transformers"] if stock else [])
    results = {"checkpoint": str(checkpoint) if checkpoint else None, "quick": quick, "samples": samples,
               "mtp_depths": depths, "threads": torch.get_num_threads(), "max_new_tokens": max_new, "cases": []}
    for batch_size in batch_sizes:
        batches = []
        for start in range(0, samples, batch_size):
            images = collate_padded([dataset[i] for i in range(start, min(samples, start + batch_size))], pad)["images"]
            batches.append((prompt.expand(images.shape[0], -1), run.vision_inputs(normalize(images))))
        times = {m: [] for m in methods}
        outputs, stats = {}, {}

        def decode(method: str):
            outs, st = [], SpeculativeStats()
            for ids, vision in batches:
                if method == "plain":
                    outs.append(generate(model, ids, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad,
                                         **vision))
                elif method == "transformers":
                    full = stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **vision,
                                          max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
                    outs.append(full[:, ids.shape[1]:])
                else:
                    outs.append(generate_speculative(model, ids, max_new_tokens=max_new, eos_token_id=eos,
                                                     pad_token_id=pad, num_draft_tokens=int(method.split("_")[1]),
                                                     stats=st, **vision))
            return outs, st

        with torch.no_grad():
            for method in methods:  # warm-up, and the outputs every repeat must reproduce
                outputs[method], stats[method] = decode(method)
            for _ in range(repeats):
                for method in methods:
                    t0 = time.perf_counter()
                    decode(method)
                    times[method].append(time.perf_counter() - t0)
        baseline = outputs["plain"]
        tokens = sum(new_token_count(o, eos) for o in baseline)
        rows = {}
        for method in methods:
            same = all(_same_tokens(a, b, pad) for a, b in zip(outputs[method], baseline))
            if not same:
                raise SystemExit(f"batch {batch_size}: {method} decoded other tokens than plain greedy decoding")
            seconds = statistics.median(times[method])
            row = {"seconds": seconds, "tokens_per_s": tokens / seconds, "equal_to_plain": same}
            if method.startswith("speculative"):
                st = stats[method]
                row.update({"acceptance_rate": st.acceptance_rate, "tokens_per_forward": st.tokens_per_forward,
                            "verification_forwards": st.rounds})
            rows[method] = row
        for row in rows.values():
            row["speedup"] = rows["plain"]["seconds"] / row["seconds"]
        results["cases"].append({"batch_size": batch_size, "new_tokens": tokens, "methods": rows})
        print(f"batch {batch_size}: " + ", ".join(f"{m} {r['tokens_per_s']:,.0f} tok/s ({r['speedup']:.2f}x)"
                                                  for m, r in rows.items()))
    return results


def _same_tokens(a: torch.Tensor, b: torch.Tensor, pad: int) -> bool:
    """Equal up to trailing pad columns (transformers may stop at another length once every row ended)."""
    width = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[1]), value=pad)
    b = torch.nn.functional.pad(b, (0, width - b.shape[1]), value=pad)
    return torch.equal(a, b)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    methods = list(cases[0]["methods"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(cases))]
        ax.bar(xs, [c["methods"][method]["speedup"] for c in cases], width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"batch {c['batch_size']}" for c in cases])
    ax.set_ylabel("tokens/s vs plain greedy")
    ax.set_title(f"Self-speculative decoding, {results['mtp_depths']} MTP depths ({results['samples']} images)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a plait model dir with MTP depths")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="results go to speculative-<tag>-cpu.json (default: speculative-cpu)")
    args = parser.parse_args()
    if (args.checkpoint is None) != args.quick:
        parser.error("pass --checkpoint DIR, or --quick")
    samples = min(args.samples, 16) if args.quick else args.samples
    results = run_benchmark(args.checkpoint, args.quick, samples, args.batch_sizes, 1 if args.quick else args.repeats,
                            args.max_new_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"speculative-{args.tag + '-' if args.tag else ''}cpu" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')} and .png")


if __name__ == "__main__":
    main()
