"""The bundled synthetic audio set: tones and chords of known pitch, length and loudness, with captions.

    "a loud short high tone", "a quiet long low chord"

Each clip lasts `CLIP_SECONDS` at `SAMPLE_RATE` Hz: a sine tone (or a major triad) on a random detuned
note of its pitch band, with a random phase, a short fade in and out, and faint noise; silence after
it. Splits are disjoint (a clip's samples are hashed) and deterministic by seed. Features are log-mel
spectrograms computed with torch alone (`torch.stft`; the mel filter bank is transformers' `mel_filter_bank`),
so no audio library is needed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SAMPLE_RATE = 8000
CLIP_SECONDS = 1.0
KINDS = ("tone", "chord")
PITCHES = ("low", "middle", "high")
LENGTHS = ("short", "long")
LOUDNESS = ("quiet", "loud")
# Pitch bands as base frequencies (Hz) around which notes are drawn, and what the other attributes mean.
PITCH_HZ = {"low": 196.0, "middle": 440.0, "high": 988.0}
LENGTH_S = {"short": 0.25, "long": 0.75}
AMPLITUDE = {"quiet": 0.15, "loud": 0.7}
MAJOR_TRIAD = (1.0, 2 ** (4 / 12), 2 ** (7 / 12))


@dataclass(frozen=True)
class Sound:
    kind: str
    pitch: str
    length: str
    loudness: str


def caption_for(sound: Sound) -> str:
    return f"a {sound.loudness} {sound.length} {sound.pitch} {sound.kind}"


_CAPTION = re.compile(rf"^a ({'|'.join(LOUDNESS)}) ({'|'.join(LENGTHS)}) ({'|'.join(PITCHES)}) ({'|'.join(KINDS)})$")


def parse_caption(text: str) -> Sound | None:
    m = _CAPTION.match(text.strip())
    return Sound(m.group(4), m.group(3), m.group(2), m.group(1)) if m else None


def synthesize(sound: Sound, rng: np.random.Generator) -> np.ndarray:
    """One clip, float32 samples in [-1, 1], CLIP_SECONDS long."""
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    on = int(SAMPLE_RATE * LENGTH_S[sound.length])
    t = np.arange(on) / SAMPLE_RATE
    base = PITCH_HZ[sound.pitch] * 2 ** (rng.uniform(-2, 2) / 12)  # up to two semitones of detune
    ratios = MAJOR_TRIAD if sound.kind == "chord" else (1.0,)
    wave = sum(np.sin(2 * np.pi * base * r * t + rng.uniform(0, 2 * np.pi)) for r in ratios) / len(ratios)
    fade = min(int(0.01 * SAMPLE_RATE), on // 4)
    envelope = np.ones(on)
    envelope[:fade] = np.linspace(0, 1, fade)
    envelope[on - fade :] = np.linspace(1, 0, fade)
    clip = np.zeros(n)
    start = int(rng.integers(0, n - on + 1))
    clip[start : start + on] = AMPLITUDE[sound.loudness] * envelope * wave
    clip += rng.normal(0, 0.005, n)
    return np.clip(clip, -1, 1).astype(np.float32)


def generate_audio(num_train: int, num_val: int, num_test: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{split: (waveforms (N, samples) float32, captions)}; attributes balanced, clips never repeated across splits."""
    for name, count in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if count < 1:
            raise ValueError(f"{name}: expected a positive count, got {count}")
    rng = np.random.default_rng(seed)
    combos = [Sound(k, p, ln, ld) for k in KINDS for p in PITCHES for ln in LENGTHS for ld in LOUDNESS]
    seen: set[bytes] = set()
    out = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-count // len(combos)))])[:count]
        waves, captions = [], []
        for i in order:
            while True:
                clip = synthesize(combos[i], rng)
                key = hashlib.sha1(clip.tobytes()).digest()
                if key not in seen:
                    seen.add(key)
                    break
            waves.append(clip)
            captions.append(caption_for(combos[i]))
        out[split] = (torch.from_numpy(np.stack(waves)), captions)
    return out


def log_mel(waveforms: torch.Tensor, n_fft: int = 256, hop_length: int = 128, n_mels: int = 32) -> torch.Tensor:
    """(N, samples) -> (N, frames, n_mels) log-mel features (natural log of power, floored at 1e-10)."""
    from transformers.audio_utils import mel_filter_bank

    if waveforms.ndim != 2:
        raise ValueError(f"waveforms: expected (N, samples), got shape {list(waveforms.shape)}")
    window = torch.hann_window(n_fft, device=waveforms.device)
    spec = torch.stft(waveforms.float(), n_fft, hop_length, window=window, return_complex=True)  # (N, F, T)
    power = spec.abs().pow(2)
    mel = torch.from_numpy(mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels,
                                           min_frequency=0.0, max_frequency=SAMPLE_RATE / 2,
                                           sampling_rate=SAMPLE_RATE)).float().to(waveforms.device)  # (F, n_mels)
    return torch.log(torch.clamp(power.transpose(1, 2) @ mel, min=1e-10))


def score_audio_captions(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match and per-attribute accuracy (kind, pitch, length, loudness); unparsable predictions score 0."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"predictions: expected {len(references)} (>0) captions, got {len(predictions)}")
    totals = {"exact_match": 0, "kind": 0, "pitch": 0, "length": 0, "loudness": 0}
    for pred, ref in zip(predictions, references):
        p, r = parse_caption(pred), parse_caption(ref)
        if r is None:
            raise ValueError(f"references: {ref!r} is not an audio caption")
        totals["exact_match"] += pred.strip() == ref
        if p is not None:
            for attr in ("kind", "pitch", "length", "loudness"):
                totals[attr] += getattr(p, attr) == getattr(r, attr)
    return {k: v / len(references) for k, v in totals.items()}


def audio_features(waveforms: torch.Tensor, n_mels: int, hop_length: int, n_fft: int = 256) -> torch.Tensor:
    """The model's input features: log-mel (N, frames, n_mels), shifted and scaled to about unit range the way
    Whisper scales its own log-mels ((x + 4) / 4), so encoders start from well-conditioned inputs."""
    return (log_mel(waveforms, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels) + 4.0) / 4.0
