"""Runs that survive: a killed run resumes from its last checkpoint and logs the same losses, bit for bit."""

import shutil
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from plait.metrics import read_metrics
from plait.train import train

RESUMABLE = ["train.resume=auto", "checkpoint.every_steps=2", "train.steps=6"]


def losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]


def test_resume_from_an_earlier_checkpoint_repeats_the_same_steps(small_config):
    cfg = small_config(*RESUMABLE)
    train(cfg, console=Console(quiet=True))
    uninterrupted = losses(cfg.output_dir)
    for step in (4, 6):  # as if the run had died right after saving step 2
        shutil.rmtree(cfg.output_dir / "checkpoints" / f"step_{step}")
    console = Console(record=True, width=200)
    train(cfg, console=console)
    assert "resumed from step 2" in console.export_text()
    assert losses(cfg.output_dir) == uninterrupted  # bitwise, and no duplicated rows


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_losses(small_config, tmp_path, data_cache):
    reference = small_config(*RESUMABLE, "train.steps=10", f"output_dir={tmp_path / 'reference'}")
    train(reference, console=Console(quiet=True))
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "plait", "train", "configs/default.yaml", f"output_dir={out}",
            f"data.cache_dir={data_cache}", "data.num_train=512", "data.num_val=64", "data.num_test=64",
            "train.batch_size=16", "train.warmup_steps=1", "train.eval_every=0", "train.progress=false",
            "eval.num_samples=16", "eval.max_new_tokens=16", *RESUMABLE, "train.steps=10"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:  # kill between checkpoints: after step 5 was logged
        if metrics.exists() and any(r.get("step", 0) >= 5 for r in read_metrics(metrics, skip_partial=True)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step_10").exists(), "the run finished before it could be killed"
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from step" in done.stdout
    # bit for bit when run alone; once, in a full test session (the reference trains inside the long-lived pytest
    # process, the resumed run in a fresh one), the first resumed step differed by 1e-7 relative
    assert losses(out) == pytest.approx(losses(reference.output_dir), rel=1e-6, abs=0)


def test_resume_into_a_different_config_is_refused_before_anything_is_written(small_config):
    cfg = small_config(*RESUMABLE)
    train(cfg, console=Console(quiet=True))
    before = (cfg.output_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"different config \(train.lr: saved 0.001, now 0.0005\)"):
        train(small_config(*RESUMABLE, "train.lr=5e-4"), console=Console(quiet=True))
    assert (cfg.output_dir / "metrics.jsonl").read_text() == before


def test_resuming_a_finished_run_re_evaluates_and_re_exports(small_config):
    cfg = small_config(*RESUMABLE)
    first = train(cfg, console=Console(quiet=True))
    rows = losses(cfg.output_dir)
    again = train(cfg, console=Console(quiet=True))
    assert losses(cfg.output_dir) == rows
    assert again.final_metrics == first.final_metrics
    assert again.checkpoint_dir == first.checkpoint_dir and (again.checkpoint_dir / "model.safetensors").is_file()


def test_a_new_run_into_an_earlier_runs_checkpoints_is_refused_or_starts_over(small_config):
    cfg = small_config(*RESUMABLE)
    train(cfg, console=Console(quiet=True))
    ckpts = cfg.output_dir / "checkpoints"
    before = (cfg.output_dir / "metrics.jsonl").read_text()
    shorter = ["train.steps=4", "checkpoint.every_steps=2"]
    with pytest.raises(ValueError, match=r"train.resume=never: .* holds checkpoints of an earlier run \(steps 2, 4, 6\)"):
        train(small_config(*shorter, "train.resume=never"), console=Console(quiet=True))
    assert (cfg.output_dir / "metrics.jsonl").read_text() == before
    # overwrite: the earlier run's step_6 must not survive beside the new run's last step
    train(small_config(*shorter, "train.resume=overwrite"), console=Console(quiet=True))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4"]
    assert len(losses(cfg.output_dir)) == 4


def test_a_trainer_state_that_disagrees_with_its_directory_is_refused(small_config):
    cfg = small_config(*RESUMABLE)
    train(cfg, console=Console(quiet=True))
    state = cfg.output_dir / "checkpoints" / "step_6" / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 6', '"step": 5'))
    with pytest.raises(ValueError, match="trainer_state.json says step 5, the directory step 6"):
        train(cfg, console=Console(quiet=True))


def test_resume_without_a_checkpoint_starts_fresh(small_config):
    cfg = small_config(*RESUMABLE)
    console = Console(record=True, width=200)
    train(cfg, console=console)
    assert "resumed" not in console.export_text()
    assert len(losses(cfg.output_dir)) == 6


@pytest.mark.parametrize("damage", ["trainer_state", "scheduler", "rng", "data", "run_config", "dcp_shard",
                                    "dcp_shard_unlisted", "dcp_bytes", "weights", "weight_bytes"])
def test_a_damaged_training_checkpoint_is_a_clear_error(small_config, damage):
    import json

    cfg = small_config(*RESUMABLE)
    train(cfg, console=Console(quiet=True))
    ckpt = cfg.output_dir / "checkpoints" / "step_6"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if damage == "trainer_state":
        (ckpt / "trainer_state.json").write_text("{")
        message = "trainer_state.json: malformed JSON"
    elif damage in ("scheduler", "rng", "data"):  # a key gone, a short RNG state, a wrong-typed entry
        if damage == "scheduler":
            del state["scheduler"]
        else:
            state[damage] = [1, 2, 3] if damage == "rng" else {"epoch": "x"}
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        message = f"trainer_state.json entry '{damage}' does not restore"
    elif damage == "run_config":
        (ckpt / "plait_run.yaml").write_text("train: [\n")
        message = "plait_run.yaml is not a run config"
    elif damage.startswith("dcp_"):
        shard = next((ckpt / "training_state").glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        if damage == "dcp_bytes":  # same length, some optimizer state overwritten: only the checksum sees it
            data[len(data) // 2 : len(data) // 2 + 8] = bytes(8)
            shard.write_bytes(bytes(data))
            message = r"__0_0.distcp: damaged or changed after plait wrote it: plait_checksums.json records"
        else:
            shard.write_bytes(bytes(data[:100]))
            message = "distcp: damaged or changed after plait wrote it"
            if damage == "dcp_shard_unlisted":  # no checksum file (an older checkpoint): the reader's own error
                (ckpt / "plait_checksums.json").unlink()
                message = "cannot read training_state"
    else:
        weights = ckpt / "model.safetensors"
        data = bytearray(weights.read_bytes())
        if damage == "weight_bytes":
            data[-64:-56] = b"\xff" * 8
            message = "model.safetensors: damaged or changed after plait wrote it"
        else:
            data = data[: len(data) - 1000]
            message = "truncated safetensors file"
        weights.write_bytes(bytes(data))
    before = (cfg.output_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=message):
        train(cfg, console=Console(quiet=True))
    assert (cfg.output_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("crash", ["before_rename", "after_rename"])
def test_a_crash_at_any_point_of_a_save_resumes_from_a_complete_checkpoint(small_config, crash):
    cfg = small_config(*RESUMABLE)
    train(cfg, console=Console(quiet=True))
    uninterrupted = losses(cfg.output_dir)
    root = cfg.output_dir / "checkpoints"
    if crash == "before_rename":
        # killed while writing step_6: only a half-written temp dir exists beside step_4
        partial = root / ".tmp-step_6-killed"
        shutil.copytree(root / "step_6", partial)
        shutil.rmtree(partial / "training_state")
        (partial / "model.safetensors").write_bytes(b"\0" * 10)
        shutil.rmtree(root / "step_6")
        expected = "resumed from step 4"
    else:
        expected = "resumed from step 6"  # the rename happened: step_6 is complete and is used
    console = Console(record=True, width=200)
    train(cfg, console=console)
    assert expected in console.export_text()
    assert losses(cfg.output_dir) == uninterrupted


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_the_run_resumes(small_config, monkeypatch):
    import errno

    import plait
    import plait.train as train_module

    cfg = small_config(*RESUMABLE)
    reference = small_config(*RESUMABLE, f"output_dir={cfg.output_dir.parent / 'reference'}")
    train(reference, console=Console(quiet=True))
    real_write = train_module.write_model_dir

    def disk_full_at_step_4(tmp, *args, **kwargs):
        if ".tmp-step_4-" in tmp.name:
            (tmp / "model.safetensors").write_bytes(b"\0" * 64)  # some bytes landed before the disk filled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(tmp, *args, **kwargs)

    monkeypatch.setattr(train_module, "write_model_dir", disk_full_at_step_4)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, console=Console(quiet=True))
    root = cfg.output_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]  # no partial step_4, no temp dir left behind
    plait.from_pretrained(root / "step_2")  # the previous checkpoint is intact
    monkeypatch.setattr(train_module, "write_model_dir", real_write)
    console = Console(record=True, width=200)
    train(cfg, console=console)  # disk space back: the same command continues
    assert "resumed from step 2" in console.export_text()
    assert losses(cfg.output_dir) == losses(reference.output_dir)


def test_a_crash_between_the_two_renames_of_a_re_export_resumes_from_a_complete_checkpoint(small_config, monkeypatch):
    import os

    import plait.checkpoint as checkpoint_module

    cfg = small_config(*RESUMABLE)
    train(cfg, console=Console(quiet=True))
    uninterrupted = losses(cfg.output_dir)
    # Re-running a finished run re-exports step_6 over itself: the old dir is moved aside, then the new one
    # renamed in. Die between the two renames.
    real_replace = os.replace

    def replace_then_die(src, dst):
        if str(dst).endswith("/step_6") and ".tmp-step_6-" in str(src):
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, console=Console(quiet=True))
    monkeypatch.undo()
    root = cfg.output_dir / "checkpoints"
    assert not (root / "step_6").exists()  # moved aside, never replaced
    console = Console(record=True, width=200)
    train(cfg, console=console)
    assert "resumed from step 4" in console.export_text()
    assert losses(cfg.output_dir) == uninterrupted
    assert not list(root.glob(".old-*")) and not list(root.glob(".tmp-*"))  # the crash's leftovers are gone
