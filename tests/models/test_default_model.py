"""The default stock model under plait's batching: packed rows give the same logits as separate samples."""

import torch

from plait.data.collate import collate_packed, collate_padded
from plait.data.dataset import CaptionDataset
from plait.data.images import normalize
from plait.data.tokenizer import special_token_ids, train_tokenizer
from plait.data.types import CaptionSplit
from plait.models.build import build_model
from plait.config import ModelSettings
from plait.models.vlm import vlm_spec


def tiny_setup(image_size=48):
    captions = ["a small red circle at the top left", "a large blue square in the center",
                "a small green star at the bottom right"]
    tok = train_tokenizer(captions)
    torch.manual_seed(0)
    model = build_model(ModelSettings(), len(tok), special_token_ids(tok), image_size).eval()
    images = torch.randint(0, 256, (3, image_size, image_size, 3), dtype=torch.uint8)
    spec = vlm_spec(model.config.model_type)
    ds = CaptionDataset(CaptionSplit(images, captions), tok, spec.image_token_count(model.config, image_size))
    return model, ds, spec


def test_image_token_count_matches_model_features():
    model, ds, spec = tiny_setup()
    assert spec.image_token_count(model.config, 48) == 9
    batch = collate_padded([ds[0]], ds.pad_id)
    with torch.no_grad():
        feats = model.get_image_features(**spec.vision_inputs(model.config, normalize(batch["images"])))
    n = sum(f.shape[0] for f in feats.pooler_output) if hasattr(feats, "pooler_output") else sum(f.shape[0] for f in feats)
    assert n == 9


def test_packed_logits_equal_separate_logits():
    model, ds, spec = tiny_setup()
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
