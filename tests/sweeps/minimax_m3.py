"""Random MiniMax-M3-VL cases against transformers 5.23.0: the interface in `tests/sweeps/common.py`.

A case is a VL model (`MiniMaxM3SparseForConditionalGeneration` on both sides) or a text-only one
(`minimax_m3_vl_text`: plait's `MiniMaxM3SparseForCausalLM` against transformers' `MiniMaxM3VLForCausalLM`). It
varies the text backbone (dense / MoE and full / indexer-sparse layer mixes, 2-6 experts, top-1 to top-3, shared
experts or none, head dims 4-16, partial rotary, default / linear / yarn / llama3 rope, the lightning indexer's
heads, head dim, block size, top-k and local blocks, tied embeddings, routed scaling, the SwiGLU clamp), the vision
tower (patch 4-8, temporal patch 1-2, spatial merge 1-3, widths and heads) and the inputs: batch, row lengths, right
padding, several non-square images per row (or none) and videos of 1-2 temporal patches.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import (
    MiniMaxM3SparseForConditionalGeneration as Reference,
)
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLForCausalLM as TextReference

import plait
from plait.generate import generate, left_pad
from plait.models.minimax_m3_vision import patchify
from plait.models.presets import preset_dict
from plait.models.vlm import _m3_inputs, vlm_spec
from tests.models.test_minimax_m3 import gradients_by_disk_name, randomize
from tests.nn.reference import assert_close, assert_grads_close
from tests.sweeps.common import run_reference

PAD, BOS, EOS, IMAGE, VIDEO = 0, 1, 2, 4, 5
FIRST_TEXT = 6  # text tokens are drawn from [FIRST_TEXT, vocab)


def _rope(rng: random.Random, head_dim: int) -> dict:
    # transformers rotates int(head_dim * factor) channels: keep that width even and at least 2
    factor = rng.choice([f for f in (0.25, 0.5, 1.0) if (head_dim * f) % 2 == 0 and head_dim * f >= 2])
    rope = {"rope_type": "default", "rope_theta": rng.choice([100.0, 1e4, 1e6]), "partial_rotary_factor": factor}
    kind = rng.choice(["default", "default", "default", "linear", "yarn", "llama3"])
    if kind == "linear":
        rope |= {"rope_type": "linear", "factor": rng.choice([2.0, 4.0])}
    elif kind == "yarn":
        rope |= {"rope_type": "yarn", "factor": rng.choice([2.0, 4.0, 8.0]),
                 "original_max_position_embeddings": rng.choice([8, 16, 32])}
        if rng.random() < 0.3:
            rope |= {"beta_fast": rng.choice([8.0, 32.0]), "beta_slow": rng.choice([1.0, 2.0])}
    elif kind == "llama3":
        rope |= {"rope_type": "llama3", "factor": rng.choice([2.0, 8.0]), "low_freq_factor": 1.0,
                 "high_freq_factor": rng.choice([2.0, 4.0]), "original_max_position_embeddings": rng.choice([8, 16])}
    return rope


def _text_config(rng: random.Random) -> dict:
    layers = rng.randint(1, 3)
    heads = rng.choice([1, 2, 3, 4, 6, 8])
    kv = rng.choice([d for d in range(1, heads + 1) if heads % d == 0])
    head_dim = 2 * rng.randint(2, 8)
    experts = rng.randint(2, 6)
    # the indexer's heads each select blocks for a group of query heads: they divide the query heads
    index_heads = rng.choice([d for d in range(1, 5) if heads % d == 0])
    topk_blocks = rng.randint(1, 8)
    # index_local_blocks <= index_topk_blocks always: with more local blocks than picks transformers scores
    # every local block +inf and leaves the choice among them to topk's tie order (README, "by design")
    local_blocks = rng.randint(0, topk_blocks)
    cfg = {
        "hidden_size": 8 * rng.randint(2, 6),
        "intermediate_size": 4 * rng.randint(1, 8),
        "dense_intermediate_size": 8 * rng.randint(1, 6),
        "shared_intermediate_size": 0 if rng.random() < 0.3 else 4 * rng.randint(1, 8),  # 0: no shared experts
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "num_local_experts": experts,
        "num_experts_per_tok": rng.randint(1, min(3, experts)),
        "routed_scaling_factor": rng.choice([0.5, 1.0, 2.0, 2.5]),
        "layer_types": [rng.choice(["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"])
                        for _ in range(layers)],
        "mlp_layer_types": [rng.choice(["dense", "sparse", "sparse"]) for _ in range(layers)],
        "index_n_heads": index_heads,
        "index_head_dim": 2 * rng.randint(1, 16),
        "index_block_size": rng.choice([1, 2, 2, 3, 4, 4, 5, 8, rng.randint(1, 16)]),
        "index_topk_blocks": topk_blocks,
        "index_local_blocks": local_blocks,
        "rope_parameters": _rope(rng, head_dim),
        "tie_word_embeddings": rng.random() < 0.25,
        "initializer_range": rng.choice([0.06, 0.1, 0.2]),
    }
    if rng.random() < 0.3:  # a clamp that bites on these activations
        cfg |= {"swiglu_limit": rng.choice([0.5, 1.0, 2.0]), "swiglu_alpha": rng.choice([1.0, 1.702])}
    if "sparse" in cfg["mlp_layer_types"] and rng.random() < 0.3:  # transformers' pooled balancing loss
        cfg["router_aux_loss_coef"] = rng.choice([0.01, 0.2, 1.0])
    return cfg


def _vision_config(rng: random.Random) -> dict:
    hidden = 8 * rng.randint(2, 6)
    return {
        "hidden_size": hidden,
        "intermediate_size": 8 * rng.randint(2, 8),
        "num_hidden_layers": rng.randint(1, 2),
        "num_attention_heads": rng.choice([h for h in (1, 2, 4, 8) if hidden % h == 0 and 4 <= hidden // h <= 24]),
        "patch_size": rng.randint(4, 8),
        "temporal_patch_size": rng.randint(1, 2),
        "spatial_merge_size": rng.randint(1, 3),
        "initializer_range": rng.choice([0.1, 0.2, 0.3]),  # features that move the logits well past 1e-4
    }


def _tokens(item: dict, vision: dict) -> int:
    """The placeholders an image or video becomes: its merged patches."""
    side = vision["patch_size"] * vision["spatial_merge_size"]
    return item.get("t", 1) * (item["h"] // side) * (item["w"] // side)


def random_case(seed: int) -> dict:
    rng = random.Random(seed)
    vl = rng.random() < 0.7
    text = _text_config(rng)
    vision = _vision_config(rng) if vl else None
    batch = rng.randint(1, 3)
    rows = []  # each row: segments ["text", n] / ["image", index] / ["video", index], after a leading BOS
    images, videos = [], []
    for _ in range(batch):
        row = []
        if vl:
            for _ in range(rng.choice([0, 1, 1, 2, 3])):
                if rng.random() < 0.5:
                    row.append(["text", rng.randint(1, 4)])
                side = vision["patch_size"] * vision["spatial_merge_size"]
                # non-square: each side its own multiple of patch x merge, at most 9 tokens an image
                h, w = side * rng.randint(1, 3), side * rng.randint(1, 3)
                if rng.random() < 0.2:
                    videos.append({"t": rng.randint(1, 2), "h": h, "w": w})
                    row.append(["video", len(videos) - 1])
                else:
                    images.append({"h": h, "w": w})
                    row.append(["image", len(images) - 1])
        row.append(["text", rng.randint(1, 24)])  # at least one labelled real token after BOS
        rows.append(row)
    return {
        "seed": seed,
        "kind": "vl" if vl else "text",
        "vocab_size": rng.choice([40, 48, 64]),
        "text_config": text,
        "vision_config": vision,
        "projector_hidden_size": 8 * rng.randint(2, 6) if vl else None,
        "rows": rows,
        "images": images,
        "videos": videos,
        "extra_right_pad": rng.choice([0, 0, 0, 1, 3]),
        "max_new_tokens": rng.randint(2, 5),
        "backend": rng.choice(["sdpa", "sdpa", "eager", "flex"]),  # plait's attention backend
    }


# ------------------------------------------------------------------------------------------------------------


def _hf_config(case: dict):
    vocab = case["vocab_size"]
    if case["kind"] == "text":
        text = preset_dict("tiny-minimax-m3")["text_config"] | case["text_config"]
        return MiniMaxM3VLTextConfig(**text, vocab_size=vocab, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = preset_dict("tiny-minimax-m3", {"text_config": case["text_config"], "vision_config": case["vision_config"],
                                          "projector_hidden_size": case["projector_hidden_size"]})
    v = case["vision_config"]
    ids = {"pad": PAD, "bos": BOS, "eos": EOS, "image": IMAGE, "video": VIDEO}
    cfg = vlm_spec("minimax_m3_vl").complete_config(cfg, vocab, ids, v["patch_size"] * v["spatial_merge_size"])
    return plait.models.to_hf_config(cfg | {"video_token_index": VIDEO})


def _inputs(case: dict, config, g: torch.Generator):
    """ids, attention mask, labels (placeholders and padding unlabelled), per-row token lists and the pixel
    inputs of every image and video, each as `_m3_inputs` / `patchify` lay them out."""
    vocab, v = case["vocab_size"], case["vision_config"]
    image_inputs = [None] * len(case["images"])
    video_inputs = [None] * len(case["videos"])
    for i, item in enumerate(case["images"]):
        pixels = torch.rand(1, 3, item["h"], item["w"], generator=g) * 2 - 1
        image_inputs[i] = _m3_inputs(config, pixels)
    for i, item in enumerate(case["videos"]):
        frames = torch.rand(1, item["t"] * v["temporal_patch_size"], 3, item["h"], item["w"], generator=g) * 2 - 1
        patches, grid = patchify(frames, v["patch_size"], v["spatial_merge_size"], v["temporal_patch_size"])
        video_inputs[i] = {"pixel_values": patches, "image_grid_thw": grid}
    rows, row_images, row_videos = [], [], []
    for row in case["rows"]:
        ids, imgs, vids = [BOS], [], []
        for kind, n in row:
            if kind == "text":
                ids += torch.randint(FIRST_TEXT, vocab, (n,), generator=g).tolist()
            elif kind == "image":
                ids += [IMAGE] * _tokens(case["images"][n], v)
                imgs.append(n)
            else:
                ids += [VIDEO] * _tokens(case["videos"][n], v)
                vids.append(n)
        rows.append(torch.tensor(ids))
        row_images.append(imgs)
        row_videos.append(vids)
    length = max(len(r) for r in rows) + case["extra_right_pad"]
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    labels = input_ids.masked_fill((mask == 0) | (input_ids == IMAGE) | (input_ids == VIDEO), -100)
    return input_ids, mask, labels, rows, row_images, row_videos, image_inputs, video_inputs


def _pixels(image_inputs: list, video_inputs: list, images: list[int], videos: list[int]) -> dict:
    """The model inputs for these images and videos, in this order."""
    kw = {}
    if images:
        kw["pixel_values"] = torch.cat([image_inputs[i]["pixel_values"] for i in images])
        kw["image_grid_thw"] = torch.cat([image_inputs[i]["image_grid_thw"] for i in images])
    if videos:
        kw["pixel_values_videos"] = torch.cat([video_inputs[i]["pixel_values"] for i in videos])
        kw["video_grid_thw"] = torch.cat([video_inputs[i]["image_grid_thw"] for i in videos])
    return kw


def check(case: dict, workdir: Path) -> dict:
    cfg = run_reference(_hf_config, case)
    ref_class = Reference if case["kind"] == "vl" else TextReference
    torch.manual_seed(case["seed"])
    ref = randomize(run_reference(ref_class, cfg), seed=case["seed"]).eval()
    with torch.no_grad():
        # transformers zeroes the pad token's embedding row (padding_idx). Greedy decoding may emit that token and
        # feed it back as a real one; a zero row gives a zero indexer query, every block scores exactly 0, and
        # which tied blocks win is topk's order in transformers, the lowest index in plait (the README's tie
        # difference, by design). A random row keeps the scores apart.
        emb = ref.get_input_embeddings().weight
        emb[PAD] = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(case["seed"])) * emb.std()
    run_reference(ref.save_pretrained, workdir / "ref")
    ours = plait.from_pretrained(workdir / "ref", attn_implementation=case["backend"]).eval()
    assert type(ours).__name__ == ("MiniMaxM3SparseForConditionalGeneration" if case["kind"] == "vl"
                                   else "MiniMaxM3SparseForCausalLM"), type(ours).__name__

    g = torch.Generator().manual_seed(case["seed"] + 1)
    ids, mask, labels, rows, row_images, row_videos, image_inputs, video_inputs = _inputs(case, cfg, g)
    every = _pixels(image_inputs, video_inputs, [i for r in row_images for i in r], [i for r in row_videos for i in r])
    kw = dict(input_ids=ids, attention_mask=mask, **every)
    diffs = {}

    # logits on real tokens, the loss and every gradient (transformers supports right padding on sparse layers)
    # with router_aux_loss_coef drawn, output_router_logits=True: the loss carries the pooled balancing loss
    aux = {"output_router_logits": True} if "router_aux_loss_coef" in case["text_config"] else {}
    out_ref = run_reference(ref, labels=labels, **kw, **aux)
    out = ours(labels=labels, **kw, **aux)
    valid = mask.bool()
    diffs["logits"] = assert_close(out.logits[valid], out_ref.logits[valid], 1e-4, "logits")
    diffs["loss"] = assert_close(out.loss, out_ref.loss, 1e-4, "loss")
    if aux:
        diffs["aux_loss"] = assert_close(out.aux_loss, out_ref.aux_loss, 1e-5, "aux loss")
    run_reference(out_ref.loss.backward)
    out.loss.backward()
    mine, theirs = gradients_by_disk_name(ref, ours, workdir / "grads")
    diffs["grad_vs_tol"] = assert_grads_close(mine, theirs, rel=1e-3, floor=1e-7)

    # greedy generation with the KV cache: plait's rows left-padded in one batch, transformers' one prompt alone
    # (its indexer anchors blocks to slots, so left padding differs by design on sparse layers)
    gen = dict(max_new_tokens=case["max_new_tokens"], eos_token_id=EOS, pad_token_id=PAD)
    prompt_ids, prompt_mask = left_pad(rows, pad_id=PAD)
    batched = generate(ours, prompt_ids, prompt_mask, **gen, **every)
    for i, row in enumerate(rows):
        alone = run_reference(generate, ref, row.view(1, -1), None, **gen,
                              **_pixels(image_inputs, video_inputs, row_images[i], row_videos[i]))
        same = torch.equal(batched[i : i + 1, : alone.shape[1]], alone) and (batched[i, alone.shape[1] :] == PAD).all()
        assert same, f"greedy generation, row {i}: {batched[i].tolist()} vs transformers' {alone[0].tolist()}"
    if all(t == "full_attention" for t in case["text_config"]["layer_types"]):
        batched_ref = run_reference(generate, ref, prompt_ids, prompt_mask, **gen, **every)
        assert torch.equal(batched, batched_ref), f"greedy generation: {batched.tolist()} vs {batched_ref.tolist()}"
    diffs["generation_equal"] = 1.0

    # plait's save, loaded by transformers: the reference's logits
    ours.save_pretrained(workdir / "ours")
    back = run_reference(ref_class.from_pretrained, workdir / "ours").eval()
    with torch.no_grad():
        diffs["roundtrip_logits"] = assert_close(run_reference(back, **kw).logits[valid],
                                                 run_reference(ref, **kw).logits[valid], 1e-4, "round trip")
    return diffs
