"""The comparison every pipeline test makes: the stages' gradients, put together, against the single process."""

import pytest
import torch


def max_relative_diff(ranks: list[dict], ref_grads: dict, ref_losses: list[float]) -> float:
    """Checks every parameter's gradient (each on exactly one of `ranks`' stages) within 1e-5 of the largest
    reference entry of its tensor, and every microbatch loss within 1e-5 relative; returns the largest gradient
    difference relative to that entry."""
    grads, losses = {}, []
    for r in ranks:
        assert not (grads.keys() & r["grads"].keys()), "a parameter lives on two stages"
        grads |= r["grads"]
        losses += r["losses"]
    assert grads.keys() == ref_grads.keys()
    worst = 0.0
    for name, g in grads.items():
        ref = ref_grads[name]
        scale = ref.abs().max().item() + 1e-12
        worst = max(worst, (g - ref).abs().max().item() / scale)
        assert torch.allclose(g, ref, rtol=1e-5, atol=1e-5 * scale), name
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    return worst


def launch_report(res) -> str:
    """What a failed torchrun launch printed: the failing rank's traceback comes first in its stderr, the launcher's
    summary last, so both ends."""
    err = res.stderr
    body = err if len(err) <= 11000 else f"{err[:8000]}\n...\n{err[-3000:]}"
    return f"{body}\nstdout: {res.stdout[-2000:]}"
