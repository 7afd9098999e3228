import pytest
import torch

from plait.nn.loss import (
    IGNORE_INDEX,
    causal_lm_chunked_loss_sum,
    causal_lm_loss_sum,
    count_targets,
    default_chunk_size,
    linear_cross_entropy_sum,
)
from tests.nn.reference import assert_close


def _problem(B=3, S=29, H=16, V=211, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :7] = IGNORE_INDEX  # a prompt that carries no loss
    labels[2, -4:] = IGNORE_INDEX  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_chunked_loss_and_gradients_match_plain_cross_entropy(chunk_size):
    hidden, weight, labels = _problem()
    loss = causal_lm_chunked_loss_sum(hidden, weight, labels, chunk_size=chunk_size)
    g = torch.autograd.grad(loss * 0.37, [hidden, weight])
    loss_ref = causal_lm_loss_sum(hidden @ weight.T, labels)
    g_ref = torch.autograd.grad(loss_ref * 0.37, [hidden, weight])
    assert_close(loss, loss_ref, tol=1e-5 * loss_ref.abs().item())
    for a, b in zip(g, g_ref):
        assert_close(a, b, tol=1e-5 * b.abs().max().item())


def test_sums_normalise_over_the_whole_accumulated_step():
    # two micro-batches of different sizes: sum / total targets == the mean over all targets at once
    hidden, weight, labels = _problem(B=4)
    parts = [(hidden[:1], labels[:1]), (hidden[1:], labels[1:])]
    total = sum(causal_lm_chunked_loss_sum(h, weight, lab, chunk_size=5) for h, lab in parts)
    n = sum(count_targets(lab) for _, lab in parts)
    whole = causal_lm_loss_sum(hidden @ weight.T, labels) / count_targets(labels)
    assert_close(total / n, whole, tol=1e-6)


def test_all_ignored_targets_give_zero_loss_and_zero_gradient():
    hidden, weight, labels = _problem()
    labels[:] = IGNORE_INDEX
    loss = causal_lm_chunked_loss_sum(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_only_rows_with_a_target_go_through_the_lm_head(monkeypatch):
    # a prompt, padding and each row's last token need no logits: the head's forward matmul sees the others only
    import plait.nn.loss as loss_module

    hidden, weight, labels = _problem()
    rows = []
    real_linear = loss_module.F.linear
    monkeypatch.setattr(loss_module.F, "linear", lambda h, w: rows.append(h.shape[0]) or real_linear(h, w))
    loss = causal_lm_chunked_loss_sum(hidden, weight, labels, chunk_size=8)
    loss.backward()
    assert sum(rows) == count_targets(labels) < labels.numel() - 10
    assert hidden.grad[0, :6].abs().max() == 0 and hidden.grad[:, -1].abs().max() == 0
    assert hidden.grad[1, :-1].abs().min() > 0


def test_forward_without_gradients_and_the_default_chunk_size():
    hidden, weight, labels = _problem()
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, labels)
    assert not loss.requires_grad
    assert default_chunk_size(200_000) * 200_000 * 4 <= 1 << 28


def test_bad_shapes_are_clear_errors():
    hidden, weight, labels = _problem()
    with pytest.raises(ValueError, match="labels"):
        causal_lm_chunked_loss_sum(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="lm head weight"):
        linear_cross_entropy_sum(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_sum(hidden, weight, labels, chunk_size=0)


@pytest.mark.parametrize("chunk_size", [7, None])
def test_loss_with_logits_from_one_matmul_and_gradients_through_both(chunk_size):
    hidden, weight, labels = _problem()
    loss, logits = causal_lm_chunked_loss_sum(hidden, weight, labels, chunk_size=chunk_size, return_logits=True)
    ref_logits = hidden @ weight.T
    assert_close(logits, ref_logits, tol=1e-6 * ref_logits.abs().max().item())
    # without logits only the rows with a target are computed, in other chunks: equal up to float rounding
    assert_close(loss, causal_lm_chunked_loss_sum(hidden, weight, labels, chunk_size=chunk_size), tol=1e-6 * loss.item())
    probe = torch.randn(ref_logits.shape, generator=torch.Generator().manual_seed(3))
    # the CE alone (no gradient reaches the logits), the CE plus a loss of the caller's own on the logits,
    # and that loss alone
    for ce, own in ((1.0, 0.0), (1.0, 1.0), (0.0, 1.0)):
        loss, logits = causal_lm_chunked_loss_sum(hidden, weight, labels, chunk_size=chunk_size, return_logits=True)
        total = ce * loss + ((logits * probe).sum() if own else 0.0)
        g = torch.autograd.grad(total, [hidden, weight])
        ref_logits = hidden @ weight.T
        g_ref = torch.autograd.grad(ce * causal_lm_loss_sum(ref_logits, labels) + own * (ref_logits * probe).sum(),
                                    [hidden, weight])
        for a, b in zip(g, g_ref):
            assert_close(a, b, tol=1e-5 * b.abs().max().item())
