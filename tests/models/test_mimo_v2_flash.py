"""Native MiMo-V2-Flash against transformers 5.23.0 (float32, CPU): logits, loss, every gradient, checkpoints."""

import json

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MiMoV2FlashForCausalLM as Reference

import plait
from plait.checkpoint import write_model_weights
from plait.generate import generate, left_pad
from plait.models.mimo_v2_flash import MiMoV2FlashForCausalLM, StateDictAdapter
from tests.nn.reference import assert_close, mimo_config

CONFIGS = {
    # full + SWA with sinks, 1 KV head (2 on SWA layers), asymmetric head dims, group-limited top-k
    "hybrid": dict(num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                   mlp_layer_types=["dense", "sparse", "sparse"]),
    # two leading dense layers, half rotary, no groups, a 3-token window, 2 KV heads
    "dense_lead": dict(num_hidden_layers=4, num_key_value_heads=2, sliding_window=3, n_group=1, topk_group=1,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                       mlp_layer_types=["dense", "dense", "sparse", "sparse"],
                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
    # equal head dims, q/k/v biases, a window longer than the sequence, tied embeddings, top-1
    "wide_window": dict(num_hidden_layers=2, head_dim=16, v_head_dim=16, sliding_window=64, attention_bias=True,
                        tie_word_embeddings=True, num_experts_per_tok=1, n_group=2, topk_group=1,
                        layer_types=["sliding_attention", "sliding_attention"], mlp_layer_types=["sparse", "dense"]),
}


def reference_model(name: str, seed: int = 0) -> Reference:
    torch.manual_seed(seed)
    ref = Reference(mimo_config(**CONFIGS[name])).eval()
    with torch.no_grad():  # the reference inits these to constants; random values test their wiring
        for n, p in ref.named_parameters():
            if n.endswith("sinks"):
                p.normal_(0, 0.5)
            if n.endswith("bias") and "self_attn" in n:
                p.normal_(0, 0.1)
        for n, b in ref.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return ref


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    ref = reference_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    ours = plait.from_pretrained(path)
    ours.eval()
    return ref, ours, path


def _inputs(B=2, S=13, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[-1, :4] = 0  # a left-padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    return ids, mask, labels


def test_loads_as_the_native_class(pair):
    _, ours, _ = pair
    assert isinstance(ours, MiMoV2FlashForCausalLM)


@pytest.mark.parametrize("S", [4, 13])  # shorter and longer than the windows
def test_logits_loss_and_every_gradient_match_transformers(pair, S):
    ref, ours, _ = pair
    ids, mask, labels = _inputs(S=S)
    mask[1, : min(4, S - 1)] = 0
    # no loss where the context is padding: pad tokens and the first real token after left padding
    labels = ids.masked_fill((mask == 0) | (torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 0), -100)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out_ref = ref(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    valid = mask.bool().unsqueeze(-1)
    assert_close(out.logits * valid, out_ref.logits * valid, tol=1e-4, name="logits")
    assert_close(out.loss, out_ref.loss, tol=1e-4, name="loss")
    ref.zero_grad()
    ours.zero_grad()
    out_ref.loss.backward()
    out.loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = theirs[name].grad
        if g_ref is None:  # experts no token reached this time
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert_close(p.grad, g_ref, tol=max(1e-3 * g_ref.abs().max().item(), 1e-7), name=f"grad {name}")



def test_logits_of_a_forward_with_labels_are_made_when_read_and_refused_after_a_step(tmp_path):
    ours = plait.from_pretrained(_saved(reference_model("hybrid"), tmp_path)).train()
    ids, mask, labels = _inputs()
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask).logits
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert "logits" not in out.__dict__ or not torch.is_tensor(out.__dict__["logits"])  # not made yet
    extra = out.logits.float().pow(2).mean()  # read before backward: gradients reach through them
    assert_close(out.logits, want, tol=1e-5, name="logits")
    (out.loss + extra).backward()
    assert ours.lm_head.weight.grad is not None
    late = ours(input_ids=ids, attention_mask=mask, labels=labels)
    torch.optim.SGD(ours.parameters(), lr=0.1).step()
    with pytest.raises(ValueError, match="changed in place after the forward"):
        late.logits
    assert ours(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False).logits is None


def _saved(ref, path):
    ref.save_pretrained(path)
    return path

def test_packed_rows_equal_each_document_run_alone(pair):
    # transformers' MiMo mask crosses documents in a packed row, so the reference is each document alone
    ref, ours, _ = pair
    ids, _, _ = _inputs(B=1, S=14)
    pos = torch.cat([torch.arange(6), torch.arange(8)]).view(1, 14)
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=pos).logits
        with_cu = ours(input_ids=ids, position_ids=pos, cu_seqlens=torch.tensor([0, 6, 14])).logits
        alone_ref = torch.cat([ref(input_ids=ids[:, :6]).logits, ref(input_ids=ids[:, 6:]).logits], dim=1)
    assert_close(packed, alone_ref, tol=1e-4)
    assert_close(with_cu, packed, tol=1e-6)
    # a padded tail does not hide the documents that the position ids mark
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], dim=1)
    padded_pos = torch.cat([pos, torch.zeros(1, 3, dtype=pos.dtype)], dim=1)
    mask = torch.cat([torch.ones(1, 14), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        padded = ours(input_ids=padded_ids, position_ids=padded_pos, attention_mask=mask).logits
    assert_close(padded[:, :14], packed, tol=1e-5)


def test_greedy_generation_with_the_kv_cache_matches_transformers(pair):
    ref, ours, _ = pair
    prompts = [torch.tensor([5, 9, 2, 7, 1, 3, 8]), torch.tensor([4, 4, 6])]
    ids, mask = left_pad(prompts, pad_id=0)
    kw = dict(max_new_tokens=9, eos_token_id=63, pad_token_id=0)
    new = generate(ours, ids, mask, **kw)
    new_ref = generate(ref, ids, mask, **kw)
    assert torch.equal(new, new_ref)


def test_sliding_window_layers_keep_only_their_window_in_the_cache(pair):
    _, ours, _ = pair
    ids, _, _ = _inputs(B=1, S=12)
    with torch.no_grad():
        out = ours(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    assert cache.seen == 12
    for key, layer in ours.model.layers.items():
        window = layer.self_attn.sliding_window
        expected = 12 if window is None else min(12, window - 1)
        assert cache.layers[key].length == expected


def test_save_then_transformers_loads_identical_logits(pair, tmp_path):
    ref, ours, _ = pair
    ours.save_pretrained(tmp_path)
    reloaded = Reference.from_pretrained(tmp_path).eval()
    ids, mask, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, ref(input_ids=ids).logits)
    # and plait reads its own save bit for bit
    again = plait.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_on_disk_names_are_the_hub_names(pair):
    _, _, path = pair
    names = set(load_file(path / "model.safetensors"))
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in names)
    assert any(n.endswith("self_attn.attention_sink_bias") for n in names)
    assert not any(n.endswith("gate_up_proj") or n.endswith(".sinks") for n in names)


def test_mtp_layers_round_trip_exactly_and_transformers_ignores_them(tmp_path):
    cfg = mimo_config(**CONFIGS["hybrid"])
    model = MiMoV2FlashForCausalLM.from_config(cfg, num_mtp_layers=2)
    with torch.no_grad():
        for p in model.model.mtp.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight", "input_layernorm.weight",
                "pre_mlp_layernorm.weight", "self_attn.q_proj.weight", "self_attn.attention_sink_bias",
                "mlp.gate_proj.weight", "mlp.down_proj.weight"):
        assert f"model.mtp.layers.1.{key}" in names, key
    again = plait.from_pretrained(tmp_path)
    assert again.mtp_config.num_layers == 2
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    ref = Reference.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert_close(again(input_ids=ids).logits, ref(input_ids=ids).logits, tol=1e-5)


def test_sharded_checkpoint_with_index_loads(tmp_path, pair):
    ref, ours, _ = pair
    config_dir = tmp_path / "sharded"
    ours.config.save_pretrained(config_dir)
    write_model_weights(config_dir, StateDictAdapter(ours.config).to_hf(ours.state_dict()), max_shard_bytes=20_000)
    index = json.loads((config_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = plait.from_pretrained(config_dir)
    ids, _, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(sharded(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_missing_unexpected_and_misshaped_weights_are_named(tmp_path, pair):
    _, _, path = pair
    state = load_file(path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())

    def write(variant: dict, name: str):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(variant, d / "model.safetensors")
        return d

    dropped = dict(state)
    dropped.pop("model.norm.weight")
    with pytest.raises(ValueError, match=r"missing 1: \['model.norm.weight'\]"):
        plait.from_pretrained(write(dropped, "missing"))
    extra = dict(state) | {"model.layers.0.mystery.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="unexpected 1: .*mystery"):
        plait.from_pretrained(write(extra, "unexpected"))
    bad = dict(state) | {"model.norm.weight": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"wrong shape 1: .*model.norm.weight \(expected \[48\], got \[7\]\)"):
        plait.from_pretrained(write(bad, "shape"))
    no_expert = {k: v for k, v in state.items() if ".experts.3." not in k}
    if len(no_expert) < len(state):
        with pytest.raises(ValueError, match="experts.3"):
            plait.from_pretrained(write(no_expert, "expert"))


def test_from_config_uses_the_reference_init_scheme():
    cfg = mimo_config(**CONFIGS["hybrid"])
    model = plait.from_config(cfg)
    assert isinstance(model, MiMoV2FlashForCausalLM)
    std = cfg.initializer_range
    q = model.model.layers["1"].self_attn.q_proj.weight
    assert abs(q.std().item() - std) < 0.2 * std
    assert torch.all(model.model.layers["1"].input_layernorm.weight == 1)
    assert torch.all(model.model.layers["1"].mlp.gate.e_score_correction_bias == 0)
    assert model.model.layers["1"].self_attn.sinks.abs().max() > 0
    assert model.model.rotary["full_attention"].inv_freq.dtype == torch.float32


def test_bad_configs_and_inputs_are_clear_errors():
    cfg = mimo_config()
    cfg.mlp_layer_types = ["dense"]  # edited after construction, past transformers' own checks
    with pytest.raises(ValueError, match=r"mlp_layer_types: expected 2 entries"):
        MiMoV2FlashForCausalLM(cfg)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        plait.from_config({"model_type": "mimo_v2_flash", "num_hidden_layers": 3, "layer_types": ["full_attention"]})
    model = MiMoV2FlashForCausalLM.from_config(mimo_config())
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="text-only"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3))


def test_bad_token_ids_positions_and_empty_rows_are_clear_errors():
    model = MiMoV2FlashForCausalLM.from_config(mimo_config())
    ids = torch.randint(0, 64, (2, 5))
    for bad, expected in ((ids.float(), r"integer token ids, got torch.float32"), (ids[0], r"\(batch, sequence\)"),
                          (ids + 64, r"token ids in \[0, 64\), got ids from \d+ to \d+"),
                          (ids - 64, r"token ids in \[0, 64\)"),
                          (ids[:, :0], "at least one token per row")):
        with pytest.raises(ValueError, match=expected):
            model(input_ids=bad)
    with pytest.raises(ValueError, match="integer positions"):
        model(input_ids=ids, position_ids=torch.arange(5.0).expand(2, 5))
    with pytest.raises(ValueError, match=r"integer positions of shape \(2, 5\)"):
        model(input_ids=ids, position_ids=torch.arange(5).expand(3, 5))
    width = model.config.hidden_size
    for bad in (torch.randn(2, 5, width + 1), torch.randn(5, width), torch.ones(2, 5, width, dtype=torch.long)):
        with pytest.raises(ValueError, match=rf"inputs_embeds: expected a floating-point \(batch, sequence, {width}\) "
                                             rf"tensor, got torch\.\w+ of shape {re.escape(str(list(bad.shape)))}"):
            model(inputs_embeds=bad)


def test_attention_dropout_is_refused_in_training_not_ignored():
    model = MiMoV2FlashForCausalLM.from_config(mimo_config(attention_dropout=0.1))
    ids = torch.randint(0, 64, (1, 5))
    with pytest.raises(ValueError, match="attention_dropout: not supported yet in training"):
        model.train()(input_ids=ids, labels=ids)
    model.eval()(input_ids=ids)  # inference never drops


def test_scaled_rope_and_an_unused_rope_entry_match_transformers(tmp_path):
    # yarn on full layers, linear on sliding ones; an entry for a layer type no layer has is not read
    rope = {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "partial_rotary_factor": 0.5, "factor": 4.0,
                               "original_max_position_embeddings": 16},
            "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "partial_rotary_factor": 0.5, "factor": 2.0}}
    torch.manual_seed(0)
    ref = Reference(mimo_config(**CONFIGS["hybrid"], rope_parameters=rope, max_position_embeddings=64)).eval()
    ref.config.rope_parameters["chunked_attention"] = {"rope_type": "longrope", "rope_theta": 1.0}
    ref.save_pretrained(tmp_path)
    ours = plait.from_pretrained(tmp_path).eval()
    assert ours.model.rotary["full_attention"].rope_type == "yarn"
    assert set(ours.model.rotary) == {"full_attention", "sliding_attention"}
    ids, mask, _ = _inputs(S=40)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        valid = mask.bool().unsqueeze(-1)
        assert_close(ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits * valid,
                     ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits * valid, tol=1e-4)


CORNERS = {
    # a scaled rope entry without partial_rotary_factor rotates the whole head (transformers' shared rope
    # functions), a default one MiMo's 0.334
    "scaled rope, no partial factor": dict(
        max_position_embeddings=64,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "yarn, no partial factor": dict(
        max_position_embeddings=64,
        rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                            "original_max_position_embeddings": 16},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "routed_scaling_factor 0": dict(routed_scaling_factor=0.0),  # the routed experts add nothing
    "ReGLU experts and MLP": dict(hidden_act="relu"),
    "quick_gelu": dict(hidden_act="quick_gelu"),
}


@pytest.mark.parametrize("corner", list(CORNERS))
def test_config_corners_match_transformers(tmp_path, corner):
    torch.manual_seed(0)
    ref = Reference(mimo_config(**(CONFIGS["hybrid"] | CORNERS[corner]))).eval()
    ref.save_pretrained(tmp_path)
    ours = plait.from_pretrained(tmp_path).eval()
    ids, mask, labels = _inputs(S=20)
    out_ref, out = ref(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_close(out.logits, out_ref.logits, tol=1e-4, name="logits")
    assert_close(out.loss, out_ref.loss, tol=1e-4, name="loss")


def test_a_mask_with_holes_and_no_position_ids_matches_transformers(pair):
    # padding inside a row keeps its slots in the positions (transformers counts every slot); left padding
    # before a row still starts it at 0, so it is placed as it would stand alone
    ref, ours, _ = pair
    ids, mask, _ = _inputs(S=12)
    mask[0, 3] = mask[0, 7:9] = 0
    valid = mask.bool().unsqueeze(-1)
    with torch.no_grad():
        assert_close(ours(input_ids=ids, attention_mask=mask).logits * valid,
                     ref(input_ids=ids, attention_mask=mask).logits * valid, tol=1e-4)


def test_bad_labels_are_refused_before_the_cache_or_the_expert_counts_move():
    model = MiMoV2FlashForCausalLM.from_config(mimo_config()).train()
    ids = torch.randint(0, 64, (2, 5))
    cache = plait.nn.attention.KVCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    counts = model.model.layers["1"].mlp.tokens_per_expert.clone()
    for bad, expected in ((ids[:, :1], r"shape \[2, 2\] \(the tokens'\), got torch.int64 of shape \[2, 1\]"),
                          (ids[:, :2] + 64, r"-100 or token ids in \[0, 64\)"), (ids[:, :2] - 101, r"\[0, 64\)"),
                          (ids[:, :2].float(), "integer tensor")):
        with pytest.raises(ValueError, match=expected):
            model(input_ids=ids[:, :2], labels=bad, past_key_values=cache, use_cache=True)
    assert cache.seen == 5 and torch.equal(model.model.layers["1"].mlp.tokens_per_expert, counts)


def test_masks_positions_and_config_values_out_of_their_domain_are_refused():
    model = MiMoV2FlashForCausalLM.from_config(mimo_config())
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match=r"attention_mask: expected 1 on real tokens and 0 on padding, got values \[0, 2\]"):
        model(input_ids=ids, attention_mask=torch.tensor([[0, 2, 2, 2, 2]] * 2))
    with pytest.raises(ValueError, match="position_ids: expected positions >= 0, got a minimum of -1"):
        model(input_ids=ids, position_ids=torch.arange(-1, 4).expand(2, 5))
    for bad, expected in ((dict(rms_norm_eps=-1e-6), "rms_norm_eps"), (dict(attention_value_scale=float("nan")), "value scale"),
                          (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 0.0},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
                           "rope_theta: expected a positive number")):
        with pytest.raises(ValueError, match=expected):
            MiMoV2FlashForCausalLM(mimo_config(**bad))
