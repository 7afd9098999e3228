"""The default stock model under plait's batching: packed rows give the same logits as separate samples."""

import pytest
import torch

from plait.data.collate import collate_packed, collate_padded
from plait.data.dataset import CaptionDataset
from plait.data.images import normalize
from plait.data.tokenizer import special_token_ids, train_tokenizer
from plait.data.types import CaptionSplit
from plait.models.build import build_model
from plait.config import ModelSettings
from plait.models.vlm import vlm_spec


PRESETS = ["tiny-minimax-m3", "tiny-mistral3"]


def tiny_setup(preset, image_size=48):
    captions = ["a small red circle at the top left", "a large blue square in the center",
                "a small green star at the bottom right"]
    tok = train_tokenizer(captions)
    torch.manual_seed(0)
    model = build_model(ModelSettings(preset=preset), len(tok), special_token_ids(tok), image_size).eval()
    images = torch.randint(0, 256, (3, image_size, image_size, 3), dtype=torch.uint8)
    spec = vlm_spec(model.config.model_type)
    ds = CaptionDataset(CaptionSplit(images, captions), tok, spec.image_token_count(model.config, image_size))
    return model, ds, spec


@pytest.mark.parametrize("preset", PRESETS)
def test_image_token_count_matches_model_features(preset):
    model, ds, spec = tiny_setup(preset)
    assert spec.image_token_count(model.config, 48) == 9
    batch = collate_padded([ds[0]], ds.pad_id)
    with torch.no_grad():
        feats = model.get_image_features(**spec.vision_inputs(model.config, normalize(batch["images"])))
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    assert sum(f.shape[0] for f in feats) == 9


@pytest.mark.parametrize("preset", PRESETS)
def test_images_in_one_batch_do_not_see_each_other(preset):
    model, ds, spec = tiny_setup(preset)
    pixels = normalize(ds.images)
    with torch.no_grad():
        together = model.get_image_features(**spec.vision_inputs(model.config, pixels))
        alone = model.get_image_features(**spec.vision_inputs(model.config, pixels[1:2]))
    together = together.pooler_output if hasattr(together, "pooler_output") else together
    alone = alone.pooler_output if hasattr(alone, "pooler_output") else alone
    torch.testing.assert_close(together[1], alone[0], atol=1e-6, rtol=1e-5)


def test_m3_patches_follow_the_merge_block_order():
    """Patch k of merge block (bi, bj) is image patch (bi*m + k // m, bj*m + k % m), channels first."""
    model, _, spec = tiny_setup("tiny-minimax-m3")
    v = model.config.vision_config
    p, m = v.patch_size, v.spatial_merge_size
    pixels = torch.arange(3 * 48 * 48, dtype=torch.float32).reshape(1, 3, 48, 48)
    inputs = spec.vision_inputs(model.config, pixels)
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]]
    patches = inputs["pixel_values"]
    assert patches.shape == (36, 3 * v.temporal_patch_size * p * p)
    blocks_per_row = 6 // m
    for index in (0, 1, 2, 3, 4, 13, 35):
        block, k = divmod(index, m * m)
        row = (block // blocks_per_row) * m + k // m
        col = (block % blocks_per_row) * m + k % m
        expected = pixels[0, :, row * p:(row + 1) * p, col * p:(col + 1) * p].reshape(-1)
        assert torch.equal(patches[index], expected), index


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_logits_equal_separate_logits(preset):
    model, ds, spec = tiny_setup(preset)
    samples = [ds[i] for i in range(3)]
    packed = collate_packed(samples, ds.pad_id, pack_length=80)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False,
                    **spec.vision_inputs(model.config, normalize(packed["images"]))).logits
        start = 0
        for s in samples:
            single = collate_padded([s], ds.pad_id)
            ref = model(input_ids=single["input_ids"], use_cache=False,
                        **spec.vision_inputs(model.config, normalize(single["images"]))).logits
            n = len(s["input_ids"])
            torch.testing.assert_close(out[:, start:start + n], ref, atol=1e-5, rtol=1e-5)
            start += n


def test_m3_preset_image_tokens_start_at_the_text_embeddings_scale():
    """At the reference's std 0.02 the projector's four linears shrink the image tokens to ~1/13 of the text
    embeddings' scale and the default run starts image-blind; the preset's init keeps them comparable."""
    model, ds, spec = tiny_setup("tiny-minimax-m3")
    with torch.no_grad():
        feats = model.get_image_features(**spec.vision_inputs(model.config, normalize(ds.images)))
    feats = torch.cat(list(feats.pooler_output if hasattr(feats, "pooler_output") else feats))
    image_rms = feats.pow(2).mean().sqrt()
    text_rms = model.get_input_embeddings().weight.pow(2).mean().sqrt()
    assert image_rms > 0.5 * text_rms, (image_rms, text_rms)
