import pytest
import torch
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashRMSNorm
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLRMSNorm

from plait.nn.norm import RMSNorm, rms_norm_reference
from tests.nn.reference import assert_close, randomize_


@pytest.mark.parametrize("unit_offset, reference_cls", [(False, MiMoV2FlashRMSNorm), (True, MiniMaxM3VLRMSNorm)])
def test_rmsnorm_matches_transformers(unit_offset, reference_cls):
    ours = randomize_(RMSNorm(24, eps=1e-5, unit_offset=unit_offset), seed=1)
    ref = reference_cls(24, eps=1e-5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 24, requires_grad=True)
    out = ours(x)
    out_ref = ref(x)
    assert_close(out, out_ref, name="rmsnorm")
    g_ours = torch.autograd.grad(out.pow(2).sum(), [x, ours.weight])
    g_ref = torch.autograd.grad(out_ref.pow(2).sum(), [x, ref.weight])
    for a, b in zip(g_ours, g_ref):
        assert_close(a, b, tol=1e-5 * b.abs().max().item())


def test_unit_offset_norm_starts_as_plain_normalisation():
    x = torch.randn(4, 16)
    plain = RMSNorm(16)
    offset = RMSNorm(16, unit_offset=True)
    assert torch.all(offset.weight == 0)
    assert_close(offset(x), plain(x))


def test_per_head_qk_norm_shares_one_weight_across_heads():
    norm = randomize_(RMSNorm(8))
    x = torch.randn(2, 3, 4, 8)  # (B, S, heads, head_dim)
    per_head = torch.stack([norm(x[:, :, h]) for h in range(4)], dim=2)
    assert_close(norm(x), per_head)


def test_bf16_input_keeps_dtype_and_float32_statistics():
    norm = RMSNorm(16, unit_offset=True)
    x = (torch.randn(2, 16) * 300).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_close(out, expected.bfloat16(), tol=1e-2)


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match="expected last dim 16"):
        RMSNorm(16)(torch.randn(2, 8))


@pytest.mark.parametrize("zero_scale", [False, True])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_saving_backward_matches_autograd_on_the_reference_ops(unit_offset, zero_scale):
    # the statistics are float32 whatever the input (the reference's rule), so compare with autograd in float32
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, eps=1e-5, unit_offset=unit_offset)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        if zero_scale:  # one channel scaled by exactly 0: its normalised values are not in the output
            norm.weight[5] = -1.0 if unit_offset else 0.0
    x = (torch.randn(3, 7, 64, generator=g) * 3).requires_grad_()
    dy = torch.randn(3, 7, 64, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = norm(x)
    grads = torch.autograd.grad(out, (x, norm.weight), dy)
    ref = rms_norm_reference(x, norm.weight, 1e-5, unit_offset)
    ref_grads = torch.autograd.grad(ref, (x, norm.weight), dy)
    assert torch.equal(out, ref)  # the same forward ops, bit for bit
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, tol=1e-5 * float(want.abs().max()))
    # one activation (the output, which the next layer keeps anyway; the input where a scale is 0), the weight and
    # 1/rms stay for backward
    assert sorted(t.shape for t in saved) == sorted([x.shape, torch.Size([64]), torch.Size([3, 7, 1])])
    kept = next(t for t in saved if t.shape == x.shape)
    assert kept.data_ptr() == (x.data_ptr() if zero_scale else out.data_ptr())


def test_norm_before_a_linear_adds_no_activation_of_its_own():
    norm, proj = RMSNorm(32), torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(4, 32, requires_grad=True)
    storages = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: storages.add(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        proj(norm(x)).sum()
    params = {p.data_ptr() for p in (norm.weight, proj.weight)}
    assert len(storages - params) == 2  # the norm's output (kept by both) and 1/rms


def test_scale_check_follows_weight_updates():
    norm = RMSNorm(8)
    x = torch.randn(2, 8, requires_grad=True)
    norm(x)
    assert norm._scale_invertible()
    with torch.no_grad():
        norm.weight[3] = 0.0  # an in-place update, as an optimizer step makes
    assert not norm._scale_invertible()
    dy = torch.randn(2, 8)
    got = torch.autograd.grad(norm(x), (x, norm.weight), dy)
    want = torch.autograd.grad(rms_norm_reference(x, norm.weight, norm.eps, False), (x, norm.weight), dy)
    for a, b in zip(got, want):
        assert_close(a, b, tol=1e-5 * float(b.abs().max()))
