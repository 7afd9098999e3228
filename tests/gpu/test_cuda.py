"""The CUDA paths: attention backends (SDPA plans and compiled FlexAttention), grouped_mm experts under bf16
autocast, both native models against transformers on the GPU, generation and a bf16 training step.

Skipped without a CUDA device (CI has none); run them where one is:

    python -m pytest -q tests/gpu

Parity is float32 with TF32 off (matmuls in full float32), at the CPU suite's tolerances; bf16 checks compare
against the float32 run at bf16's precision.
"""

import pytest
import torch

import plait
from plait.generate import generate, left_pad
from plait.models.vlm import _m3_inputs
from plait.nn.mlp import Activation
from plait.nn.moe import MoE, MoEConfig, grouped_mm_available
from tests.nn.reference import assert_close, assert_grads_close
from tests.nn.test_attention import _inputs, _mask, _random_key_blocks, _run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda"


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


ATTENTION_CASES = [  # mask kind, window, sinks, key-block selection
    ("plain", None, False, False), ("padded", 5, True, False), ("packed", None, True, False),
    ("packed", 9, False, False), ("padded", None, False, True), ("packed", 6, False, True),
]
FLEX_CASES = [ATTENTION_CASES[i] for i in (1, 2, 5)]  # each compiles its own kernels: a few cover every feature


@pytest.mark.parametrize("backend, kind, window, with_sinks, blocks",
                         [("sdpa", *case) for case in ATTENTION_CASES] + [("flex", *case) for case in FLEX_CASES])
def test_gpu_attention_matches_eager(backend, kind, window, with_sinks, blocks):
    B, S, (H, Hk, D, Dv) = 2, 45, (4, 2, 16, 12)
    q, k, v = _inputs(B, H, Hk, S, D, Dv, device=CUDA)
    sinks = torch.randn(H, device=CUDA).requires_grad_() if with_sinks else None
    mask = _mask(kind, B, S, CUDA)
    kw = dict(scale=D**-0.5, window=window,
              restrict=_random_key_blocks(B, 2, S, block=4, picks=3, device=CUDA) if blocks else None)
    out_ref, g_ref = _run("eager", q, k, v, mask, sinks, **kw)
    out, g = _run(backend, q, k, v, mask, sinks, **kw)
    assert_close(out, out_ref, tol=1e-5)
    assert_grads_close(g, g_ref)


def _moe(top_k=2, experts=8, hidden=64, inter=32, impl="auto"):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=hidden, num_experts=experts, top_k=top_k, intermediate_size=inter,
                    activation=Activation("silu"), score_func="sigmoid", score_correction_bias=True,
                    shared_intermediate_size=inter, experts_impl=impl)
    return MoE(cfg).to(CUDA)


def test_experts_take_grouped_mm_under_bf16_autocast_and_match_the_loop():
    grouped, loop = _moe(impl="grouped"), _moe(impl="loop")
    loop.load_state_dict(grouped.state_dict())
    assert grouped_mm_available(grouped.experts.gate_up_proj, grouped.experts.down_proj, torch.bfloat16)
    x = torch.randn(3, 50, 64, device=CUDA)
    outs, grads = [], []
    for moe in (grouped, loop):
        with torch.autocast(CUDA, dtype=torch.bfloat16):
            y = moe(x)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=CUDA).view_as(y)).sum().backward()
        outs.append(y.float())
        grads.append({n: p.grad.float() for n, p in moe.named_parameters() if p.grad is not None})
    assert_close(outs[0], outs[1], tol=2e-2 * outs[1].abs().max().item())
    assert_grads_close(grads[0], grads[1], rel=3e-2)
    # and the grouped path in float32 (no autocast) falls back to the loop's exact float32 result
    assert not grouped_mm_available(grouped.experts.gate_up_proj, grouped.experts.down_proj)


def _mimo_pair(tmp_path, name, backend):
    from tests.models.test_mimo_v2_flash import reference_model

    ref = reference_model(name)
    ref.save_pretrained(tmp_path)
    ours = plait.from_pretrained(tmp_path, attn_implementation=backend)
    return ref.to(CUDA), ours.to(CUDA)


@pytest.mark.parametrize("name, backend", [("hybrid", "sdpa"), ("dense_lead", "sdpa"), ("hybrid", "flex")])
def test_mimo_v2_flash_matches_transformers_on_gpu(tmp_path, name, backend):
    ref, ours = _mimo_pair(tmp_path, name, backend)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill((mask == 0) | (torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 0), -100)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {k: t.to(CUDA) for k, t in dict(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).items()}
    out_ref, out = ref(**batch), ours(**batch)
    valid = batch["attention_mask"].bool().unsqueeze(-1)
    assert_close(out.logits * valid, out_ref.logits * valid, tol=1e-4, name="logits")
    assert_close(out.loss, out_ref.loss, tol=1e-4, name="loss")
    out_ref.loss.backward()
    out.loss.backward()
    theirs = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        g_ref = theirs[n].grad
        if g_ref is None:
            assert p.grad is None or p.grad.abs().max() == 0, n
            continue
        assert_close(p.grad, g_ref, tol=max(1e-3 * g_ref.abs().max().item(), 1e-7), name=f"grad {n}")


def test_mimo_v2_flash_greedy_generation_matches_transformers_on_gpu(tmp_path):
    ref, ours = _mimo_pair(tmp_path, "hybrid", "sdpa")
    ids, mask = left_pad([torch.tensor([5, 9, 2, 7, 1, 3, 8]), torch.tensor([4, 4, 6])], pad_id=0)
    kw = dict(max_new_tokens=9, eos_token_id=63, pad_token_id=0)
    assert torch.equal(generate(ours.eval(), ids.to(CUDA), mask.to(CUDA), **kw),
                       generate(ref.eval(), ids.to(CUDA), mask.to(CUDA), **kw))


@pytest.mark.parametrize("variant, backend", [("sparse", "sdpa"), ("sparse", "flex"), ("full", "sdpa")])
def test_minimax_m3_vl_matches_transformers_on_gpu(tmp_path, variant, backend):
    from tests.models.test_minimax_m3 import Reference, _assert_gradients_match, _batch, randomize, vl_config

    from plait.models.minimax_m3 import MiniMaxM3SparseForConditionalGeneration

    torch.manual_seed(0)
    ref = randomize(Reference(plait.models.to_hf_config(vl_config(variant)))).eval()
    ref.save_pretrained(tmp_path)
    ours = MiniMaxM3SparseForConditionalGeneration.from_pretrained(tmp_path, backend=backend).eval().to(CUDA)
    ref = ref.to(CUDA)
    ids, labels, images = _batch()
    inputs = {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in _m3_inputs(ref.config, images).items()}
    out_ref = ref(input_ids=ids.to(CUDA), labels=labels.to(CUDA), **inputs)
    out = ours(input_ids=ids.to(CUDA), labels=labels.to(CUDA), **inputs)
    assert_close(out.logits, out_ref.logits, tol=1e-4, name="logits")
    assert_close(out.loss, out_ref.loss, tol=1e-4, name="loss")
    out_ref.loss.backward()
    out.loss.backward()
    _assert_gradients_match(ref.cpu(), ours.cpu(), tmp_path / "grads")  # moving a module moves its gradients


def test_a_bf16_autocast_step_tracks_the_float32_step(tmp_path):
    """The trainer's GPU mode (float32 weights, bf16 autocast): loss and gradients at bf16 precision of float32's."""
    _, ours = _mimo_pair(tmp_path, "hybrid", "sdpa")
    ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(2)).to(CUDA)
    results = []
    for autocast in (False, True):
        ours.zero_grad()
        with torch.autocast(CUDA, dtype=torch.bfloat16, enabled=autocast):
            loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.float(), {n: p.grad.float().clone() for n, p in ours.named_parameters() if p.grad is not None}))
    (loss32, grads32), (loss16, grads16) = results
    assert_close(loss16, loss32, tol=2e-2 * loss32.item(), name="loss")
    total32 = torch.cat([g.flatten() for g in grads32.values()])
    total16 = torch.cat([grads16[n].flatten() for n in grads32])
    cos = torch.nn.functional.cosine_similarity(total16, total32, dim=0)
    assert cos > 0.99, f"bf16 gradient direction: cosine {cos:.4f} with float32's"
