"""Seeded parity sweeps of plait's native models against transformers 5.23.0 (float32, CPU).

    python -m tests.sweeps.run mimo_v2_flash --cases 300            # random configs drawn from seeds 0..299
    python -m tests.sweeps.run minimax_m3 --cases 300 --first-seed 1000

Each seed draws one case (`tests/sweeps/<model>.py`: a config, inputs), and the case is checked: logits, loss and
every gradient, cached greedy generation and the save round trip, as the model's tests do on their fixed configs.
The report counts the cases that matched, the mismatches (with their seeds, so `--first-seed S --cases 1` replays
one) and the cases transformers itself could not run, and writes them to
`benchmarks/results/parity_sweep-<model>.json`. The default test suite runs a few seeds of each sweep
(`tests/models/test_parity_sweeps.py`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

from tests.sweeps.common import ReferenceFailure

MODELS = ("mimo_v2_flash", "minimax_m3")
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def sweep_module(model: str):
    if model not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {model!r}")
    return importlib.import_module(f"tests.sweeps.{model}")


def run_case(model: str, seed: int) -> dict:
    """One seed's outcome: status 'match' (with the measured differences), 'mismatch' or 'reference_failure'."""
    module = sweep_module(model)
    case = module.random_case(seed)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return {"seed": seed, "status": "match", "diffs": module.check(case, Path(tmp))}
        except ReferenceFailure as err:
            return {"seed": seed, "status": "reference_failure", "error": str(err)[:300], "case": case}
        except Exception as err:  # noqa: BLE001 - a sweep reports every way plait fails, not only mismatches
            return {"seed": seed, "status": "mismatch", "error": f"{type(err).__name__}: {err}"[:500],
                    "where": traceback.format_exc(limit=-3)[-800:], "case": case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # its per-case config warnings, not results
    start = time.perf_counter()
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.cases):
        rows.append(run_case(args.model, seed))
        if rows[-1]["status"] != "match":
            print(f"seed {seed}: {rows[-1]['status']}: {rows[-1]['error']}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("match", "mismatch", "reference_failure")}
    worst = {}
    for r in rows:
        for key, value in r.get("diffs", {}).items():
            worst[key] = max(worst.get(key, 0.0), value)
    report = {"model": args.model, "first_seed": args.first_seed, "cases": args.cases, "counts": counts,
              "worst_diffs": worst, "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
              "failures": [r for r in rows if r["status"] != "match"]}
    out = args.out or RESULTS / f"parity_sweep-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.model}: {counts['match']} matched, {counts['mismatch']} mismatched, "
          f"{counts['reference_failure']} transformers could not run; worst {worst}; wrote {out}")


if __name__ == "__main__":
    main()
