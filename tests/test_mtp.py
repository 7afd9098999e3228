"""plait.mtp: the model-agnostic contract, and MTP training in the native MiMo-V2-Flash."""

import pytest
import torch
from torch import nn

from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM
from plait.mtp import (
    MTPConfig,
    MTPModule,
    cu_seqlens_from_documents,
    get_mtp_loss_scaling_factor,
    mtp_labels,
    roll_tensor,
)
from tests.nn.reference import assert_close, mimo_config


def test_roll_tensor_zeroes_what_would_wrap():
    t = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert roll_tensor(t, -1).tolist() == [[2, 3, 4, 0], [6, 7, 8, 0]]
    assert roll_tensor(t, -2, dim=1).tolist() == [[3, 4, 0, 0], [7, 8, 0, 0]]
    assert roll_tensor(t, 1, dim=0).tolist() == [[0, 0, 0, 0], [1, 2, 3, 4]]
    assert torch.equal(roll_tensor(t, 0), t)


def test_roll_tensor_keeps_packed_documents_apart():
    t = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    cu = torch.tensor([0, 3, 7])
    assert roll_tensor(t, -1, cu_seqlens=cu).tolist() == [2, 3, 0, 5, 6, 7, 0]
    rows = t[:6].view(2, 3)  # (B, S) rows with cu_seqlens over the flattened stream
    assert roll_tensor(rows, -1, cu_seqlens=torch.tensor([0, 2, 6])).tolist() == [[2, 0, 4], [5, 6, 0]]
    with pytest.raises(ValueError, match="cu_seqlens"):
        roll_tensor(t, -1, cu_seqlens=torch.tensor([0, 5]))


def test_mtp_labels_mask_row_ends_and_document_crossings():
    labels = torch.tensor([[10, 11, 12, 13, 14, 15]])
    assert mtp_labels(labels, 1).tolist() == [[11, 12, 13, 14, 15, -100]]
    assert mtp_labels(labels, 2).tolist() == [[12, 13, 14, 15, -100, -100]]
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    # slot u is predicted from position u - 1; its target labels[u + d] must share that position's document
    # (slot 0 is never a target: the cross-entropy shift drops it)
    assert mtp_labels(labels, 1, docs).tolist() == [[-100, 12, -100, -100, 15, -100]]
    assert cu_seqlens_from_documents(torch.tensor([[1, 1, 2], [1, 2, 2]])).tolist() == [0, 2, 3, 4, 6]


def test_config_properties_and_errors():
    cfg = MTPConfig(num_layers=3, layer_pattern="*E", loss_scaling_factor=0.3)
    assert (cfg.pattern_length, cfg.num_physical_depths, cfg.total_sublayers, cfg.enabled) == (2, 3, 6, True)
    repeated = MTPConfig(num_layers=3, layer_pattern="*E", use_repeated_layer=True)
    assert (repeated.num_physical_depths, repeated.total_sublayers) == (1, 2)
    assert not MTPConfig().enabled
    with pytest.raises(ValueError, match="num_layers"):
        MTPConfig(num_layers=-1)
    with pytest.raises(ValueError, match="layer_pattern"):
        MTPConfig(num_layers=1, layer_pattern="")

    class WithConfig(nn.Module):
        mtp_config = cfg

    assert get_mtp_loss_scaling_factor(WithConfig()) == 0.3
    assert get_mtp_loss_scaling_factor(nn.Linear(1, 1), default=0.2) == 0.2


class Block(nn.Module):
    """A toy sublayer: x -> x * scale + bias, with the fusion / final-norm modules when asked."""

    def __init__(self, H, has_fusion, has_final_norm):
        super().__init__()
        self.scale = nn.Parameter(torch.full((H,), 1.5))
        if has_fusion:
            self.enorm, self.hnorm = nn.LayerNorm(H), nn.LayerNorm(H)
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
        if has_final_norm:
            self.final_layernorm = nn.LayerNorm(H)

    def forward(self, h, bias=0.0, position_ids=None):
        return h * self.scale + bias


def test_module_layout_factory_order_and_forward():
    calls = []

    def factory(gi, depth, j, kind, fusion, final):
        calls.append((gi, depth, j, kind, fusion, final))
        return Block(4, fusion, final)

    cfg = MTPConfig(num_layers=2, layer_pattern="*E")
    mtp = MTPModule(cfg, ["attn", "moe"], factory)
    assert calls == [(0, 0, 0, "attn", True, False), (1, 0, 1, "moe", False, True),
                     (2, 1, 0, "attn", True, False), (3, 1, 1, "moe", False, True)]
    assert len(mtp.layers) == 4 and (mtp.num_depths, mtp.pattern_length) == (2, 2)
    assert "layers.2.eh_proj.weight" in dict(mtp.named_parameters())

    embed = nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 3, 4]])
    h0 = torch.randn(1, 4, 4)
    outs = mtp(ids, h0, embed, None, None, bias=0.5)
    # by hand: normed embedding of the rolled ids first, then the normed previous hidden state
    h_prev, rolled = h0, ids
    for d in range(2):
        rolled = roll_tensor(rolled, -1)
        first, second = mtp.layers[2 * d], mtp.layers[2 * d + 1]
        h = first.eh_proj(torch.cat([first.enorm(embed(rolled)), first.hnorm(h_prev)], -1))
        h = second(first(h, bias=0.5), bias=0.5)
        h_prev = second.final_layernorm(h)
        assert_close(outs[d], h_prev)


def test_repeated_layer_reuses_one_physical_depth():
    mtp = MTPModule(MTPConfig(num_layers=3, use_repeated_layer=True), "*", lambda *a: Block(4, a[4], a[5]))
    assert len(mtp.layers) == 1
    outs = mtp(torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 4), nn.Embedding(5, 4))
    assert len(outs) == 3


def test_constructor_errors():
    with pytest.raises(ValueError, match="block types"):
        MTPModule(MTPConfig(num_layers=1, layer_pattern="*E"), ["attn"], lambda *a: Block(4, True, True))
    with pytest.raises(ValueError, match="has no enorm, hnorm, eh_proj"):
        MTPModule(MTPConfig(num_layers=1), "*", lambda *a: Block(4, False, True))


# --- MiMo-V2-Flash with MTP depths ---------------------------------------------------------------


def _mimo(depths=2, scale=0.1):
    torch.manual_seed(0)
    cfg = mimo_config(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"],
                      mlp_layer_types=["dense", "sparse"])
    model = MiMoV2FlashForCausalLM.from_config(cfg, num_mtp_layers=depths, mtp_loss_scaling_factor=scale)
    with torch.no_grad():
        for p in model.model.mtp.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_loss_is_main_plus_scaled_mean_of_depth_losses_computed_by_hand():
    model = _mimo(depths=2, scale=0.3)
    ids = torch.randint(0, 64, (2, 11))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids, labels=labels)
    ce = nn.functional.cross_entropy
    main = ce(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    depth_losses = []
    for d, logits in enumerate(out.mtp_logits, start=1):
        # position t predicts token t + d + 1
        target = torch.full_like(labels, -100)
        target[:, : -(d + 1)] = labels[:, d + 1 :]
        depth_losses.append(ce(logits.reshape(-1, 64), target.reshape(-1), ignore_index=-100))
    assert_close(out.lm_loss, main)
    for ours, mine in zip(out.mtp_losses, depth_losses):
        assert_close(ours, mine)
    assert_close(out.loss, main + 0.3 / 2 * sum(depth_losses))


def test_gradients_reach_the_mtp_layers_and_through_eh_proj_the_trunk():
    model = _mimo(depths=2)
    ids = torch.randint(0, 64, (2, 9))
    out = model(input_ids=ids, labels=ids)
    torch.stack(out.mtp_losses).sum().backward()
    mtp_grads = [p.grad for p in model.model.mtp.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in mtp_grads[:5])
    trunk = model.model.layers["0"].self_attn.q_proj.weight.grad
    assert trunk is not None and trunk.abs().sum() > 0


def test_packed_rows_give_each_document_its_own_mtp_predictions():
    model = _mimo(depths=1).eval()
    ids = torch.randint(0, 64, (1, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)]).view(1, 12)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, return_mtp_logits=True).mtp_logits[0]
        first = model(input_ids=ids[:, :5], return_mtp_logits=True).mtp_logits[0]
        second = model(input_ids=ids[:, 5:], return_mtp_logits=True).mtp_logits[0]
    # the last slot of each document reads a zeroed (wrapped) id in both runs
    assert_close(packed, torch.cat([first, second], dim=1), tol=1e-5)


def test_mtp_is_skipped_in_cached_generation_and_without_labels():
    model = _mimo(depths=1).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert model(input_ids=ids).mtp_logits is None
        assert model(input_ids=ids, use_cache=True, return_mtp_logits=True).mtp_logits is None


# --- MiniMax-M3(-VL) with MTP depths --------------------------------------------------------------


def test_minimax_m3_vl_mtp_depths_train_save_and_load(tmp_path):
    from safetensors.torch import load_file
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
        MiniMaxM3SparseForConditionalGeneration as Reference,
    )

    import plait
    from plait.models.hf import to_hf_config
    from plait.models.minimax_m3 import MiniMaxM3SparseForConditionalGeneration
    from plait.models.vlm import _m3_inputs
    from tests.models.test_minimax_m3 import IMAGE, vl_config

    torch.manual_seed(0)
    model = MiniMaxM3SparseForConditionalGeneration.from_config(to_hf_config(vl_config("sparse")), num_mtp_layers=2,
                                                                mtp_loss_scaling_factor=0.3)
    inputs = _m3_inputs(model.config, torch.rand(2, 3, 48, 48))
    ids = torch.cat([torch.tensor([1] + [IMAGE] * 9).expand(2, -1), torch.randint(6, 40, (2, 8))], dim=1)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 10, -100)
    out = model(input_ids=ids, labels=labels, **inputs)
    assert len(out.mtp_logits) == 2 and len(out.mtp_losses) == 2
    assert_close(out.loss, out.lm_loss + 0.3 / 2 * (out.mtp_losses[0] + out.mtp_losses[1]))
    out.loss.backward()
    assert model.language_model.mtp.layers[1].eh_proj.weight.grad.abs().sum() > 0
    # the NeMo AutoModel naming on disk; transformers ignores the depths and gives the same logits
    model.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "language_model.model.mtp.layers.1.eh_proj.weight" in names
    assert any(n.startswith("language_model.model.mtp.layers.0.transformer_layer.block_sparse_moe.experts.0.w1")
               for n in names)
    again = plait.from_pretrained(tmp_path)
    assert again.mtp_config.num_layers == 2
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    ref = Reference.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close(again.eval()(input_ids=ids, **inputs).logits, ref(input_ids=ids, **inputs).logits, tol=1e-4)
    # the public per-depth logits, from the trunk's last-layer (pre-norm) states, equal the forward's
    text_ids = torch.randint(6, 40, (2, 9))
    text = again.language_model
    with torch.no_grad():
        trunk = text(text_ids, return_trunk=True)
        by_method = text.mtp_logits(trunk.pre_norm, text_ids, again.lm_head)
        by_forward = again(input_ids=text_ids, return_mtp_logits=True).mtp_logits
    for a, b in zip(by_method, by_forward):
        assert_close(a, b, tol=1e-6)


def test_moe_layers_inside_mtp_depths_balance_like_the_trunk():
    """M3's depths take the MLP kind of the last trunk layer: a sparse one counts expert loads in training and
    moves its correction bias in the same update as the trunk's MoE layers."""
    from plait.models.minimax_m3 import MiniMaxM3SparseForCausalLM
    from plait.nn.moe import moe_layers, update_expert_bias
    from tests.nn.reference import m3_text_config

    torch.manual_seed(0)
    cfg = m3_text_config(mlp_layer_types=["dense", "sparse"], router_bias_update_rate=0.01)
    model = MiniMaxM3SparseForCausalLM.from_config(cfg, num_mtp_layers=2).train()
    ids = torch.randint(3, 64, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    names = [n for n in moe_layers(model) if ".mtp." in n]
    assert len(names) == 2
    loads = update_expert_bias(model)
    for name in names:
        assert loads[name].sum() == 2 * 12 * cfg.num_experts_per_tok  # every token routed to top-k experts
        bias = dict(model.named_buffers())[f"{name}.gate.e_score_correction_bias"]
        assert bias.abs().max() > 0
