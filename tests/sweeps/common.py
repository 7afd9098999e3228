"""What every parity sweep shares: the outcome of one random case, and the comparisons it makes.

A sweep module (`tests/sweeps/<model>.py`) has two functions:
- `random_case(seed) -> dict`: a JSON-serialisable description of one case (the HF config's keys, the input's
  shape, padding, images...), drawn from `random.Random(seed)` only, so a seed names the same case everywhere;
- `check(case, workdir) -> dict`: builds the transformers reference from the case, saves it, loads it into plait,
  compares, and returns the largest differences it measured. It raises `ReferenceFailure` when transformers itself
  cannot run the case (then plait is not being compared with anything) and `AssertionError` on a mismatch.
"""

from __future__ import annotations

import torch


class ReferenceFailure(Exception):
    """transformers raised on the case itself: nothing to compare plait with."""


def run_reference(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, with any exception inside transformers turned into a `ReferenceFailure`."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - whatever transformers raises, the case has no reference
        raise ReferenceFailure(f"{type(err).__name__}: {err}") from err


def max_diff(actual: torch.Tensor, expected: torch.Tensor, name: str) -> float:
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} vs {list(expected.shape)}"
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> float:
    """The largest absolute difference, asserted at most `tol`."""
    diff = max_diff(actual, expected, name)
    assert diff <= tol, f"{name}: max abs diff {diff:.3e} > {tol:.1e}"
    return diff


def assert_gradients_within(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], rel: float) -> float:
    """Every gradient within `rel` of its reference's largest entry (DESIGN.md's gradient tolerance; a float32
    floor for the ones that are zero); returns the worst ratio of a difference to its tolerance (at most 1)."""
    assert ours.keys() == theirs.keys(), f"gradient names differ: {sorted(set(ours) ^ set(theirs))}"
    worst = 0.0
    for name, g_ref in theirs.items():
        tol = max(rel * g_ref.abs().max().item(), 1e-7)
        worst = max(worst, assert_within(ours[name].reshape(g_ref.shape), g_ref, tol, f"grad {name}") / tol)
    return worst


def greedy_without_cache(model, prompt: torch.Tensor, max_new_tokens: int, **inputs) -> torch.Tensor:
    """(1, new) tokens of greedy decoding by full forwards over the growing sequence: no cache to get wrong."""
    seq = prompt.view(1, -1)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(input_ids=seq, **inputs).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.numel():]


def assert_same_generation(ours: torch.Tensor, theirs: torch.Tensor, uncached: list[torch.Tensor],
                           eos_token_id: int) -> None:
    """plait's cached greedy tokens equal transformers' cached ones. Where they differ and plait's equal
    transformers' own uncached decoding of each prompt (`uncached`, up to the first EOS), the reference's cache
    is what is wrong there: a `ReferenceFailure`."""
    if torch.equal(ours, theirs):
        return
    for row, expected in zip(ours, uncached):
        expected = expected.view(-1)
        got = row[: expected.numel()]
        stop = (expected == eos_token_id).nonzero()
        n = int(stop[0]) + 1 if len(stop) else expected.numel()
        assert torch.equal(got[:n], expected[:n]), (
            f"greedy generation: {ours.tolist()} vs transformers' {theirs.tolist()} (uncached {expected.tolist()})")
    raise ReferenceFailure("transformers' cached greedy decoding differs from its own uncached decoding; "
                           "plait's cached decoding equals the uncached one")

