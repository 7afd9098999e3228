"""The benchmark scripts keep running: each in its quick mode, writing its JSON and PNG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, args, stem", [
    ("blocks.py", ["--only", "attn_swa_sinks", "loss", "--repeats", "1"], "blocks-cpu-quick"),
    ("train_step.py", ["--steps", "1", "--model", "mimo_v2_flash"], "train_step-mimo_v2_flash-cpu-quick"),
    ("train_step.py", ["--steps", "1", "--model", "minimax_m3", "--host-allocator", "keep_freed"],
     "train_step-minimax_m3-cpu-keep_freed-quick"),
])
def test_benchmark_script_runs_and_writes_results(tmp_path, script, args, stem):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(tmp_path), *args],
                   check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
    results = json.loads((tmp_path / f"{stem}.json").read_text())
    assert results["matmul_peak_gflops"] > 0
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    rows = results.get("cases") or results.get("shapes")
    assert rows
    if script == "train_step.py":  # each step's time is kept, and the speed-up's spread over the rounds
        for row in rows:
            assert all(len(impl["step_seconds_each"]) == 1 and impl["page_faults_per_step"] >= 0
                       for impl in row["impls"].values())
            rounds = row["speedup_per_round"]
            assert rounds["min"] <= rounds["median"] <= rounds["max"]


def test_step_bound_script_runs_and_writes_results(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_bound.py"), "--quick", "--out", str(tmp_path),
                    "--batch", "2", "--seq", "32"], check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
    r = json.loads((tmp_path / "step_bound-mimo_v2_flash-2x32-cpu-quick.json").read_text())
    assert r["matmul_calls"] > 0 and 0 < r["matmuls_alone_seconds"]
    assert r["kernels_in_step_seconds"]["aten::_fused_adamw_"] > 0
    assert r["transformers_step_seconds"] > 0 and r["bound_seconds"] > r["matmuls_alone_seconds"]
    assert r["speedup_ceiling"] == r["transformers_step_seconds"] / r["bound_seconds"]
    assert (tmp_path / "step_bound-mimo_v2_flash-2x32-cpu-quick.png").stat().st_size > 0


def test_pipeline_bubble_script_runs_and_writes_results(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline_bubble.py"), "--quick", "--out", str(tmp_path),
                    "--schedules", "1f1b", "zbv"], check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
    results = json.loads((tmp_path / "pipeline_bubble-cpu-quick.json").read_text())
    runs = results["processes"]["2"]
    assert runs.keys() == {"1f1b", "zbv"}
    assert runs["1f1b"]["bubble_theoretical"] == pytest.approx(1 / 9)  # 2 ranks, 8 microbatches
    assert all(0.0 <= r["bubble"] < 1.0 for run in runs.values() for r in run["ranks"])
    assert (tmp_path / "pipeline_bubble-cpu-quick.png").stat().st_size > 0


def test_speculative_benchmark_runs_and_checks_outputs(tmp_path):
    """Quick mode: a random model with MTP depths; every method's captions must equal plain greedy ones."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speculative.py"), "--quick", "--out", str(tmp_path),
                    "--samples", "4", "--batch-sizes", "1", "4", "--max-new-tokens", "6"],
                   check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
    results = json.loads((tmp_path / "speculative-cpu-quick.json").read_text())
    assert [c["batch_size"] for c in results["cases"]] == [1, 4]
    for case in results["cases"]:
        methods = case["methods"]
        assert set(methods) == {"plain", "speculative_1", "speculative_2"}
        assert all(m["equal_to_plain"] for m in methods.values())
        assert len(methods["speculative_2"]["acceptance_rate"]) == 2
    assert (tmp_path / "speculative-cpu-quick.png").stat().st_size > 0


def test_step_split_script_accounts_for_the_step(tmp_path):
    """Quick M3-VL (vision tower, projector, MoE and indexer layers): every part is timed and the rows add up
    to the step they split."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_split.py"), "--quick", "--out", str(tmp_path),
                    "--model", "minimax_m3", "--batch", "2", "--seq", "64", "--steps", "3"],
                   check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
    r = json.loads((tmp_path / "step_split-minimax_m3-2x64-cpu-quick.json").read_text())
    assert {"language_model self_attn", "language_model mlp", "vision_tower mlp", "multi_modal_projector"} <= r["kinds"].keys()
    assert all(t["forward_ms"] > 0 and t["backward_ms"] > 0 for t in r["parts"].values())
    # medians of each row need not add up to the median step exactly; 20% covers that on a noisy machine, and a
    # part counted twice or left out is more
    assert sum(k["share_of_step"] for k in r["kinds"].values()) == pytest.approx(1.0, rel=0.2)
    assert (tmp_path / "step_split-minimax_m3-2x64-cpu-quick.png").stat().st_size > 0
