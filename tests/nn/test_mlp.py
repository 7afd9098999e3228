import pytest
import torch
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashMLP
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLDenseMLP

from plait.nn.mlp import GATED_ACTIVATIONS, MLP, Activation, gated_down
from tests.nn.reference import assert_close, m3_text_config, mimo_config, randomize_


def _grads(module, x, out):
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [x, *module.parameters()])


def test_swiglu_matches_mimo_mlp():
    cfg = mimo_config()
    ref = randomize_(MiMoV2FlashMLP(cfg), seed=2)
    ours = MLP(cfg.hidden_size, cfg.intermediate_size, "silu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, cfg.hidden_size, requires_grad=True)
    out, out_ref = ours(x), ref(x)
    assert_close(out, out_ref)
    for a, b in zip(_grads(ours, x, out), _grads(ref, x, out_ref)):
        assert_close(a, b, tol=1e-5 * b.abs().max().item())


def test_swigluoai_matches_minimax_m3_dense_mlp_including_the_clamps():
    cfg = m3_text_config(swiglu_limit=1.5)  # a low limit so the clamps are exercised
    ref = randomize_(MiniMaxM3VLDenseMLP(cfg), seed=3, std=0.5)
    ours = MLP(cfg.hidden_size, cfg.dense_intermediate_size, Activation("swigluoai", cfg.swiglu_alpha, cfg.swiglu_limit))
    gate, up = ref.gate_up_proj.weight.chunk(2, dim=0)  # fused [gate | up] in memory
    ours.load_state_dict({"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": ref.down_proj.weight})
    x = torch.randn(4, 9, cfg.hidden_size, requires_grad=True)
    gate_out = ours.gate_proj(x)
    assert (gate_out > 1.5).any() and (ours.up_proj(x).abs() > 1.5).any()
    out, out_ref = ours(x), ref(x)
    assert_close(out, out_ref)
    g = _grads(ours, x, out)
    g_ref = _grads(ref, x, out_ref)
    assert_close(g[0], g_ref[0], tol=1e-5 * g_ref[0].abs().max().item())
    assert_close(torch.cat([g[1], g[2]]), g_ref[1], tol=1e-5 * g_ref[1].abs().max().item())


def test_plain_gelu_mlp_and_activation_errors():
    mlp = MLP(8, 16, "gelu", gated=False, bias=True)
    x = torch.randn(2, 8)
    assert_close(mlp(x), mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))))
    with pytest.raises(ValueError, match="activation"):
        Activation("prelu")  # learnable: not an element-wise function plait runs
    with pytest.raises(ValueError, match="activation"):
        Activation("xielu")
    with pytest.raises(ValueError, match="plain MLP activation"):
        MLP(8, 16, "swigluoai", gated=False)


@pytest.mark.parametrize("name", ["silu", "swigluoai"])
def test_fused_gate_backward_is_the_derivative_of_the_reference(name):
    # float64 finite differences; the swigluoai inputs straddle both clamps (limit 7) and stay off the kinks
    act = Activation(name, alpha=1.702, limit=7.0)
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 6)
    up = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 6)
    gate = gate.masked_fill((gate - 7).abs() < 0.1, 3.0).requires_grad_()
    up = up.masked_fill((up.abs() - 7).abs() < 0.1, -2.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: act.gated(a, b), (gate, up))
    scale = torch.rand(6, generator=g, dtype=torch.float64).add_(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: act.gated(a, b, c), (gate, up, scale))  # MoE routing weights
    if name == "swigluoai":
        assert bool((gate > 7).any()) and bool((up.abs() > 7).any())
    # and in float32 the fused forward is the reference forward, bit for bit
    a, b = gate.detach().float().requires_grad_(), up.detach().float()
    assert torch.equal(act.gated(a, b), act.gated_reference(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swigluoai_backward_passes_the_gradient_on_the_clamp_bounds_as_torch_clamp_does(dtype):
    # torch.clamp's gradient includes its bounds; the fused backward must zero exactly where it does
    act = Activation("swigluoai", alpha=1.702, limit=7.0)
    limit = torch.tensor(7.0, dtype=dtype)
    inf = torch.tensor(float("inf"), dtype=dtype)
    edges = torch.stack([limit, -limit, torch.nextafter(limit, inf), torch.nextafter(-limit, -inf),
                         torch.nextafter(limit, -inf), torch.nextafter(-limit, inf)])
    g = torch.Generator().manual_seed(3)
    gate = torch.cat([edges, torch.randn(10, generator=g, dtype=dtype) * 8]).repeat(2, 1)
    up = gate.flip(-1).clone()
    grad = torch.randn(gate.shape, generator=g, dtype=dtype)
    a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
    act.gated_reference(a, b).backward(grad)
    c, d = gate.clone().requires_grad_(), up.clone().requires_grad_()
    act.gated(c, d).backward(grad)
    assert torch.equal(c.grad == 0, a.grad == 0) and torch.equal(d.grad == 0, b.grad == 0)
    assert_close(c.grad, a.grad, tol=1e-6)
    assert_close(d.grad, b.grad, tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", GATED_ACTIVATIONS)
def test_gate_outside_autograd_is_the_reference_bit_for_bit(name, dtype):
    # without autograd the gate writes its steps over buffers of its own: same values, and its inputs untouched
    act = Activation(name, alpha=1.702, limit=7.0)
    g = torch.Generator().manual_seed(2)
    gate, up = ((torch.randn(9, 16, generator=g) * 6).to(dtype) for _ in range(2))  # straddles both clamps
    scale = torch.rand(9, generator=g) + 0.5
    before = gate.clone(), up.clone()
    with torch.no_grad():
        assert torch.equal(act.gated(gate, up), act.gated_reference(gate, up))
        expected = (act.gated_reference(gate, up).float() * scale.unsqueeze(-1)).to(dtype)
        assert torch.equal(act.gated(gate, up, scale), expected)
    assert torch.equal(gate, before[0]) and torch.equal(up, before[1])


@pytest.mark.parametrize("name", ["silu", "swigluoai"])
def test_gated_down_backward_is_the_derivative_and_keeps_no_activation(name):
    act = Activation(name, alpha=1.702, limit=7.0)
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(2, 6, 5, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    gate, up = gate.masked_fill((gate - 7).abs() < 0.1, 3.0).requires_grad_(), up.requires_grad_()
    scale = torch.rand(2, 6, generator=g, dtype=torch.float64).add_(0.5).requires_grad_()
    weight = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, w: gated_down(act, a, b, None, w), (gate, up, weight))
    assert torch.autograd.gradcheck(lambda a, b, c, w: gated_down(act, a, b, c, w), (gate, up, scale, weight))
    before = gate.detach().clone(), up.detach().clone()
    gated_down(act, gate, up, scale, weight).sum().backward()  # the backward writes over its own buffers only
    assert torch.equal(gate.detach(), before[0]) and torch.equal(up.detach(), before[1])
    # float32: the output is the unfused one bit for bit, and backward keeps gate, up and the weight only
    mlp = MLP(8, 16, act)
    x = torch.randn(3, 7, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = mlp(x)
    assert torch.equal(out, mlp.down_proj(act.gated_reference(mlp.gate_proj(x), mlp.up_proj(x))))
    assert saved.count((3, 7, 16)) == 2, saved  # gate and up; not the activation


@pytest.mark.parametrize("hf_name, ours", [
    ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
    ("gelu_accurate", "gelu_tanh"), ("gelu_python", "gelu"), ("swish", "silu"), ("relu", "relu"),
    ("quick_gelu", "quick_gelu"), ("relu2", "relu2"), ("relu6", "relu6"), ("leaky_relu", "leaky_relu"),
    ("sigmoid", "sigmoid"), ("tanh", "tanh"), ("mish", "mish"), ("hardswish", "hardswish"), ("gelu_10", "gelu_10"),
    ("linear", "linear")])
def test_transformers_activation_names_run_their_functions(hf_name, ours):
    # each one also gates as transformers' gated MLPs use it: act(gate) * up
    from transformers.activations import ACT2FN

    act = Activation(hf_name)
    assert act.name == ours
    x, up = torch.randn(64) * 4, torch.randn(64)
    assert_close(act.plain(x), ACT2FN[hf_name](x), tol=1e-6, name=hf_name)
    mlp = MLP(8, 16, act)
    h = torch.randn(3, 8)
    assert_close(mlp(h), mlp.down_proj(ACT2FN[hf_name](mlp.gate_proj(h)) * mlp.up_proj(h)), tol=1e-5, name=hf_name)
