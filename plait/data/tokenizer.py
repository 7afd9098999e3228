"""Tokenizers trained with the `tokenizers` library and wrapped for `transformers`.

A trained tokenizer is a `PreTrainedTokenizerFast`, so `save_pretrained(dir)` writes the standard
tokenizer.json + tokenizer_config.json and `AutoTokenizer.from_pretrained(dir)` loads it back anywhere.
The special tokens always take ids 0..6 in `SPECIAL_TOKENS` order, so configs can rely on them.

No post-processor is set: `tok(text)` adds no <bos>/<eos>; whoever builds training sequences adds them
explicitly (that is where the layout of text and image tokens is decided).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# role -> token text; the order fixes the ids (pad = 0, ..., audio = 6).
SPECIAL_TOKENS = {
    "pad": "<pad>",
    "bos": "<bos>",
    "eos": "<eos>",
    "unk": "<unk>",
    "image": "<image>",
    "video": "<video>",
    "audio": "<audio>",
}
KINDS = ("wordlevel", "bpe")


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    # image/video/audio become named extra special tokens: they are never split, decode drops them with
    # skip_special_tokens, and tok.image_token / tok.image_token_id survive save_pretrained.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens={f"{role}_token": SPECIAL_TOKENS[role] for role in ("image", "video", "audio")},
    )


def train_tokenizer(
    texts: Iterable[str], kind: str = "wordlevel", vocab_size: int = 1000, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts`.

    - `wordlevel`: lowercased words and punctuation marks, one id each (unknown words -> <unk>). Exact
      and tiny for the bundled caption sets; decode joins words with single spaces.
    - `bpe`: byte-level BPE with `vocab_size` entries; covers any text, no <unk> needed.
    Training is deterministic: the same texts give the same tokenizer.json.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    limits = (("vocab_size", vocab_size, len(SPECIAL_TOKENS) + 1), ("min_frequency", min_frequency, 1))
    for arg, value, minimum in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{arg}: expected an int >= {minimum}, got {value!r}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}]: expected str, got {type(text).__name__}")
    if not any(text.strip() for text in texts):
        raise ValueError(f"texts: expected at least one non-empty text, got {len(texts)} empty ones")

    special = list(SPECIAL_TOKENS.values())
    if kind == "wordlevel":
        tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk"]))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
        )
        # Without a decoder, decode joins tokens with single spaces: exactly a caption's text.
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special, show_progress=False
        )
    else:
        tokenizer = Tokenizer(models.BPE())
        # No prefix space: decode(encode(text)) == text, byte for byte.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)


def special_token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """role -> id for every token in `SPECIAL_TOKENS` (pad, bos, eos, unk, image, video, audio)."""
    vocab = tok.get_vocab()
    missing = [token for token in SPECIAL_TOKENS.values() if token not in vocab]
    if missing:
        raise ValueError(f"tok: expected the special tokens {list(SPECIAL_TOKENS.values())}, missing {missing}")
    return {role: vocab[token] for role, token in SPECIAL_TOKENS.items()}


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a plait tokenizer from a directory holding tokenizer.json (or from the file itself).

    The special-token roles are re-applied from `SPECIAL_TOKENS`, so a bare tokenizer.json (without
    tokenizer_config.json) loads the same as a full `save_pretrained` directory.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"path: expected a tokenizer.json file or a directory holding one, got {str(path)!r}")
    try:
        tokenizer = Tokenizer.from_str(file.read_text())
    except Exception as e:  # bad JSON or a schema `tokenizers` rejects
        raise ValueError(f"path: {str(file)!r} is not a valid tokenizer.json ({type(e).__name__}: {e})") from e
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = [token for token in SPECIAL_TOKENS.values() if token not in vocab]
    if missing:
        raise ValueError(f"path: {str(file)!r} lacks the special tokens {missing}")
    return _wrap(tokenizer)
