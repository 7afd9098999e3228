"""Shared fixtures: a small data cache and one short training run reused by the tests that need a checkpoint."""

from __future__ import annotations

import pytest
import torch

from plait.config import load_config

SMALL_DATA = ["data.num_train=512", "data.num_val=64", "data.num_test=64"]


@pytest.fixture(autouse=True)
def _threads():
    # Fixed thread count: CPU results are only bitwise repeatable at a fixed count.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def small_config(tmp_path, data_cache):
    """A run of the default model on a small slice of `shapes`, writing only under tmp_path."""

    def make(*overrides: str):
        return load_config("configs/default.yaml", [
            f"output_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}", *SMALL_DATA,
            "train.steps=4", "train.batch_size=16", "train.warmup_steps=1", "train.eval_every=0",
            "train.progress=false", "eval.num_samples=16", "eval.max_new_tokens=16", *overrides,
        ])

    return make


def _train_briefly(out, data_cache, *overrides: str):
    """A checkpoint from a few steps of the default model (not a good model, a real one: after 6 steps its
    greedy captions have words in them)."""
    from rich.console import Console

    from plait.train import train

    cfg = load_config("configs/default.yaml", [
        f"output_dir={out}", f"data.cache_dir={data_cache}", *SMALL_DATA, "train.steps=6", "train.batch_size=16",
        "train.warmup_steps=1", "train.eval_every=0", "train.progress=false", "eval.num_samples=8",
        "eval.max_new_tokens=12", *overrides,
    ])
    return train(cfg, console=Console(quiet=True)).checkpoint_dir


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, data_cache):
    """The default model as `make train` builds it (with its MTP depth), after a few steps."""
    return _train_briefly(tmp_path_factory.mktemp("trained"), data_cache)


@pytest.fixture(scope="session")
def trained_checkpoint_without_mtp(tmp_path_factory, data_cache):
    """The default model without MTP depths, after a few steps (what `model.mtp.train_only` extends)."""
    return _train_briefly(tmp_path_factory.mktemp("trained-no-mtp"), data_cache, "model.mtp.num_layers=0")
