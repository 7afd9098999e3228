"""What every parity sweep shares: the interface of a sweep module and the outcomes of its cases.

A sweep module (`tests/sweeps/<model>.py`) has two functions:
- `random_case(seed) -> dict`: a JSON-serialisable description of one case (the HF config's keys, the input's
  shape, padding, images...), drawn from `random.Random(seed)` only, so a seed names the same case everywhere;
- `check(case, workdir) -> dict`: builds the transformers reference from the case, saves it, loads it into plait,
  compares, and returns the largest differences it measured. It raises `ReferenceFailure` when transformers itself
  cannot run the case (then plait is not being compared with anything) and `AssertionError` on a mismatch.

The comparisons themselves are the parity tests' own (`assert_close`, `assert_grads_close` in
`tests/nn/reference.py`).
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


def greedy_without_cache(model, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """(1, new) tokens of greedy decoding by full forwards over the growing sequence: no cache to get wrong."""
    seq = prompt.view(1, -1)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
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

