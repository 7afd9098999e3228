"""Native MiniMax-M3(-VL) against transformers 5.23.0 (float32, CPU): logits, loss, gradients, checkpoints."""

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
    MiniMaxM3SparseForConditionalGeneration as Reference,
)
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLForCausalLM as TextReference

import plait
import plait.models.minimax_m3 as minimax_m3_module
from plait.generate import generate, left_pad
from plait.models.minimax_m3 import (
    LightningIndexer,
    MiniMaxM3SparseForCausalLM,
    MiniMaxM3SparseForConditionalGeneration,
    StateDictAdapter,
    build_moe_config,
    content_blocks,
)
from plait.models.minimax_m3_vision import to_grid_list
from plait.models.presets import preset_dict
from plait.models.vlm import _m3_inputs, vlm_spec
from plait.nn.attention import AttentionMask
from plait.nn.moe import MoE
from tests.nn.reference import assert_close, assert_grads_close

IMAGE, VIDEO = 4, 5
TEXT_VARIANTS = {
    # dense then MoE, every attention layer indexer-sparse with small blocks so the selection bites
    "sparse": {"num_hidden_layers": 3, "layer_types": ["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"],
               "mlp_layer_types": ["dense", "sparse", "sparse"], "index_block_size": 4, "index_topk_blocks": 2,
               "index_head_dim": 32, "index_n_heads": 2, "index_local_blocks": 1},
    # full attention only, full rotary, tied embeddings, top-1 of 4 experts, two local blocks
    "full": {"num_hidden_layers": 2, "layer_types": ["full_attention", "full_attention"],
             "mlp_layer_types": ["sparse", "dense"], "num_experts_per_tok": 1, "tie_word_embeddings": True,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}},
}


def vl_config(variant: str) -> dict:
    cfg = preset_dict("tiny-minimax-m3", {"text_config": TEXT_VARIANTS[variant]})
    cfg = vlm_spec("minimax_m3_vl").complete_config(cfg, 40, {"pad": 0, "bos": 1, "eos": 2, "image": IMAGE, "video": VIDEO}, 48)
    return cfg | {"video_token_index": VIDEO}


def randomize(model, seed=0):
    """transformers' init leaves norms at zero and biases empty; random values test their wiring."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module", params=list(TEXT_VARIANTS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = randomize(Reference(plait.models.to_hf_config(vl_config(request.param)))).eval()
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    ours = MiniMaxM3SparseForConditionalGeneration.from_pretrained(path).eval()
    return ref, ours, path


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 48, 48, generator=g)
    prefix = torch.tensor([1] + [IMAGE] * 9)
    ids = torch.cat([prefix.expand(2, -1), torch.randint(6, 40, (2, 11), generator=g)], dim=1)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 10, -100)
    return ids, labels, images


def test_logits_loss_and_gradients_match_transformers(pair, tmp_path):
    ref, ours, _ = pair
    ids, labels, images = _batch()
    inputs = _m3_inputs(ref.config, images)
    out_ref = ref(input_ids=ids, labels=labels, **inputs)
    out = ours(input_ids=ids, labels=labels, **inputs)
    assert_close(out.logits, out_ref.logits, tol=1e-4, name="logits")
    assert_close(out.loss, out_ref.loss, tol=1e-4, name="loss")
    out_ref.loss.backward()
    out.loss.backward()
    _assert_gradients_match(ref, ours, tmp_path)


def gradients_by_disk_name(ref, ours, tmp_path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(plait's, transformers') parameter gradients under the on-disk names, in the on-disk shapes: transformers'
    saved as if they were its weights, plait's through its StateDictAdapter. Width-0 shared experts
    (shared_intermediate_size 0) keep empty weights on both sides and are left out."""
    grads_model = type(ref)(ref.config)
    grads_model.load_state_dict({n: (p.grad if p.grad is not None else torch.zeros_like(p))
                                 for n, p in ref.named_parameters()} | dict(ref.named_buffers()), strict=False)
    grads_model.save_pretrained(tmp_path)
    buffers = {n for n, _ in ref.named_buffers()}  # saved beside the gradients; the router bias under its disk name
    theirs = {n: g for n, g in load_file(tmp_path / "model.safetensors").items()
              if n not in buffers and not n.endswith("e_score_correction_bias")}
    mine = StateDictAdapter(ours.config).to_hf({n: p.grad if p.grad is not None else torch.zeros_like(p)
                                                for n, p in ours.named_parameters()})
    mine = {n: g.reshape(theirs[n].shape) if n in theirs else g for n, g in mine.items()}
    for name in [n for n, g in theirs.items() if g.numel() == 0]:
        assert name in mine and mine[name].numel() == 0, f"grad {name}: empty in transformers only"
        del theirs[name], mine[name]
    return mine, theirs


def _assert_gradients_match(ref, ours, tmp_path):
    """Every gradient within 1e-3 of its reference's largest entry, under the on-disk names."""
    assert_grads_close(*gradients_by_disk_name(ref, ours, tmp_path), rel=1e-3, floor=1e-7)


def _right_padded_batch(ref, ours, pad: int):
    """`_batch()` with the second row `pad` tokens shorter, padded at its end; both models' gradients cleared."""
    ref.zero_grad()
    ours.zero_grad()
    ids, labels, images = _batch()
    mask = torch.ones_like(ids)
    mask[1, -pad:] = 0
    ids, labels = ids.masked_fill(mask == 0, 0), labels.masked_fill(mask == 0, -100)
    return ids, labels, mask, _m3_inputs(ref.config, images)


def test_a_right_padded_mixed_batch_matches_transformers(pair, tmp_path):
    # the second row is 6 tokens shorter: padded at its end, as training batches are
    ref, ours, _ = pair
    ids, labels, mask, inputs = _right_padded_batch(ref, ours, pad=6)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels, **inputs)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels, **inputs)
    valid = mask.bool().unsqueeze(-1)
    assert_close(out.logits * valid, out_ref.logits * valid, tol=1e-4, name="logits")
    assert_close(out.loss, out_ref.loss, tol=1e-4, name="loss")
    out_ref.loss.backward()
    out.loss.backward()
    _assert_gradients_match(ref, ours, tmp_path)
    ref.zero_grad()
    ours.zero_grad()


def test_videos_and_several_images_per_sample_splice_in_order(pair):
    ref, ours, _ = pair
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 48, 48, generator=g)
    img = _m3_inputs(ref.config, images)
    video = _m3_inputs(ref.config, torch.rand(1, 3, 48, 48, generator=g))  # a one-frame clip
    ids = torch.tensor([[1] + [IMAGE] * 9 + [7] + [IMAGE] * 9 + [8, 9], [1] + [IMAGE] * 9 + [VIDEO] * 9 + [8, 9, 10]])
    kw = dict(input_ids=ids, pixel_values=img["pixel_values"], image_grid_thw=img["image_grid_thw"],
              pixel_values_videos=video["pixel_values"], video_grid_thw=video["image_grid_thw"])
    with torch.no_grad():
        assert_close(ours(**kw).logits, ref(**kw).logits, tol=1e-4)


def test_images_of_different_sizes_attend_only_within_themselves(pair):
    ref, ours, _ = pair
    g = torch.Generator().manual_seed(4)
    big = _m3_inputs(ref.config, torch.rand(1, 3, 48, 48, generator=g))  # 6 x 6 patches -> 9 tokens
    small = _m3_inputs(ref.config, torch.rand(1, 3, 32, 48, generator=g))  # 4 x 6 patches -> 6 tokens
    pixels = torch.cat([big["pixel_values"], small["pixel_values"]])
    grid = torch.cat([big["image_grid_thw"], small["image_grid_thw"]])
    ids = torch.tensor([[1] + [IMAGE] * 9 + [7] + [IMAGE] * 6 + [8, 9]])
    with torch.no_grad():
        assert_close(ours(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits,
                     ref(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits, tol=1e-4)


def test_placeholder_count_mismatch_names_the_samples(pair):
    _, ours, _ = pair
    ids, _, images = _batch()
    inputs = _m3_inputs(ours.config, images)
    ids[1, 3] = 7  # one placeholder fewer in sample 1
    with pytest.raises(ValueError, match=r"images: placeholder tokens per sample \[9, 8\] do not match the features per image \[9, 9\]"):
        ours(input_ids=ids, **inputs)
    # the splice the forward runs, called as the pipeline-stage contract names it: features at the placeholders,
    # every other row the embedding, and the same per-sample error
    good = _batch()[0]
    with torch.no_grad():
        embeds = ours.get_input_embeddings()(good)
        args = (inputs["pixel_values"], inputs["image_grid_thw"], ours.config.image_token_index)
        spliced = ours._splice_multimodal(embeds, good, *args)
        slots = good == ours.config.image_token_index
        assert torch.equal(spliced[~slots], embeds[~slots])
        assert torch.equal(spliced[slots], ours.image_features(inputs["pixel_values"], inputs["image_grid_thw"]))
        with pytest.raises(ValueError, match=r"images: placeholder tokens per sample \[9, 8\]"):
            ours._splice_multimodal(embeds, ids, *args)
    with pytest.raises(ValueError, match="pixel_values: expected shape"):
        ours(input_ids=_batch()[0], pixel_values=inputs["pixel_values"][:-1], image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="pixel_values: expected normalised floating-point patches .* got torch.uint8"):
        ours(input_ids=_batch()[0], pixel_values=inputs["pixel_values"].to(torch.uint8), image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match=r"inputs_embeds: expected a floating-point \(batch, sequence, \d+\) tensor"):
        ours(inputs_embeds=torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"images: placeholder tokens per sample \[9, 9\] but no pixel values"):
        ours(input_ids=_batch()[0])
    with pytest.raises(ValueError, match="grid_thw came without its pixel values"):
        ours(input_ids=_batch()[0], image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        ours(input_ids=ids, inputs_embeds=ours.get_input_embeddings()(ids))
    assert to_grid_list([[1, 6, 6]]).tolist() == to_grid_list(torch.tensor([[1, 6, 6]])).tolist()
    with pytest.raises(ValueError, match="grid_thw"):
        to_grid_list([[1, 0, 6]])
    with pytest.raises(ValueError, match=r"positive integers, got \[\[1.5, 6.0, 6.0\]\]"):  # not read as t=1
        to_grid_list([[1.5, 6, 6]])
    assert to_grid_list(torch.tensor([[1.0, 6.0, 6.0]])).tolist() == [[1, 6, 6]]
    with pytest.raises(ValueError, match="index_local_blocks: expected a block count >= 0, got -1"):
        LightningIndexer(MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]
                                                  | {"index_local_blocks": -1})))


def test_greedy_generation_with_the_kv_cache_matches_transformers(pair):
    ref, ours, _ = pair
    _, _, images = _batch()
    inputs = _m3_inputs(ref.config, images)
    prompts = [torch.tensor([1] + [IMAGE] * 9 + [11, 12]), torch.tensor([1] + [IMAGE] * 9)]
    ids, mask = left_pad(prompts, pad_id=0)
    kw = dict(max_new_tokens=8, eos_token_id=2, pad_token_id=0)
    batched = generate(ours, ids, mask, **kw, **inputs)
    if ref.config.text_config.layer_types == ["full_attention"] * len(ref.config.text_config.layer_types):
        assert torch.equal(batched, generate(ref, ids, mask, **kw, **inputs))
    # each left-padded row as that prompt alone (transformers' indexer supports right padding only: its
    # left-padded rows pick blocks by slot, so sparse layers are compared one prompt at a time there)
    for i, prompt in enumerate(prompts):
        alone = _m3_inputs(ref.config, images[i : i + 1])
        row = prompt.view(1, -1)
        assert torch.equal(batched[i : i + 1], generate(ref, row, torch.ones_like(row), **kw, **alone)), i


def test_round_trips_through_both_libraries(pair, tmp_path):
    ref, ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = Reference.from_pretrained(tmp_path).eval()
    ids, _, images = _batch()
    inputs = _m3_inputs(ref.config, images)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, **inputs).logits, ref(input_ids=ids, **inputs).logits)
    again = MiniMaxM3SparseForConditionalGeneration.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_output_router_logits_adds_transformers_pooled_balance_loss(pair, tmp_path):
    # the pooled Switch loss over every sparse layer's real tokens (padding left out), weighted by
    # router_aux_loss_coef: the loss, the aux loss itself and every gradient as transformers has them
    ref, ours, _ = pair
    ids, labels, mask, inputs = _right_padded_batch(ref, ours, pad=5)
    coefs = ref.config.text_config.router_aux_loss_coef, ours.config.text_config.router_aux_loss_coef
    try:
        ref.config.text_config.router_aux_loss_coef = ours.config.text_config.router_aux_loss_coef = 0.5
        out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True, **inputs)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True, **inputs)
        plain = ours(input_ids=ids, attention_mask=mask, labels=labels, **inputs)
    finally:
        ref.config.text_config.router_aux_loss_coef, ours.config.text_config.router_aux_loss_coef = coefs
    assert out_ref.aux_loss > 0.5  # about 1 (balanced) or more: the check below compares a real term
    assert_close(out.aux_loss, out_ref.aux_loss, tol=1e-5, name="aux loss")
    assert_close(out.loss, out_ref.loss, tol=1e-4, name="loss")
    assert plain.aux_loss is None and torch.allclose(plain.loss + 0.5 * out.aux_loss, out.loss)
    assert all(m.router_logits is None for m in ours.modules() if isinstance(m, MoE))  # nothing kept after
    out_ref.loss.backward()
    out.loss.backward()
    _assert_gradients_match(ref, ours, tmp_path)
    ref.zero_grad()
    ours.zero_grad()


def test_a_config_with_output_router_logits_trains_on_the_pooled_loss(tmp_path):
    cfg = MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]),
                                vocab_size=40, pad_token_id=0, output_router_logits=True, router_aux_loss_coef=0.2)
    torch.manual_seed(0)
    ref = randomize(TextReference(cfg))
    ref.save_pretrained(tmp_path)
    ours = plait.from_pretrained(tmp_path)
    ids = torch.randint(3, 40, (2, 15))
    out_ref, out = ref(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert_close(out.aux_loss, out_ref.aux_loss, tol=1e-5, name="aux loss")
    assert_close(out.loss, out_ref.loss, tol=1e-4, name="loss")
    out_ref.loss.backward()
    out.loss.backward()
    router = "model.layers.1.mlp.gate.weight"
    assert_close(dict(ours.named_parameters())[router].grad, dict(ref.named_parameters())[router].grad, tol=1e-5,
                 name="router gradient")
    with pytest.raises(ValueError, match="output_router_logits"):
        from plait.parallel.pipeline import check_pipelinable

        check_pipelinable(ours)


def test_text_only_model_matches_transformers(tmp_path):
    cfg = MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]),
                                vocab_size=40, pad_token_id=0)
    torch.manual_seed(0)
    ref = randomize(TextReference(cfg)).eval()
    ref.save_pretrained(tmp_path)
    ours = plait.from_pretrained(tmp_path)
    assert isinstance(ours, MiniMaxM3SparseForCausalLM)
    assert isinstance(plait.from_pretrained(tmp_path / ".." / tmp_path.name), MiniMaxM3SparseForCausalLM)
    ids = torch.randint(3, 40, (2, 15))
    with torch.no_grad():
        assert_close(ours(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss, tol=1e-4)
        assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, tol=1e-4)
    with pytest.raises(ValueError, match="text-only"):
        ours(input_ids=ids, pixel_values=torch.zeros(1, 3))
    ours.save_pretrained(tmp_path / "back")
    with torch.no_grad():
        back = TextReference.from_pretrained(tmp_path / "back").eval()
        assert torch.equal(back(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_a_selection_that_keeps_every_block_skips_the_indexer(tmp_path):
    # blocks of 4, top-2: up to 8 tokens the indexer keeps every block a query sees (a packed document has no
    # more blocks than its row), and the causal mask alone gives the same attention; past that it runs
    cfg = MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]),
                                vocab_size=40, pad_token_id=0)
    torch.manual_seed(0)
    ref = randomize(TextReference(cfg)).eval()
    ref.save_pretrained(tmp_path)
    ours = plait.from_pretrained(tmp_path).eval()
    runs = []
    for layer in ours.model.layers.values():
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.register_forward_hook(lambda *args: runs.append(1))
    ids = torch.randint(3, 40, (2, 8))
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, tol=1e-4)
        ours(input_ids=ids, position_ids=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))  # two packed documents
        assert not runs
        long_ids = torch.randint(3, 40, (2, 9))
        assert_close(ours(input_ids=long_ids).logits, ref(input_ids=long_ids).logits, tol=1e-4)
        assert len(runs) == 2


@pytest.mark.parametrize("seq_len", [37, 48])  # a partial last block, and none
@pytest.mark.parametrize("group_rows", [8, 16, 24, 256])  # queries per matmul: 1, 2 or 3 blocks, all of them
def test_the_indexers_causal_block_scores_equal_the_masked_ones(monkeypatch, seq_len, group_rows):
    # under the plain causal rule the indexer scores each group of query blocks against the keys up to its end
    # only; the maxima must be those of the full masked score matrix, pooled by slot blocks or by block ids
    monkeypatch.setattr(minimax_m3_module, "INDEXER_QUERY_ROWS", group_rows)
    cfg = MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]))
    cfg.index_block_size = 8
    indexer = LightningIndexer(cfg)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, indexer.num_heads, seq_len, indexer.head_dim, generator=g)
    k = torch.randn(2, 1, seq_len, indexer.head_dim, generator=g)
    visible = AttentionMask.build(2, seq_len, "cpu").dense(None)
    n_blocks = -(-seq_len // 8)
    fast, masked = indexer._causal_block_scores(q, k), indexer._block_scores(q, k, visible, None, n_blocks)
    by_id = indexer._block_scores(q, k, visible, (torch.arange(seq_len) // 8).expand(2, -1).contiguous(), n_blocks)
    future = masked.isinf()  # blocks wholly in a query's future
    assert torch.equal(fast.isinf(), future) and future.any() and torch.equal(by_id, masked)
    assert_close(fast.masked_fill(future, 0.0), masked.masked_fill(future, 0.0), tol=1e-5)


def test_content_blocks_follow_documents_and_skip_padding():
    # blocks of 2 over: two left pads then 5 real tokens; a packed row of documents 3 + 4 with one pad at its end
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    docs = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2, 2, 2]])
    key_block, rank = content_blocks(valid, docs, 8, 2)
    assert key_block.tolist() == [[0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 3, 3, 3]]
    assert rank.tolist()[0][2:] == [0, 1, 2, 3, 4, 5] and rank.tolist()[1][:7] == [0, 1, 2, 0, 1, 2, 3]
    assert content_blocks(None, None, 8, 2) is None
    assert content_blocks(torch.ones(2, 8, dtype=torch.bool), None, 8, 2) is None
    # right padding, queries that are the keys (no cache): no real query sees a pad, the slots' blocks serve
    right = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert content_blocks(right, None, 8, 2, queries_are_keys=True) is None
    assert content_blocks(right, None, 8, 2) is not None and content_blocks(valid, None, 8, 2, True) is not None


def test_constructors_take_config_moe_config_and_backend():
    cfg = plait.models.to_hf_config(vl_config("sparse"))
    default = MiniMaxM3SparseForConditionalGeneration(cfg, None, None)
    eager = MiniMaxM3SparseForConditionalGeneration(cfg, build_moe_config(cfg.text_config, experts_impl="loop"), "eager")
    assert default.language_model.layers["1"].self_attn.backend == "sdpa"
    assert eager.language_model.layers["1"].self_attn.backend == "eager"
    assert eager.language_model.layers["1"].mlp.experts.impl == "loop"
    with pytest.raises(ValueError, match="attention backend"):
        MiniMaxM3SparseForConditionalGeneration(cfg, None, "fast")
    # build_moe_config(config, dtype): the routed experts' parameters in that dtype, the balancing state float32
    half = MiniMaxM3SparseForConditionalGeneration(cfg, build_moe_config(cfg.text_config, torch.bfloat16))
    moe = half.language_model.layers["1"].mlp
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert half.language_model.layers["1"].self_attn.q_proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype expected a torch.dtype"):
        build_moe_config(cfg.text_config, "loop")


def test_from_config_init_and_fp32_rotary():
    model = MiniMaxM3SparseForConditionalGeneration.from_config(plait.models.to_hf_config(vl_config("sparse")))
    lm = model.language_model
    assert torch.all(lm.layers["0"].input_layernorm.weight == 0)  # (1 + w) norms start at w = 0
    assert torch.all(lm.layers["1"].mlp.gate.e_score_correction_bias == 0)
    model.to(torch.bfloat16)
    assert lm.rotary.inv_freq.dtype == torch.float32
    assert model.vision_tower.rotary.inv_freq.dtype == torch.float32


def test_the_run_config_picks_native_or_stock_classes():
    from plait.config import ModelSettings
    from plait.models.build import build_model

    ids = {"pad": 0, "bos": 1, "eos": 2, "image": IMAGE, "video": VIDEO}
    native = build_model(ModelSettings(preset="tiny-minimax-m3"), 40, ids, 48)
    stock = build_model(ModelSettings(preset="tiny-minimax-m3", implementation="transformers"), 40, ids, 48)
    assert isinstance(native, MiniMaxM3SparseForConditionalGeneration)
    assert isinstance(stock, Reference)


# flex trains through sdpa on CPU; an indexer head dim below the rotary width rotates its q, k by a part of the
# angles only, so its scores depend on absolute positions: rows without position ids need them derived
@pytest.mark.parametrize("backend, index_head_dim", [("sdpa", 32), ("eager", 32), ("flex", 32), ("sdpa", 6)])
def test_left_padded_and_packed_rows_on_sparse_layers_match_each_document_alone(tmp_path, backend, index_head_dim):
    # blocks of 2, top-2, one local block: every sparse layer drops blocks. A left-padded row, a packed row (by
    # restarting position ids and by cu_seqlens) and a packed row with a padded tail must give each document the
    # logits and gradients transformers gives that document alone
    cfg = MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]
                                   | {"index_block_size": 2, "index_head_dim": index_head_dim}),
                                vocab_size=40, pad_token_id=0)
    torch.manual_seed(0)
    ref = randomize(TextReference(cfg)).eval()
    ref.save_pretrained(tmp_path)
    ours = plait.from_pretrained(tmp_path, attn_implementation=backend).eval()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 40, (n,), generator=g) for n in (11, 7, 5)]
    alone = []
    for d in docs:
        out = ref(input_ids=d.view(1, -1), labels=d.view(1, -1))
        ref.zero_grad()
        out.loss.backward()
        alone.append((out.logits[0].detach(), {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}))

    def check(ids, spans, **kw):  # spans: (row, first slot, document index) of each document
        logits = ours(input_ids=ids, **kw).logits
        for row, lo, i in spans:
            assert_close(logits[row, lo : lo + len(docs[i])], alone[i][0], tol=1e-4)

    with torch.no_grad():
        left, mask = left_pad([docs[0], docs[2]], pad_id=0)
        check(left, [(0, 0, 0), (1, 6, 2)], attention_mask=mask)
        packed = torch.cat(docs).view(1, -1)
        positions = torch.cat([torch.arange(len(d)) for d in docs]).view(1, -1)
        spans = [(0, 0, 0), (0, 11, 1), (0, 18, 2)]
        check(packed, spans, position_ids=positions)
        check(packed, spans, position_ids=positions, cu_seqlens=torch.tensor([0, 11, 18, 23]))
        check(packed, spans, cu_seqlens=torch.tensor([0, 11, 18, 23]))  # positions from the documents
        tail = torch.cat([packed, torch.zeros(1, 3, dtype=torch.long)], dim=1)
        check(tail, spans, attention_mask=(torch.arange(26) < 23).long().view(1, -1),
              position_ids=torch.cat([positions, torch.arange(3).view(1, -1)], dim=1))
    # gradients of a packed row: the sum of each document's own (one mean loss per document, summed)
    ours.train()
    logits = ours(input_ids=packed, position_ids=positions).logits.float()
    log_probs = logits[0].log_softmax(-1)
    loss = sum(-log_probs[lo : lo + len(d) - 1].gather(1, d[1:].view(-1, 1)).mean() for lo, d in zip((0, 11, 18), docs))
    loss.backward()
    grads = StateDictAdapter(ref.config).to_hf({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    for name, grad in grads.items():
        assert_close(grad, sum(a[1][name] for a in alone if name in a[1]), tol=1e-4)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # the width-0 shared experts
@pytest.mark.parametrize("vl", [False, True])
def test_a_checkpoint_without_shared_experts_loads_and_saves(tmp_path, vl):
    # shared_intermediate_size = 0: transformers keeps width-0 shared experts and saves their empty weights
    if vl:
        cfg = plait.models.to_hf_config(vl_config("sparse") | {"text_config": vl_config("sparse")["text_config"]
                                                               | {"shared_intermediate_size": 0}})
        ref = randomize(Reference(cfg)).eval()
    else:
        cfg = MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]
                                       | {"shared_intermediate_size": 0}), vocab_size=40, pad_token_id=0)
        ref = randomize(TextReference(cfg)).eval()
    ref.save_pretrained(tmp_path / "ref")
    ours = plait.from_pretrained(tmp_path / "ref").eval()
    assert all(m.shared_experts is None for m in ours.modules() if isinstance(m, MoE))
    ids = torch.randint(6, 40, (2, 12))
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, tol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    back, info = type(ref).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.equal(back.eval()(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_a_scaled_rope_matches_transformers(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]
                                   | {"rope_parameters": rope}), vocab_size=40, pad_token_id=0)
    torch.manual_seed(0)
    ref = randomize(TextReference(cfg)).eval()
    ref.save_pretrained(tmp_path)
    ours = plait.from_pretrained(tmp_path).eval()
    assert ours.model.rotary.rope_type == "llama3"
    ids = torch.randint(3, 40, (2, 40))
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, tol=1e-4)


def _keep_only(model, names):
    """Prune a copy of `model` in place to the module paths `names` (a stage of a splitter that nulls the rest)."""
    import copy

    stage = copy.deepcopy(model)
    text = stage._text_model()
    for key in list(text.layers.keys()):
        if f"{stage.text_attr}.layers.{key}" not in names:
            del text.layers[key]
    for path in ("vision_tower", "multi_modal_projector", "lm_head", f"{stage.text_attr}.embed_tokens",
                 f"{stage.text_attr}.norm"):
        if path not in names and hasattr(stage, path.split(".")[0]):
            parent, _, attr = path.rpartition(".")
            setattr(stage.get_submodule(parent) if parent else stage, attr, None)
    return stage


def test_pipeline_stage_hooks_split_the_model_as_a_schedule_would(pair):
    # generic names as a splitter writes them for a VLM (text stack under model.language_model., vision under
    # model.), mapped to this model's paths; the pruned stages, chained, give the whole model's logits
    ref, ours, _ = pair
    ids, _, images = _batch()
    inputs = _m3_inputs(ref.config, images)
    generic = [["model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
                "model.language_model.layers.0"],
               ["model.language_model.layers.1"],
               [f"model.language_model.layers.{i}" for i in range(2, ours.config.text_config.num_hidden_layers)]
               + ["model.language_model.norm", "lm_head"]]
    stages = ours.customize_pipeline_stage_modules(generic, layers_prefix="model.language_model.")
    assert stages[0][:3] == ["vision_tower", "multi_modal_projector", "language_model.embed_tokens"]
    assert all("language_model.rotary" in s for s in stages) and stages[2][-2:] == ["lm_head", "language_model.rotary"]
    parts = [_keep_only(ours, names) for names in stages]
    assert not ours._is_pipeline_parallel_stage() and all(p._is_pipeline_parallel_stage() for p in parts)
    assert ours._pp_keep_self_forward and plait.models.minimax_m3.ModelClass is type(ours)
    assert ours._to_grid_list([[1, 4, 6]]) == [[1, 4, 6]] == ours._to_grid_list(torch.tensor([[1, 4, 6]]))
    with torch.no_grad():
        h = parts[0](input_ids=ids, **inputs)
        (meta_in,), (meta_out,) = parts[0].get_pipeline_stage_metas(is_first=True, microbatch_size=2,
                                                                     seq_len=ids.shape[1], dtype=torch.float32)
        assert meta_in.dtype == torch.long and meta_in.shape == ids.shape and meta_out.shape == h.shape
        h = parts[1](input_ids=h)  # hidden states in the ids slot
        logits = parts[2](inputs_embeds=h)
        (meta_in,), (meta_out,) = parts[2].get_pipeline_stage_metas(is_first=False, microbatch_size=2,
                                                                     seq_len=ids.shape[1], dtype=torch.float32)
        assert meta_in.shape == h.shape and meta_out.shape == logits.shape == (2, ids.shape[1], 40)
        assert_close(logits, ours(input_ids=ids, **inputs).logits, tol=1e-5)
    with pytest.raises(ValueError, match="no embedding; pass the previous stage's hidden states"):
        parts[1](input_ids=ids)
    with pytest.raises(ValueError, match="microbatch_size must be a positive integer, got 0"):
        ours.get_pipeline_stage_metas(is_first=True, microbatch_size=0, seq_len=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        ours.get_pipeline_stage_metas(is_first=True, microbatch_size=1, seq_len=4, dtype=torch.long)
    with pytest.raises(ValueError, match="'language_model.layers.99' is not a module"):
        ours.customize_pipeline_stage_modules([["model.language_model.layers.99"]], layers_prefix="model.language_model.")


def test_with_more_local_blocks_than_picks_the_nearest_are_kept():
    # 3 local blocks, top-2: every query keeps its own block and the one before it (transformers' +inf ties
    # leave the choice to topk's order, which may drop the query's own block)
    cfg = MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]
                                   | {"index_block_size": 2, "index_local_blocks": 3}), vocab_size=40, pad_token_id=0)
    indexer = LightningIndexer(cfg)
    S = 11
    x = torch.randn(1, S, cfg.hidden_size)
    rope = plait.nn.rope.RotaryEmbedding(cfg.head_dim, 1e4, 0.5)(torch.arange(S).view(1, S))
    keep = indexer(x, rope, AttentionMask.build(1, S, "cpu")).keep  # (1, h, S, blocks)
    own = torch.arange(S) // 2
    for q in range(S):
        expected = {int(own[q]), max(int(own[q]) - 1, 0)}
        assert set(keep[0, 0, q].nonzero().view(-1).tolist()) == expected, q


def test_the_stage_module_mapping_puts_the_mtp_depths_on_the_last_stage():
    cfg = MiniMaxM3VLTextConfig(**(preset_dict("tiny-minimax-m3")["text_config"] | TEXT_VARIANTS["sparse"]),
                                vocab_size=40, pad_token_id=0)
    model = MiniMaxM3SparseForCausalLM(cfg, num_mtp_layers=1)
    stages = model.customize_pipeline_stage_modules(
        [["model.embed_tokens", "model.layers.0"], ["model.layers.1", "model.layers.2", "model.norm", "lm_head"]],
        layers_prefix="model.")
    assert stages == [["model.embed_tokens", "model.layers.0", "model.rotary"],
                      ["model.layers.1", "model.layers.2", "model.norm", "lm_head", "model.rotary", "model.mtp"]]
