"""Data parallelism against the single-process run: same global batch, same losses (gloo, 2 processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import plait
from plait.metrics import read_metrics
from plait.train import train
from tests.parallel.compare import launch_report

TORCHRUN = Path(sys.executable).with_name("torchrun")


def spawn(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m plait train ...` on gloo, one thread per worker (2 cores here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "plait", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def overrides(config, out: Path) -> list[str]:
    return [f"output_dir={out}", f"data.cache_dir={config.data.cache_dir}", f"data.num_train={config.data.num_train}",
            f"data.num_val={config.data.num_val}", f"data.num_test={config.data.num_test}",
            f"train.steps={config.train.steps}", f"train.batch_size={config.train.batch_size}",
            f"train.warmup_steps={config.train.warmup_steps}", "train.eval_every=0", "train.progress=false",
            f"eval.num_samples={config.eval.num_samples}", f"eval.max_new_tokens={config.eval.max_new_tokens}",
            "checkpoint.every_steps=2"]


def step_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_two_processes_log_the_single_process_losses(small_config, tmp_path):
    single = small_config("train.steps=4", "checkpoint.every_steps=2")
    train(single, console=Console(quiet=True))
    res = spawn(2, "configs/default.yaml", *overrides(single, tmp_path / "dp2"), "parallel.dp=2")
    assert res.returncode == 0, launch_report(res)
    ours, ref = step_rows(tmp_path / "dp2"), step_rows(single.output_dir)
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        assert a["world_size"] == 2 and b["world_size"] == 1
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # the rank-0 export of a 2-process run is an ordinary HF model dir, its DCP state has both ranks' files
    ckpt = tmp_path / "dp2" / "checkpoints" / "step_4"
    assert plait.from_pretrained(ckpt).config.model_type == "minimax_m3_vl"
    assert len(list((ckpt / "training_state").glob("*.distcp"))) == 2
    assert res.stdout.count("held-out accuracy: ") == 1  # one rank speaks


def test_a_world_size_that_does_not_match_parallel_is_refused(small_config, tmp_path):
    cfg = small_config("parallel.dp=2")
    with pytest.raises(ValueError, match=r"2 processes expected, but 1 were launched"):
        train(cfg, console=Console(quiet=True))
    assert not cfg.output_dir.exists()
    pp_dp = small_config("parallel.dp=2", "parallel.pp=2", "parallel.microbatches=2")
    with pytest.raises(ValueError, match=r"parallel.dp x parallel.pp = 2 x 2 = 4 processes expected, but 1 were "
                                         r"launched; run it as torchrun --nproc-per-node 4"):
        train(pp_dp, console=Console(quiet=True))
    assert not pp_dp.output_dir.exists()
    res = spawn(2, "configs/default.yaml", *overrides(small_config(), tmp_path / "mismatch"))
    assert res.returncode != 0
    assert "1 processes expected, but 2 were launched" in res.stderr + res.stdout
    assert not (tmp_path / "mismatch").exists()
