"""Vocabulary: building, encoding/decoding, JSON round trip, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raycap.data.vocab import END, PAD, START, UNK, Vocab, tokenize

CAPTIONS = ["A red circle.", "a red square", "A blue circle!", "a red circle", "a green triangle"]


def test_tokenize_lowercases_and_drops_punctuation() -> None:
    assert tokenize("A Man's dog, running!") == ["a", "man's", "dog", "running"]


def test_specials_have_fixed_ids() -> None:
    vocab = Vocab(["a", "b"])
    assert vocab.itos[:4] == [PAD, START, END, UNK]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert len(vocab) == 6
    assert vocab.stoi["b"] == 5


def test_build_keeps_words_at_min_freq_ordered_by_count_then_alphabet() -> None:
    vocab = Vocab.build(CAPTIONS, min_freq=2)
    # a: 5, red: 3, circle: 3 (tie -> alphabetical); blue/green/square/triangle: 1 -> dropped
    assert vocab.itos[4:] == ["a", "circle", "red"]
    assert Vocab.build(CAPTIONS, min_freq=1).itos[4:] == [
        "a", "circle", "red", "blue", "green", "square", "triangle"
    ]


def test_vocab_round_trip_encode_decode() -> None:
    vocab = Vocab.build(CAPTIONS, min_freq=1, max_len=8)
    ids = vocab.encode("A red circle.")
    assert ids[0] == vocab.start_id
    assert vocab.decode(ids) == "a red circle"


def test_unknown_words_become_unk_and_decode_as_unk() -> None:
    vocab = Vocab.build(CAPTIONS, min_freq=2)
    ids = vocab.encode("a purple circle")
    assert ids[1:5] == [vocab.stoi["a"], vocab.unk_id, vocab.stoi["circle"], vocab.end_id]
    assert vocab.decode(ids) == f"a {UNK} circle"


def test_encode_truncates_and_pads_to_max_len_plus_two() -> None:
    vocab = Vocab(["a", "b"], max_len=3)
    long = vocab.encode("a b a b a b")
    assert long == [1, 4, 5, 4, 2]
    short = vocab.encode("b")
    assert short == [1, 5, 2, 0, 0]
    assert len(vocab.encode("")) == 5


def test_encode_batch_is_int32_matrix() -> None:
    vocab = Vocab(["a", "b"], max_len=4)
    batch = vocab.encode_batch(["a", "b a b a b a", ""])
    assert batch.shape == (3, 6) and batch.dtype == np.int32
    assert batch[1].tolist() == vocab.encode("b a b a b a")


def test_decode_stops_at_end_and_skips_start_and_pad() -> None:
    vocab = Vocab(["a", "b"])
    assert vocab.decode(np.array([1, 4, 0, 5, 2, 4, 4])) == "a b"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([1, 99])


def test_save_load_json_round_trip(tmp_path) -> None:
    vocab = Vocab.build(CAPTIONS, min_freq=1, max_len=7)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocab.load(path)
    assert loaded == vocab
    assert loaded.max_len == 7
    assert loaded.encode("a blue triangle") == vocab.encode("a blue triangle")
    assert Vocab.from_json(vocab.to_json()) == vocab


def test_from_json_says_what_is_missing(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"missing \['max_len'\]"):
        Vocab.from_json(json.dumps({"words": ["a"]}))
    with pytest.raises(ValueError, match="not valid JSON"):
        Vocab.from_json("{words")
    with pytest.raises(ValueError, match="list of strings"):
        Vocab.from_json(json.dumps({"words": [1, 2], "max_len": 5}))
    path = tmp_path / "bad.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="bad.json"):
        Vocab.load(path)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        Vocab.load(tmp_path / "nowhere.json")


def test_rejects_duplicate_or_special_words() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(["a", "a"])
    with pytest.raises(ValueError, match="special"):
        Vocab(["a", PAD])


def test_tokenize_keeps_accented_and_other_script_words_whole() -> None:
    assert tokenize("Un chat sur la table — très joli 猫") == ["un", "chat", "sur", "la", "table", "très", "joli", "猫"]
    assert tokenize("Привет, МИР") == ["привет", "мир"]
    assert tokenize("बिल्ली मेज़ पर") == ["बिल्ली", "मेज़", "पर"]  # vowel signs are combining marks


def test_tokenize_normalises_unicode_forms_and_apostrophes() -> None:
    assert tokenize("cafe\u0301 CAFÉ café") == ["café"] * 3  # decomposed, upper and composed agree
    assert tokenize("Ｆｕｌｌ ｗｉｄｔｈ") == ["full", "width"]
    assert tokenize("the man’s hat") == tokenize("the man's hat") == ["the", "man's", "hat"]


def test_tokenize_splits_cjk_ideographs_and_drops_symbols() -> None:
    assert tokenize("黑猫在桌子上") == ["黑", "猫", "在", "桌", "子", "上"]
    assert tokenize("🐱 a cat 🎉 — «ok»") == ["a", "cat", "ok"]


def test_non_ascii_captions_round_trip_through_the_vocabulary() -> None:
    captions = ["Un chat sur la table — très joli 猫", "un chat noir"]
    vocab = Vocab.build(captions, min_freq=1)
    assert {"très", "猫", "chat"} <= set(vocab.itos)
    ids = vocab.encode(captions[0])
    assert vocab.unk_id not in ids
    assert vocab.decode(ids) == "un chat sur la table très joli 猫"
    assert Vocab.from_json(vocab.to_json()) == vocab
