import pytest
import torch
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashMoE, MiMoV2FlashTopkRouter
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
    MiniMaxM3VLSparseMoeBlock,
    MiniMaxM3VLTopKRouter,
    load_balancing_loss_func,
)

from plait.nn.attention import AttentionMask
from plait.nn.mlp import Activation
from plait.nn.moe import (
    GroupedExperts,
    MoE,
    MoEConfig,
    Router,
    collect_aux_loss,
    load_imbalance,
    pop_logged_aux_loss,
    route_aux_loss_through_backward,
    update_expert_bias,
)
from tests.nn.reference import assert_close, assert_grads_close, m3_text_config, mimo_config, randomize_


def m3_moe_config(cfg, impl="grouped", **kw) -> MoEConfig:
    return MoEConfig(
        hidden_size=cfg.hidden_size, num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok,
        intermediate_size=cfg.intermediate_size, activation=Activation("swigluoai", cfg.swiglu_alpha, cfg.swiglu_limit),
        score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=cfg.routed_scaling_factor,
        score_correction_bias=True, shared_intermediate_size=cfg.shared_intermediate_size, experts_impl=impl, **kw,
    )


def mimo_moe_config(cfg, impl="grouped", **kw) -> MoEConfig:
    return MoEConfig(
        hidden_size=cfg.hidden_size, num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
        intermediate_size=cfg.moe_intermediate_size, activation=Activation("silu"), score_func="sigmoid",
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, score_correction_bias=True, experts_impl=impl, **kw,
    )


def _m3_state_for_ours(ref_state):
    state = dict(ref_state)
    gate, up = state.pop("shared_experts.gate_up_proj.weight").chunk(2, dim=0)
    state["shared_experts.gate_proj.weight"], state["shared_experts.up_proj.weight"] = gate, up
    return state


def _assert_clear_routing(scores_for_choice, top_k):
    """Parity needs the same experts picked: every top-k boundary well above float32 noise."""
    top = scores_for_choice.topk(top_k + 1, dim=-1).values
    gap = (top[:, top_k - 1] - top[:, top_k]).min().item()
    assert gap > 1e-5, f"routing tie (gap {gap:.1e}): re-draw the test router"


def _fwd_bwd(module, x):
    out = module(x)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    names = ["x"] + [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad((out * w).sum(), [x, *module.parameters()])
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("ref_impl", ["grouped_mm", "eager"])
def test_minimax_m3_moe_block_matches_transformers(impl, ref_impl):
    cfg = m3_text_config()
    cfg._experts_implementation = ref_impl
    ref = randomize_(MiniMaxM3VLSparseMoeBlock(cfg), seed=5)
    ours = MoE(m3_moe_config(cfg, impl))
    ours.load_state_dict(_m3_state_for_ours(ref.state_dict()))
    x = torch.randn(3, 11, cfg.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.no_grad():
        _assert_clear_routing(torch.sigmoid(x.view(-1, cfg.hidden_size) @ ref.gate.weight.T) + ref.gate.e_score_correction_bias, 2)
    out, g = _fwd_bwd(ours, x)
    out_ref, g_ref = _fwd_bwd(ref, x)
    assert_close(out, out_ref, tol=1e-5 * out_ref.abs().max().item())
    g_ref = _m3_state_for_ours(g_ref | {"shared_experts.gate_up_proj.weight": g_ref.pop("shared_experts.gate_up_proj.weight")})
    assert_grads_close(g, g_ref)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_mimo_v2_flash_moe_with_group_limited_routing_matches_transformers(impl):
    cfg = mimo_config()
    cfg._experts_implementation = "eager"
    ref = randomize_(MiMoV2FlashMoE(cfg), seed=6)
    ours = MoE(mimo_moe_config(cfg, impl))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 13, cfg.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out, g = _fwd_bwd(ours, x)
    out_ref, g_ref = _fwd_bwd(ref, x)
    assert_close(out, out_ref, tol=1e-5 * out_ref.abs().max().item())  # float32 sums in another order
    assert_grads_close(g, g_ref)


@pytest.mark.parametrize("ref_cls, make_cfg, our_cfg", [
    (MiMoV2FlashTopkRouter, mimo_config, mimo_moe_config),
    (MiniMaxM3VLTopKRouter, m3_text_config, m3_moe_config),
])
def test_routers_pick_the_same_experts_with_the_same_weights(ref_cls, make_cfg, our_cfg):
    cfg = make_cfg()
    ref = randomize_(ref_cls(cfg), seed=7)
    ours = Router(our_cfg(cfg))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(40, cfg.hidden_size)
    _, w_ref, idx_ref = ref(x)
    routing = ours(x)
    order, order_ref = routing.indices.sort(dim=-1), idx_ref.sort(dim=-1)
    assert torch.equal(order.values, order_ref.values)
    scale = getattr(ref, "routed_scaling_factor", None) or cfg.routed_scaling_factor
    w_ref = w_ref if ref_cls is MiMoV2FlashTopkRouter else w_ref * scale  # M3 scales after the experts
    assert_close(routing.weights.gather(1, order.indices), w_ref.gather(1, order_ref.indices))


def test_score_correction_bias_changes_choice_not_weights():
    cfg = MoEConfig(hidden_size=8, num_experts=4, top_k=1, intermediate_size=4, score_func="sigmoid",
                    score_correction_bias=True, norm_topk_prob=False)
    router = Router(cfg)
    x = torch.randn(16, 8)
    router.e_score_correction_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    routing = router(x)
    assert torch.all(routing.indices == 0)
    assert_close(routing.weights.squeeze(1), torch.sigmoid(x @ router.weight.T)[:, 0])


def test_grouped_and_loop_experts_agree_and_are_bitwise_deterministic():
    torch.manual_seed(0)
    cfg = m3_moe_config(m3_text_config(hidden_size=64, intermediate_size=48), "grouped")
    grouped = randomize_(MoE(cfg), seed=8, std=0.1)
    loop = MoE(m3_moe_config(m3_text_config(hidden_size=64, intermediate_size=48), "loop"))
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(4, 64, 64, requires_grad=True)
    out_g, g_g = _fwd_bwd(grouped, x)
    out_l, g_l = _fwd_bwd(loop, x)
    assert_close(out_g, out_l)
    assert_grads_close(g_g, g_l)
    for module in (grouped, loop):
        first = _fwd_bwd(module, x)
        second = _fwd_bwd(module, x)
        assert torch.equal(first[0], second[0])
        for name in first[1]:
            assert torch.equal(first[1][name], second[1][name]), name


def test_expert_bias_update_moves_routing_toward_balance():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, num_experts=8, top_k=2, intermediate_size=8, score_func="sigmoid",
                    score_correction_bias=True, bias_update_rate=0.01)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight[0] += 0.15  # experts 0 and 1 attract most tokens
        moe.gate.weight[1] += 0.1
    x = torch.randn(512, 16).abs()
    imbalance = []
    for _ in range(100):
        with torch.no_grad():
            moe(x)
        loads = update_expert_bias(moe)
        imbalance.append(load_imbalance(loads))
        assert float(moe.tokens_per_expert.sum()) == 0.0  # counts reset after each update
    assert imbalance[0] > 3.0  # max load / mean load before any update
    assert max(imbalance[-10:]) < 2.0  # sign updates settle near balance (they oscillate a little)
    assert moe.gate.e_score_correction_bias[0] < 0 < moe.gate.e_score_correction_bias[5]
    assert abs(float(moe.gate.e_score_correction_bias.sum())) < 1e-5  # centred


def test_bias_update_sums_loads_over_ranks():
    cfg = MoEConfig(hidden_size=8, num_experts=4, top_k=1, intermediate_size=4, score_func="sigmoid",
                    score_correction_bias=True, bias_update_rate=0.1)
    moe = MoE(cfg)
    moe.tokens_per_expert.copy_(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    other_rank = torch.tensor([0.0, 0.0, 1.0, 3.0])
    loads = update_expert_bias(moe, all_reduce=lambda t: t.add_(other_rank))
    assert torch.equal(loads[""], torch.tensor([3.0, 1.0, 1.0, 3.0]))
    assert torch.allclose(moe.gate.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1]))


def test_aux_loss_matches_transformers_and_reaches_the_gradients():
    cfg = m3_text_config()
    moe = MoE(m3_moe_config(cfg, aux_loss_coef=0.01))
    randomize_(moe, seed=9)
    moe.gate.e_score_correction_bias.zero_()
    moe.train()
    x = torch.randn(2, 10, cfg.hidden_size)
    moe(x)
    logits = x.view(-1, cfg.hidden_size) @ moe.gate.weight.T
    expected = load_balancing_loss_func((logits,), cfg.num_local_experts, cfg.num_experts_per_tok)
    assert_close(collect_aux_loss(moe), 0.01 * expected)
    collect_aux_loss(moe).backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    moe.eval()
    moe(x)
    assert collect_aux_loss(moe) is None


def test_aux_loss_routed_through_backward_gives_the_gradients_of_adding_it_to_the_loss():
    """The trainer's way (each layer adds weight x aux to the backward itself) equals loss + weight x aux."""
    cfg = m3_text_config()
    x = torch.randn(2, 10, cfg.hidden_size)
    grads = []
    for routed in (False, True):
        moe = MoE(m3_moe_config(cfg, aux_loss_coef=0.05))
        randomize_(moe, seed=9)
        moe.train()
        route_aux_loss_through_backward(moe, 0.25 if routed else None)
        loss = moe(x).square().mean()
        if not routed:
            loss = loss + 0.25 * collect_aux_loss(moe)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in moe.named_parameters()})
        if routed:
            assert collect_aux_loss(moe) is None  # nothing left for a model to add twice
            assert pop_logged_aux_loss(moe) > 0 and pop_logged_aux_loss(moe) == 0.0
    for name, g in grads[0].items():
        assert_close(grads[1][name], g, tol=1e-7, name=name)
    # the aux loss moves the router: without it the router's gradient is another one
    moe = MoE(m3_moe_config(cfg))
    randomize_(moe, seed=9)
    moe.train()
    moe(x).square().mean().backward()
    assert (moe.gate.weight.grad - grads[0]["gate.weight"]).abs().max() > 1e-6


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=9), "top_k"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(score_func="relu"), "score_func"),
    (dict(experts_impl="megablocks"), "experts_impl"),
    (dict(bias_update_rate=0.1), "bias_update_rate"),
])
def test_bad_moe_configs_are_clear_errors(kw, match):
    base = dict(hidden_size=8, num_experts=8, top_k=2, intermediate_size=4)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**(base | kw))


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_experts_save_no_per_slot_copies_for_backward(impl):
    # backward keeps the tokens (T, H) and the activation's inputs, never a K-fold (T*K, H) copy of the
    # tokens or of the expert outputs, nor the activation (T*K, I) that it recomputes; and an expert that
    # gets no token has a zero weight gradient
    T, K, E, H, I = 64, 4, 8, 32, 12
    experts = GroupedExperts(E, H, I, Activation("silu"), impl)
    x = torch.randn(T, H, requires_grad=True)
    indices = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)])  # expert E-1 gets nothing
    weights = torch.rand(T, K, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in experts.parameters()}
    saved = []  # element counts of the storages kept (gate and up are two halves of one (T*K, 2I) storage)

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t.untyped_storage().nbytes() // 4)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = experts(x, indices, weights)
    assert T * K * 2 * I in saved
    assert T * K * H not in saved and T * K * I not in saved, saved
    out.sum().backward()
    assert experts.gate_up_proj.grad[E - 1].abs().max() == 0 and experts.down_proj.grad[E - 1].abs().max() == 0
    assert experts.gate_up_proj.grad[: E - 1].abs().amax(dim=(1, 2)).min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # grouped_mm has no float64 kernel: the loop runs
@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_experts_match_a_token_by_token_reference_with_an_idle_expert(impl, dtype):
    # every token through each chosen expert one at a time: outputs and all gradients
    torch.manual_seed(0)
    T, K, E, H, I = 20, 2, 6, 16, 8
    experts = GroupedExperts(E, H, I, Activation("silu"), impl).to(dtype)
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    first = torch.randint(0, E - 1, (T,))
    indices = torch.stack([first, (first + 1) % (E - 1)], dim=1)  # expert E-1 gets no token
    weights = torch.rand(T, K, dtype=dtype, requires_grad=True)
    out = experts(x, indices, weights)
    rows = []
    for t in range(T):
        row = 0
        for k in range(K):
            e = int(indices[t, k])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            row = row + weights[t, k] * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        rows.append(row)
    ref = torch.stack(rows)
    probe = torch.randn_like(ref)
    inputs = [x, weights, experts.gate_up_proj, experts.down_proj]
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * probe).sum(), inputs)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(out, ref, tol=rel * ref.abs().max().item())
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, tol=rel * want.abs().max().item())


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_padding_is_not_routed_counted_or_in_the_aux_loss(impl):
    """With the real tokens listed, padding takes no expert, no load and no part of the aux loss (transformers'
    load-balancing loss with its attention mask); its output rows are zeros and send no gradient."""
    cfg = m3_text_config()
    moe = MoE(m3_moe_config(cfg, impl, aux_loss_coef=0.01))
    randomize_(moe, seed=9)
    moe.gate.e_score_correction_bias.zero_()
    moe.tokens_per_expert.zero_()
    moe.train()
    H = cfg.hidden_size
    x = torch.randn(2, 10, H, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 7:] = False  # right padding
    tokens = AttentionMask.build(2, 10, "cpu", padding_mask=mask.long()).real_tokens()
    assert torch.equal(tokens, mask.reshape(-1).nonzero().squeeze(1))
    out = moe(x, tokens)
    loads, aux = moe.tokens_per_expert.clone(), collect_aux_loss(moe)
    logits = x.detach().reshape(-1, H) @ moe.gate.weight.detach().T
    expected = load_balancing_loss_func((logits,), cfg.num_local_experts, cfg.num_experts_per_tok, mask.long())
    assert_close(aux, 0.01 * expected)
    real = x.detach().reshape(-1, H)[tokens]
    assert torch.equal(loads, torch.bincount(moe.gate(real).indices.reshape(-1), minlength=cfg.num_local_experts).float())
    assert loads.sum() == tokens.numel() * cfg.num_experts_per_tok
    flat = out.reshape(-1, H)
    assert torch.equal(flat[~mask.reshape(-1)], torch.zeros(int((~mask).sum()), H))
    assert_close(flat[tokens], moe(real), tol=1e-6)
    out.sum().backward()
    assert x.grad[~mask].abs().max() == 0 and x.grad[mask].abs().min() > 0


@pytest.mark.parametrize("family", ["m3", "mimo"])  # MiMo: group-limited routing
def test_a_batch_of_padding_only_routes_nothing(family):
    """Every token padding (a pipeline stage's shape inference can feed such a mask): zeros out, no load, no aux
    loss, and the backward runs."""
    if family == "m3":
        cfg = m3_text_config()
        moe = MoE(m3_moe_config(cfg, aux_loss_coef=0.01))
    else:
        cfg = mimo_config()
        moe = MoE(mimo_moe_config(cfg, "grouped", aux_loss_coef=0.01))
    moe.tokens_per_expert.zero_()
    moe.train()
    x = torch.randn(2, 6, cfg.hidden_size, requires_grad=True)
    moe(x)  # a real forward first: its aux loss must not outlive the next one
    tokens = AttentionMask.build(2, 6, "cpu", padding_mask=torch.zeros(2, 6, dtype=torch.long)).real_tokens()
    assert tokens.numel() == 0
    moe.tokens_per_expert.zero_()
    out = moe(x, tokens)
    assert torch.equal(out, torch.zeros_like(x))
    assert moe.tokens_per_expert.sum() == 0 and collect_aux_loss(moe) is None
    out.sum().backward()
    assert x.grad.abs().max() == 0


def test_nothing_padded_lists_no_tokens_and_bad_token_lists_are_clear_errors():
    assert AttentionMask.build(2, 5, "cpu", padding_mask=torch.ones(2, 5, dtype=torch.long)).real_tokens() is None
    assert AttentionMask.build(2, 5, "cpu").real_tokens() is None
    moe = MoE(m3_moe_config(m3_text_config()))
    x = torch.randn(3, moe.cfg.hidden_size)
    with pytest.raises(ValueError, match="tokens: expected 1-D int64 row indices, got torch.bool"):
        moe(x, torch.ones(3, dtype=torch.bool))
