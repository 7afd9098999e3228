import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from plait.data.shapes import generate_shapes
from plait.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids, train_tokenizer

EXPECTED_IDS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "image": 4, "video": 5, "audio": 6}


@pytest.fixture(scope="module")
def captions():
    data = generate_shapes("shapes-pair", 60, 10, 0, image_size=24, seed=0)
    return data["train"].captions, data["val"].captions


@pytest.fixture(scope="module")
def wordlevel(captions):
    return train_tokenizer(captions[0])


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_special_tokens_take_ids_0_to_6(kind, captions):
    tok = train_tokenizer(captions[0], kind=kind, vocab_size=300)
    assert special_token_ids(tok) == EXPECTED_IDS
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(["<image>", "<video>", "<audio>"]) == [4, 5, 6]


def test_wordlevel_vocabulary_is_the_caption_words(wordlevel, captions):
    words = {w for c in captions[0] for w in c.split()}
    assert len(wordlevel) == len(SPECIAL_TOKENS) + len(words)
    assert set(wordlevel.get_vocab()) == words | set(SPECIAL_TOKENS.values())


def test_wordlevel_decode_gives_back_the_caption(wordlevel, captions):
    for caption in captions[1]:
        ids = wordlevel("<bos>" + caption + "<eos>")["input_ids"]
        assert ids[0] == 1 and ids[-1] == 2
        assert len(ids) == len(caption.split()) + 2  # one id per word
        assert wordlevel.decode(ids, skip_special_tokens=True) == caption


def test_no_automatic_bos_eos(wordlevel):
    ids = wordlevel("a small red circle")["input_ids"]
    assert len(ids) == 4 and not {0, 1, 2} & set(ids)


def test_wordlevel_lowercases_splits_punctuation_and_maps_unknown_words(wordlevel):
    assert wordlevel("A SMALL Red")["input_ids"] == wordlevel("a small red")["input_ids"]
    assert wordlevel("a small, red")["input_ids"] == wordlevel("a small <unk> red")["input_ids"]
    assert wordlevel("a zebra")["input_ids"][1] == 3


def test_image_token_is_never_split(wordlevel):
    ids = wordlevel("<image><image>a small")["input_ids"]
    assert ids[:2] == [4, 4] and len(ids) == 4
    assert wordlevel.image_token == "<image>" and wordlevel.image_token_id == 4


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_save_and_load_give_identical_ids(kind, captions, tmp_path):
    tok = train_tokenizer(captions[0], kind=kind, vocab_size=300)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    texts = ["<bos>" + c + "<eos>" for c in captions[1]] + ["<image> <video> <audio> a small zebra"]
    expected = tok(texts)["input_ids"]
    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path),
        PreTrainedTokenizerFast.from_pretrained(tmp_path),
        load_tokenizer(tmp_path),
        load_tokenizer(tmp_path / "tokenizer.json"),
    ):
        assert loaded(texts)["input_ids"] == expected
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
        assert special_token_ids(loaded) == EXPECTED_IDS
        for caption, ids in zip(captions[1], expected):
            assert loaded.decode(ids, skip_special_tokens=True) == caption


def test_bpe_round_trips_arbitrary_text(captions):
    tok = train_tokenizer(captions[0], kind="bpe", vocab_size=300)
    assert len(tok) <= 300
    text = "Hello, Wörld! 3.5 × naïve  spaces\tand\nnewlines 🙂"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.unk_token_id not in tok(text)["input_ids"]
    # Merges were learnt: a caption takes fewer tokens than bytes.
    assert len(tok(captions[1][0])["input_ids"]) < len(captions[1][0]) / 2


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_training_is_deterministic(kind, captions):
    a = train_tokenizer(captions[0], kind=kind, vocab_size=300)
    b = train_tokenizer(list(captions[0]), kind=kind, vocab_size=300)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_min_frequency_drops_rare_words():
    tok = train_tokenizer(["a a b"], min_frequency=2)
    assert "a" in tok.get_vocab() and "b" not in tok.get_vocab()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(texts=[]), "texts"),
        (dict(texts=["", "  "]), "texts"),
        (dict(texts=["ok", 3]), r"texts\[1\]"),
        (dict(texts=["ok"], kind="unigram"), "kind"),
        (dict(texts=["ok"], vocab_size=5), "vocab_size"),
        (dict(texts=["ok"], min_frequency=0), "min_frequency"),
    ],
)
def test_train_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_tokenizer(**kwargs)


def test_load_tokenizer_errors(tmp_path, wordlevel):
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory without one

    wordlevel.save_pretrained(tmp_path / "corrupt")
    file = tmp_path / "corrupt" / "tokenizer.json"
    file.write_text(file.read_text()[:100])
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "corrupt")

    # A valid tokenizer.json that is not a plait one: no special tokens.
    bare = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    bare.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "bare").mkdir()
    bare.save(str(tmp_path / "bare" / "tokenizer.json"))
    json.loads((tmp_path / "bare" / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="lacks the special tokens"):
        load_tokenizer(tmp_path / "bare")
