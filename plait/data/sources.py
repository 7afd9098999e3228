"""The run's data: bundled synthetic sets (generated once, cached) or the user's own local files."""

from __future__ import annotations

from plait.config import AudioDataSettings, DataSettings
from plait.data.types import AudioSplit, CaptionSplit

SPLITS = ("train", "val", "test")


def load_splits(settings: DataSettings) -> dict[str, CaptionSplit]:
    if settings.dataset == "local":
        from plait.data.local import load_local_captions

        splits = load_local_captions(
            settings.path, image_size=settings.image_size, image_column=settings.image_column,
            caption_column=settings.caption_column, val_fraction=settings.val_fraction,
            test_fraction=settings.test_fraction, seed=settings.seed,
        )
    else:
        from plait.data.shapes import load_or_generate_shapes

        splits = load_or_generate_shapes(
            settings.dataset, settings.num_train, settings.num_val, settings.num_test,
            image_size=settings.image_size, seed=settings.seed, cache_dir=settings.cache_dir,
        )
    for name in SPLITS:
        if name not in splits or len(splits[name]) == 0:
            raise ValueError(f"data: the {name!r} split of {settings.dataset!r} is empty")
    return splits


def load_audio_splits(settings: AudioDataSettings) -> dict[str, AudioSplit]:
    """The bundled tones-and-chords set as model-ready features; generated in memory (a few seconds), not cached."""
    from plait.data.audio import audio_features, generate_audio

    clips = generate_audio(settings.num_train, settings.num_val, settings.num_test, seed=settings.seed)
    return {name: AudioSplit(audio_features(waves, settings.n_mels, settings.hop_length), captions)
            for name, (waves, captions) in clips.items()}
