import pytest
import torch
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import (
    MiMoV2FlashRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLVisionConfig
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
    MiniMaxM3VLRotaryEmbedding,
    MiniMaxM3VLVisionRotaryEmbedding,
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_position_ids

from plait.nn.rope import (
    AxialRotaryEmbedding,
    RotaryEmbedding,
    apply_rotary,
    rotary_from_parameters,
    rotary_per_layer_type,
    vision_patch_positions,
)
from tests.nn.reference import assert_close, m3_text_config, mimo_config


def test_dual_base_partial_rotary_matches_mimo_per_layer_type():
    cfg = mimo_config(head_dim=24)
    ref = MiMoV2FlashRotaryEmbedding(cfg)
    ours = rotary_per_layer_type(cfg.head_dim, cfg.rope_parameters, default_partial_rotary_factor=0.334)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 5000, 70000]])  # packed documents restart at 0
    x = torch.zeros(1, 8, 4)
    for layer_type in ("full_attention", "sliding_attention"):
        cos_ref, sin_ref = ref(x, position_ids, layer_type)
        cos, sin = ours[layer_type](position_ids)
        assert ours[layer_type].dim == int(24 * 0.334)
        assert_close(cos, cos_ref, name=f"{layer_type} cos")
        assert_close(sin, sin_ref, name=f"{layer_type} sin")
    # different bases give different angles
    assert not torch.allclose(ours["full_attention"](position_ids)[0], ours["sliding_attention"](position_ids)[0])


def test_partial_rotary_application_matches_transformers():
    cfg = m3_text_config()
    ref = MiniMaxM3VLRotaryEmbedding(cfg)
    ours = RotaryEmbedding(cfg.head_dim, cfg.rope_parameters["rope_theta"], cfg.rope_parameters["partial_rotary_factor"])
    position_ids = torch.arange(10).view(1, 10).expand(2, 10)
    q = torch.randn(2, 10, 4, cfg.head_dim)  # (B, S, heads, head_dim)
    k = torch.randn(2, 10, 2, cfg.head_dim)
    cos_ref, sin_ref = ref(q, position_ids)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_ref, sin_ref)
    cos, sin = ours(position_ids)
    assert_close(apply_rotary(q, cos, sin), q_ref.transpose(1, 2))
    assert_close(apply_rotary(k, cos, sin), k_ref.transpose(1, 2))
    # the pass-through half is untouched
    assert torch.equal(apply_rotary(q, cos, sin)[..., ours.dim :], q[..., ours.dim :])


def _plain_rotation(x, cos, sin):
    """apply_rotary as the plain ops (the reference for its fused autograd path)."""
    from plait.nn.rope import rotate_half

    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x_rot = (x[..., :rot].float() * cos + rotate_half(x[..., :rot].float()) * sin).to(x.dtype)
    return torch.cat((x_rot, x[..., rot:]), dim=-1)


@pytest.mark.parametrize("head_dim, factor", [(32, 1.0), (24, 0.5), (16, 0.25)])
@pytest.mark.parametrize("batched_angles", [False, True])
def test_fused_rotation_and_its_backward_match_the_plain_ops(head_dim, factor, batched_angles):
    # the angles differ per half (yarn's and packed rows' tables are still symmetric; the adjoint must not rely on it)
    g = torch.Generator().manual_seed(0)
    rot = int(head_dim * factor)
    shape = (2, 6, rot) if batched_angles else (6, rot)
    cos, sin = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    x = torch.randn(2, 6, 3, head_dim, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos.double(), sin.double()), (x.requires_grad_(),))
    a = x.detach().float().requires_grad_()
    b = a.detach().clone().requires_grad_()
    grad = torch.randn(a.shape, generator=g)
    out = apply_rotary(a, cos, sin)
    ref = _plain_rotation(b, cos, sin)
    assert_close(out, ref, tol=1e-6)
    assert torch.equal(out[..., rot:], a[..., rot:])
    out.backward(grad)
    ref.backward(grad)
    assert_close(a.grad, b.grad, tol=1e-6)
    # bf16 heads: the same rotation computed in float32, one rounding at the end
    xb = a.detach().bfloat16().requires_grad_()
    assert torch.equal(apply_rotary(xb, cos, sin), _plain_rotation(xb.detach(), cos, sin))
    apply_rotary(xb, cos, sin).backward(grad.bfloat16())
    assert xb.grad.dtype == torch.bfloat16


def test_odd_rotary_width_rotates_one_pair_per_frequency_like_transformers():
    cfg = mimo_config(head_dim=16)  # int(16 * 0.334) = 5
    ref = MiMoV2FlashRotaryEmbedding(cfg)
    ours = rotary_per_layer_type(16, cfg.rope_parameters, 0.334)["full_attention"]
    pos = torch.arange(7).view(1, 7)
    cos_ref, _ = ref(torch.zeros(1), pos, "full_attention")
    assert ours.dim == 6
    assert_close(ours(pos)[0], cos_ref)


def test_inv_freq_stays_float32_after_casting_the_model():
    rope = RotaryEmbedding(64, 1e6)
    exact = rope.inv_freq.clone()
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32
    assert torch.equal(rope.inv_freq, exact)
    cos, _ = rope(torch.tensor([[300001]]))
    assert cos.dtype == torch.float32


def test_rotation_of_bf16_heads_is_computed_in_float32():
    rope = RotaryEmbedding(32, 10000.0)
    x = torch.randn(1, 4, 2, 32)
    cos, sin = rope(torch.tensor([[1000, 2000, 3000, 4000]]))
    assert_close(apply_rotary(x.bfloat16(), cos, sin), apply_rotary(x, cos, sin), tol=5e-2)
    assert apply_rotary(x.bfloat16(), cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize("grid", [[[1, 4, 6]], [[2, 4, 4], [1, 2, 6]]])
@pytest.mark.parametrize("hidden_size", [96, 10, 8])  # head dims 48, 5 and 4: below 6 no dim rotates
def test_axial_vision_rotary_matches_minimax_m3(grid, hidden_size):
    cfg = MiniMaxM3VLVisionConfig(hidden_size=hidden_size, num_attention_heads=2, spatial_merge_size=2)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    grid_thw = torch.tensor(grid)
    ref_pos = get_vision_position_ids(grid_thw, cfg.spatial_merge_size, include_temporal=True)
    pos = vision_patch_positions(grid_thw, cfg.spatial_merge_size)
    assert torch.equal(pos, ref_pos)
    ref = MiniMaxM3VLVisionRotaryEmbedding(cfg)
    ours = AxialRotaryEmbedding(head_dim, cfg.rope_parameters["rope_theta"])
    cos_ref, sin_ref = ref(torch.zeros(1), ref_pos)
    cos, sin = ours(pos)
    assert_close(cos, cos_ref)
    assert_close(sin, sin_ref)
    q = torch.randn(pos.shape[0], 2, head_dim)  # (N, heads, head_dim)
    q_ref, _ = apply_rotary_pos_emb_vision(q, q, cos_ref, sin_ref)
    assert_close(apply_rotary(q, cos, sin), q_ref)


SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2,
     "mscale": 0.707, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "attention_factor": 1.3,
     "truncate": False},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 256},  # factor from the context ratio
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
]
POSITIONS = torch.tensor([[0, 1, 2, 3, 50, 500, 5000, 70000]])


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_scaled_rope_types_match_transformers(scaling):
    # M3: one rope_parameters dict; MiMo: per layer type, the scaling on full attention only
    cfg = m3_text_config(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, **scaling},
                         max_position_embeddings=1024)
    cos_ref, sin_ref = MiniMaxM3VLRotaryEmbedding(cfg)(torch.zeros(1), POSITIONS)
    ours = rotary_from_parameters(cfg.head_dim, dict(cfg.rope_parameters), 1.0, cfg.max_position_embeddings)
    cos, sin = ours(POSITIONS)
    assert_close(cos, cos_ref, tol=1e-6)
    assert_close(sin, sin_ref, tol=1e-6)
    per_type = {"full_attention": {"rope_theta": 5e6, "partial_rotary_factor": 0.334, **scaling},
                "sliding_attention": {"rope_theta": 1e4, "partial_rotary_factor": 0.334, "rope_type": "default"}}
    cfg = mimo_config(rope_parameters=per_type, max_position_embeddings=1024)
    ref = MiMoV2FlashRotaryEmbedding(cfg)
    ours = rotary_per_layer_type(cfg.head_dim, cfg.rope_parameters, 0.334, set(cfg.layer_types), 1024)
    for layer_type in ("full_attention", "sliding_attention"):
        cos_ref, sin_ref = ref(torch.zeros(1), POSITIONS, layer_type)
        cos, sin = ours[layer_type](POSITIONS)
        assert_close(cos, cos_ref, tol=1e-6)
        assert_close(sin, sin_ref, tol=1e-6)
    moved = rotary_per_layer_type(cfg.head_dim, cfg.rope_parameters, 0.334, None, 1024)["full_attention"]
    moved.to(torch.bfloat16)
    assert torch.equal(moved.inv_freq, ours["full_attention"].inv_freq)  # a cast recomputes the scaled frequencies


def test_bad_rotary_settings_are_clear_errors():
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        RotaryEmbedding(64, 1e4, partial_rotary_factor=1.5)
    with pytest.raises(ValueError, match="rotary dims"):
        RotaryEmbedding(2, 1e4, partial_rotary_factor=0.3)
    with pytest.raises(ValueError, match=r"rope_parameters\['full_attention'\]: rope_type 'yarn' needs 'original_max"):
        rotary_per_layer_type(64, {"full_attention": {"rope_type": "yarn", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match=r"rope_type: plait supports 'default', 'linear', 'yarn', 'llama3' .*got 'dynamic'"):
        rotary_from_parameters(64, {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    for bad, match in [({"rope_type": "linear", "factor": -2.0}, "'factor' must be a positive number, got -2.0"),
                       ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
                        "'original_max_position_embeddings' must be a positive number"),
                       ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                         "original_max_position_embeddings": 64}, "high_freq_factor must exceed low_freq_factor")]:
        with pytest.raises(ValueError, match=match):
            rotary_from_parameters(64, {"rope_theta": 1e4, **bad})
    with pytest.raises(ValueError, match="expected a dict with 'rope_theta'"):
        rotary_from_parameters(64, {"rope_type": "default"})
    # an entry that no layer type uses is not read (transformers ignores it too)
    assert set(rotary_per_layer_type(64, {"full_attention": {"rope_theta": 1e4}, "unused": {"rope_type": "?"}},
                                     layer_types={"full_attention"})) == {"full_attention"}
    with pytest.raises(ValueError, match="spatial_merge_size"):
        vision_patch_positions(torch.tensor([[1, 3, 4]]), 2)


@pytest.mark.parametrize("width", [5, 6, 7])
def test_rotate_half_splits_odd_widths_as_transformers_does(width):
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import rotate_half as reference_rotate_half

    from plait.nn.rope import rotate_half

    x = torch.randn(2, 3, width)
    assert torch.equal(rotate_half(x), reference_rotate_half(x))
