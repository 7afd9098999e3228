"""MIMO composition: alignment contract, errors, and equality with a hand-built inputs_embeds call."""

import pytest
import torch
from torch import nn

from plait.models.mimo import MimoModel, MimoModelConfig, align_embeddings_by_token_positions
from tests.nn.reference import mimo_config

IMG, AUD = 90, 91
LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
CLIP = {"model_type": "clip_vision_model", "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 16, "patch_size": 8}  # 4 patches + 1 class token per image


def test_alignment_matches_a_hand_built_expectation():
    H = 3
    ids = torch.tensor([[5, IMG, IMG, 6, AUD], [IMG, 7, 8, AUD, AUD]])
    img = torch.arange(3 * H, dtype=torch.float32).view(3, H) + 100
    aud = torch.arange(3 * H, dtype=torch.float32).view(3, H) + 200
    text = torch.arange(4 * H, dtype=torch.float32).view(4, H)
    out = align_embeddings_by_token_positions({"text": text, "images": img, "audio": aud}, ids,
                                              {"images": IMG, "audio": AUD})
    assert out.shape == (5, 2, H)
    expected = torch.stack([
        torch.stack([text[0], img[0], img[1], text[1], aud[0]]),
        torch.stack([img[2], text[2], text[3], aud[1], aud[2]]),
    ]).transpose(0, 1)  # row-major over (B, S), returned (S, B, H)
    assert torch.equal(out, expected)
    single = align_embeddings_by_token_positions({"text": text[:2], "images": img[:1]}, torch.tensor([5, IMG, 6]),
                                                 {"images": IMG})
    assert single.shape == (3, 1, H) and torch.equal(single[1, 0], img[0])


@pytest.mark.parametrize("embeddings, special, match", [
    ({"text": torch.zeros(3, 2), "images": torch.zeros(1, 2)}, {"images": IMG},
     r"modality 'images': 2 special tokens \(id 90\) in input_ids but 1 embeddings"),
    ({"text": torch.zeros(3, 2), "images": torch.zeros(2, 2), "audio": torch.zeros(1, 2)}, {"images": IMG},
     r"modality 'audio': embeddings given but no special token id"),
    ({"text": torch.zeros(3, 2)}, {"images": IMG}, r"modality 'images': 2 special tokens .* but 0 embeddings"),
    ({"text": torch.zeros(2, 2), "images": torch.zeros(2, 2)}, {"images": IMG}, r"modality 'text': 3 text tokens"),
])
def test_alignment_errors_name_the_modality_and_the_counts(embeddings, special, match):
    with pytest.raises(ValueError, match=match):
        align_embeddings_by_token_positions(embeddings, torch.tensor([[1, IMG, 2, IMG, 3]]), special)


def _model(**modalities) -> MimoModel:
    torch.manual_seed(0)
    cfg = MimoModelConfig(language_model=LLAMA, modalities=modalities or {
        "images": {"clip": {"kind": "transformers", "config": CLIP}},
        "audio": {"proj": {"kind": "import", "target": "torch.nn:Linear", "output_dim": 6,
                           "config": {"in_features": 4, "out_features": 6}, "projection": "linear"}},
    }, special_token_ids={"images": IMG, "audio": AUD})
    return MimoModel(cfg).eval()


def test_logits_equal_the_language_model_called_with_hand_built_embeddings():
    model = _model()
    pixels = torch.randn(2, 3, 16, 16)  # 2 images x 5 tokens
    audio = torch.randn(3, 4)  # 3 audio frames
    ids = torch.tensor([[1] + [IMG] * 5 + [2, AUD, AUD, 3], [4, AUD] + [IMG] * 5 + [5, 6, 7]])
    with torch.no_grad():
        out, _ = model(ids, modality_inputs={"images": {"clip": {"pixel_values": pixels}},
                                             "audio": {"proj": {"input": audio}}})
        clip = model.encoders["images"]["clip"].model(pixel_values=pixels).last_hidden_state.reshape(-1, 24)
        img = model.projections["images"]["clip"](clip)
        aud = model.projections["audio"]["proj"](model.encoders["audio"]["proj"](audio))
        embeds = model.language_model.get_input_embeddings()(ids).clone()
        embeds[ids == IMG] = img
        embeds[ids == AUD] = aud
        ref = model.language_model(inputs_embeds=embeds).logits
    assert torch.allclose(out.logits, ref, atol=1e-5)


def test_text_only_batches_loss_mask_and_skipped_encoders():
    model = _model()
    ids = torch.randint(1, 80, (2, 6))
    labels = ids.clone()
    loss_mask = torch.ones_like(ids)
    loss_mask[:, :3] = 0
    # image inputs given but no image tokens in the batch: the encoder is skipped
    out, mask = model(ids, labels=labels, loss_mask=loss_mask,
                      modality_inputs={"images": {"clip": {"pixel_values": torch.randn(1, 3, 16, 16)}}})
    ref = model.language_model(input_ids=ids, labels=labels.masked_fill(loss_mask == 0, -100))
    assert torch.allclose(out.loss, ref.loss, atol=1e-6) and mask is loss_mask
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        model(ids, modality_inputs={"video": {}})


def test_a_stock_encoder_from_a_local_dir_and_a_state_dict_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModel

    cfg = dict(CLIP)
    AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(tmp_path / "clip")
    model = _model(images={"clip": {"kind": "transformers", "pretrained": str(tmp_path / "clip")}})
    ids = torch.tensor([[1] + [IMG] * 5 + [2]])
    inputs = {"images": {"clip": {"pixel_values": torch.randn(1, 3, 16, 16)}}}
    with torch.no_grad():
        before = model(ids, modality_inputs=inputs)[0].logits
    torch.save(model.state_dict(), tmp_path / "mimo.pt")
    again = _model(images={"clip": {"kind": "transformers", "pretrained": str(tmp_path / "clip")}})
    again.load_state_dict(torch.load(tmp_path / "mimo.pt"))
    with torch.no_grad():
        assert torch.equal(again.eval()(ids, modality_inputs=inputs)[0].logits, before)
    assert set(model.sharded_state_dict("mimo.")) == {f"mimo.{k}" for k in model.state_dict()}


def test_packed_and_unpacked_forwards_agree_per_document():
    torch.manual_seed(0)
    lm = mimo_config(vocab_size=96, tie_word_embeddings=False).to_dict()
    cfg = MimoModelConfig(language_model=lm, modalities={"images": {"m3": {
        "kind": "minimax_m3_vision", "config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2, "patch_size": 4, "temporal_patch_size": 1,
                                                 "spatial_merge_size": 1}}}}, special_token_ids={"images": IMG})
    model = MimoModel(cfg).eval()
    patches = torch.randn(4, 3 * 4 * 4)  # one 2 x 2-patch image
    doc1 = torch.tensor([1] + [IMG] * 4 + [2, 3])
    doc2 = torch.tensor([4, 5, 6, 7])
    image = {"images": {"m3": {"pixel_values": patches, "grid_thw": [[1, 2, 2]]}}}
    with torch.no_grad():
        packed = model(torch.cat([doc1, doc2]).view(1, -1), modality_inputs=image,
                       packing_kwargs={"cu_seqlens_q": torch.tensor([0, 7, 11])})[0].logits
        alone1 = model(doc1.view(1, -1), modality_inputs=image)[0].logits
        alone2 = model(doc2.view(1, -1))[0].logits
    assert torch.allclose(packed, torch.cat([alone1, alone2], dim=1), atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="exactly one of language_model"):
        MimoModelConfig()
    with pytest.raises(ValueError, match="no token id for modality"):
        MimoModelConfig(language_model=LLAMA, modalities={"images": {"clip": {"kind": "transformers", "config": CLIP}}})
    with pytest.raises(ValueError, match="ClassName"):
        MimoModelConfig(language_model=LLAMA, modalities={"a": {"x": {"kind": "import", "target": "torch.nn.Linear"}}},
                        special_token_ids={"a": 5})
    assert isinstance(_model().encoders["audio"]["proj"], nn.Linear)


def test_a_mixed_image_and_audio_batch_with_the_bundled_audio_features():
    from plait.data.audio import generate_audio, log_mel

    model = _model(
        images={"clip": {"kind": "transformers", "config": CLIP}},
        audio={"frames": {"kind": "import", "target": "torch.nn:Linear", "output_dim": 16,
                          "config": {"in_features": 32, "out_features": 16}}},
    )
    waves, captions = generate_audio(1, 1, 1, seed=0)["train"]
    mels = log_mel(waves)[0]  # (frames, 32): one row per audio token
    n = mels.shape[0]
    ids = torch.tensor([[1] + [AUD] * n + [2, 3], [1] + [IMG] * 5 + [4] * (n - 3)])
    out, _ = model(ids, labels=ids, modality_inputs={"images": {"clip": {"pixel_values": torch.randn(1, 3, 16, 16)}},
                                                     "audio": {"frames": {"input": mels}}})
    assert out.logits.shape == (2, n + 3, 96) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.projections["audio"]["frames"][0].weight.grad.abs().sum() > 0
    assert captions[0].startswith("a ")


def test_set_input_tensor_feeds_hidden_states_and_modality_embeddings_and_rejects_bad_input():
    model = _model()
    pixels, audio = torch.randn(1, 3, 16, 16), torch.randn(2, 4)
    ids = torch.tensor([[1] + [IMG] * 5 + [2, AUD, AUD, 3]])
    inputs = {"images": {"clip": {"pixel_values": pixels}}, "audio": {"proj": {"input": audio}}}
    with torch.no_grad():
        ref = model(ids, modality_inputs=inputs)[0].logits
        embeds = model._input_embeddings(ids, None, inputs)
        # the language model's input given whole (a later pipeline stage, here a one-stage LM): same logits
        for given in (embeds, [embeds], {"language_model": embeds}):
            model.set_input_tensor(given)
            assert torch.allclose(model(None)[0].logits, ref, atol=1e-6)
        # a modality's projected embeddings computed elsewhere stand in for running its encoders
        img = model.projections["images"]["clip"](model.encoders["images"]["clip"](pixel_values=pixels))
        model.set_input_tensor({"images": img})
        assert torch.allclose(model(ids, modality_inputs={"audio": inputs["audio"]})[0].logits, ref, atol=1e-6)
        with pytest.raises(ValueError, match=r"\['images'\] also given as input tensors"):
            model(ids, modality_inputs=inputs)
        model.set_input_tensor(None)
        assert torch.allclose(model(ids, modality_inputs=inputs)[0].logits, ref, atol=1e-6)
    model.set_input_tensor({"images": img})
    for bad, match in [([embeds, embeds], "expected a list of one tensor"), ({"video": img}, "unknown module 'video'"),
                       (embeds[0], r"input_tensor\['language_model'\]: expected a tensor \(B, S, H\) with H=32"),
                       ({"audio": torch.zeros(2, 5)}, r"input_tensor\['audio'\]: expected a tensor \(N, H\)"),
                       ("x", "got str")]:
        with pytest.raises(ValueError, match=match):
            model.set_input_tensor(bad)
    assert list(model._input_tensors) == ["images"]  # a refused input leaves the previous one in place


def test_save_and_from_pretrained_keep_the_composition_and_the_logits(tmp_path):
    import plait
    from transformers import AutoConfig, AutoModel

    cfg = dict(CLIP)
    AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(tmp_path / "clip")
    model = _model(images={"clip": {"kind": "transformers", "pretrained": str(tmp_path / "clip")}})
    model.save_pretrained(tmp_path / "mimo")
    (tmp_path / "clip" / "model.safetensors").unlink()  # the saved model needs nothing outside its own dir
    again = plait.from_pretrained(tmp_path / "mimo")
    assert isinstance(again, MimoModel) and again.config.modalities["images"]["clip"].pretrained is None
    ids = torch.tensor([[1] + [IMG] * 5 + [2]])
    inputs = {"images": {"clip": {"pixel_values": torch.randn(1, 3, 16, 16)}}}
    with torch.no_grad():
        assert torch.equal(again.eval()(ids, modality_inputs=inputs)[0].logits, model(ids, modality_inputs=inputs)[0].logits)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "mimo" / "model.safetensors")
    weights.pop("projections.images.clip.0.weight")
    save_file(weights, tmp_path / "mimo" / "model.safetensors")
    with pytest.raises(ValueError, match="weights do not fit the saved composition"):
        plait.from_pretrained(tmp_path / "mimo")
