"""The bundled audio set: deterministic, disjoint, balanced, and its attributes are audible in the features."""

import numpy as np
import pytest
import torch

from plait.data.audio import (
    CLIP_SECONDS,
    PITCH_HZ,
    SAMPLE_RATE,
    Sound,
    caption_for,
    generate_audio,
    log_mel,
    parse_caption,
    score_audio_captions,
    synthesize,
)


def test_generation_is_deterministic_disjoint_and_balanced():
    a = generate_audio(48, 24, 24, seed=3)
    b = generate_audio(48, 24, 24, seed=3)
    for split in a:
        assert torch.equal(a[split][0], b[split][0]) and a[split][1] == b[split][1]
    assert a["train"][0].shape == (48, int(SAMPLE_RATE * CLIP_SECONDS))
    hashes = [{w.numpy().tobytes() for w in a[s][0]} for s in a]
    assert not (hashes[0] & hashes[1]) and not (hashes[0] & hashes[2]) and not (hashes[1] & hashes[2])
    assert len(set(a["train"][1])) == 24  # every attribute combination, twice
    assert not torch.equal(generate_audio(4, 1, 1, seed=4)["train"][0], generate_audio(4, 1, 1, seed=3)["train"][0])


def test_captions_round_trip_and_scoring():
    s = Sound("chord", "high", "short", "loud")
    assert caption_for(s) == "a loud short high chord" and parse_caption(caption_for(s)) == s
    assert parse_caption("a loud short purple chord") is None
    scores = score_audio_captions(["a loud short high chord", "a quiet short high chord", "noise"],
                                  ["a loud short high chord"] * 3)
    assert scores["exact_match"] == pytest.approx(1 / 3) and scores["loudness"] == pytest.approx(1 / 3)
    assert scores["pitch"] == pytest.approx(2 / 3)


def test_the_attributes_are_audible_in_the_log_mel_features():
    rng = np.random.default_rng(0)
    clips = {s: torch.from_numpy(synthesize(Sound(*s), rng)).unsqueeze(0)
             for s in [("tone", "low", "short", "quiet"), ("tone", "high", "long", "loud"), ("chord", "middle", "long", "loud")]}
    feats = {s: log_mel(w)[0] for s, w in clips.items()}  # (frames, mels)
    quiet, loud = feats[("tone", "low", "short", "quiet")], feats[("tone", "high", "long", "loud")]
    active = lambda f: int((f.max(dim=-1).values > f.max() - 6).sum())  # frames within ~6 nats of the peak
    assert active(loud) > 2 * active(quiet)  # long vs short
    assert loud.max() > quiet.max() + 2  # loud vs quiet
    assert quiet.max(dim=0).values.argmax() < loud.max(dim=0).values.argmax()  # low vs high pitch bands
    chord = feats[("chord", "middle", "long", "loud")]
    peaks = lambda f: int((f.max(dim=0).values > f.max() - 3).sum())
    assert peaks(chord) > peaks(loud)  # a triad spreads over more mel bands than one tone
    assert PITCH_HZ["low"] < PITCH_HZ["high"]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="num_val"):
        generate_audio(4, 0, 1)
    with pytest.raises(ValueError, match="waveforms"):
        log_mel(torch.zeros(8000))


def test_a_mixed_caption_set_serves_both_modalities_with_their_placeholders():
    from plait.data.audio import audio_features
    from plait.data.dataset import CaptionDataset, MixedCaptionDataset
    from plait.data.tokenizer import special_token_ids, train_tokenizer
    from plait.data.types import AudioSplit, CaptionSplit

    waves, captions = generate_audio(4, 1, 1)["train"]
    audio = AudioSplit(audio_features(waves, n_mels=16, hop_length=512), captions)
    assert audio.features.shape == (4, 16, 16) and audio.features.abs().max() < 5  # about unit range
    images = CaptionSplit(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), ["a red circle", "a blue square"])
    tok = train_tokenizer(captions + images.captions)
    ids = special_token_ids(tok)
    mixed = MixedCaptionDataset({"images": CaptionDataset(images, tok, 3),
                                 "audio": CaptionDataset(audio, tok, 2, placeholder="audio")})
    assert len(mixed) == 6
    assert mixed[1]["input_ids"][:4].tolist() == [ids["bos"], ids["image"], ids["image"], ids["image"]]
    assert mixed[2]["input_ids"][:4].tolist() == [ids["bos"], ids["audio"], ids["audio"], tok("a")["input_ids"][0]]
    assert torch.equal(mixed[5]["audio"], audio.features[3]) and "image" not in mixed[5]
    with pytest.raises(IndexError):
        mixed[6]
    with pytest.raises(ValueError, match="placeholder: expected one of"):
        CaptionDataset(audio, tok, 2, placeholder="video")
    with pytest.raises(ValueError, match="captions: expected one caption per clip"):
        AudioSplit(audio.features, captions[:2])
