"""Tokenization (the COCO toolkit's, hand-checked against its Java tokenizer), the vocabulary:
building, encoding/decoding, JSON round trip, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raycap.data.synthetic import sample_scene
from raycap.data.vocab import END, PAD, START, UNK, Vocab, detokenize, tokenize

CAPTIONS = ["A red circle.", "a red square", "A blue circle!", "a red circle", "a green triangle"]

# Captions and the tokens the COCO toolkit's Java PTBTokenizer gives them (checked with pycocoevalcap).
TOOLKIT_TOKENS = {
    "A man in a red T-shirt on a snow-covered hill.": "a man in a red t-shirt on a snow-covered hill",
    "The dog's frisbee; it's the cats' toy.": "the dog 's frisbee it 's the cats toy",
    "I don't think he can't, won't or isn't.": "i do n't think he ca n't wo n't or is n't",
    "At 3:30 pm, 1,000 people paid $2.50 for 2.5 lbs (10%).":
        "at 3:30 pm 1,000 people paid $ 2.50 for 2.5 lbs -lrb- 10 % -rrb-",
    "A 10-year-old boy & Mr. Smith in the U.S. at 5 p.m.": "a 10-year-old boy & mr. smith in the u.s. at 5 p.m.",
    "A sign that says \"STOP\" -- or 'stop'... [sic] {x}":
        "a sign that says stop or stop -lsb- sic -rsb- -lcb- x -rcb-",
    "gonna wanna cannot gotta": "gon na wan na can not got ta",
    "Rock 'n' roll at 10 o'clock, ma'am, in the '90s": "rock 'n' roll at 10 o'clock ma'am in the '90s",
    "black/white and/or w/ 24/7 3 1/2 cups": "black/white and/or w / 24/7 3\u00a01/2 cups",
    "  Extra   spaces\tand TABS  ": "extra spaces and tabs",
    "AT&T B&W c++ e-mail: a@b.com www.x.com": "at&t b&w c++ e-mail a@b.com www.x.com",
}


@pytest.mark.parametrize("caption", TOOLKIT_TOKENS)
def test_tokenize_gives_the_coco_toolkits_tokens(caption: str) -> None:
    assert " ".join(tokenize(caption)) == TOOLKIT_TOKENS[caption]


def test_tokenize_keeps_a_sentence_final_period_only_on_abbreviations() -> None:
    assert tokenize("A man on a horse.") == ["a", "man", "on", "a", "horse"]
    assert tokenize("A photo of Mr.") == ["a", "photo", "of", "mr."]
    assert tokenize("Fruit, vegetables, etc.") == ["fruit", "vegetables", "etc."]
    assert tokenize("the letter A.") == ["the", "letter", "a"]  # as before a next caption starting "A ..."


def test_tokenize_of_tokens_gives_the_same_tokens() -> None:
    # Predictions are scored (and written) as space-joined tokens, which the toolkit tokenizes again:
    # that is stable, but for the few rules that need capitals ("AT&T", "US$").
    for caption in TOOLKIT_TOKENS:
        tokens = [token for token in tokenize(caption) if token not in ("at&t", "b&w")]
        assert tokenize(" ".join(tokens)) == tokens
    assert tokenize("at&t") == ["at", "&", "t"]


def test_synthetic_captions_tokenize_as_their_words() -> None:
    rng = np.random.default_rng(0)
    captions = [caption for image_id in range(50) for caption in sample_scene(rng, image_id).captions]
    assert all(tokenize(caption) == caption.lower().removesuffix(".").split() for caption in captions)
    assert tokenize("a small red circle to the left of a large blue square") == [
        "a", "small", "red", "circle", "to", "the", "left", "of", "a", "large", "blue", "square"
    ]


def test_detokenize_joins_tokens_for_people() -> None:
    assert detokenize("a dog 's frisbee -lrb- red -rrb- is n't $ 5".split()) == "a dog's frisbee (red) isn't $5"
    assert detokenize("we ca n't gon na go at 3:30 , 10 %".split()) == "we can't gonna go at 3:30, 10%"
    assert detokenize([]) == ""


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
    vocab = Vocab.build(CAPTIONS, min_freq=1, max_words=8)
    ids = vocab.encode("A red circle.")
    assert ids[0] == vocab.start_id
    assert vocab.decode(ids) == "a red circle"


def test_unknown_words_become_unk_and_decode_as_unk() -> None:
    vocab = Vocab.build(CAPTIONS, min_freq=2)
    ids = vocab.encode("a purple circle")
    assert ids[1:5] == [vocab.stoi["a"], vocab.unk_id, vocab.stoi["circle"], vocab.end_id]
    assert vocab.decode(ids) == f"a {UNK} circle"


def test_encode_truncates_and_pads_to_max_words_plus_two() -> None:
    vocab = Vocab(["a", "b"], max_words=3)
    long = vocab.encode("a b a b a b")
    assert long == [1, 4, 5, 4, 2]
    short = vocab.encode("b")
    assert short == [1, 5, 2, 0, 0]
    assert len(vocab.encode("")) == 5


def test_encode_batch_is_int32_matrix() -> None:
    vocab = Vocab(["a", "b"], max_words=4)
    batch = vocab.encode_batch(["a", "b a b a b a", ""])
    assert batch.shape == (3, 6) and batch.dtype == np.int32
    assert batch[1].tolist() == vocab.encode("b a b a b a")


def test_decode_stops_at_end_and_skips_start_and_pad() -> None:
    vocab = Vocab(["a", "b"])
    assert vocab.decode(np.array([1, 4, 0, 5, 2, 4, 4])) == "a b"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([1, 99])


def test_decode_gives_scored_tokens_and_decode_text_the_caption_for_people() -> None:
    vocab = Vocab.build(["A dog's frisbee (red) isn't here."], min_freq=1)
    ids = vocab.encode("A dog's frisbee (red) isn't here.")
    assert vocab.decode(ids) == "a dog 's frisbee -lrb- red -rrb- is n't here"
    assert vocab.decode_text(ids) == "a dog's frisbee (red) isn't here"
    assert vocab.decode_text([vocab.start_id, vocab.unk_id, vocab.end_id]) == UNK


def test_save_load_json_round_trip(tmp_path) -> None:
    vocab = Vocab.build(CAPTIONS, min_freq=1, max_words=7)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocab.load(path)
    assert loaded == vocab
    assert loaded.max_words == 7 and json.loads(path.read_text())["max_words"] == 7
    assert loaded.encode("a blue triangle") == vocab.encode("a blue triangle")
    assert Vocab.from_json(vocab.to_json()) == vocab


def test_vocab_files_with_the_old_max_len_key_still_load() -> None:
    vocab = Vocab.from_json(json.dumps({"format": "raycap-vocab", "max_len": 9, "words": ["a", "cat"]}))
    assert vocab == Vocab(["a", "cat"], max_words=9)


def test_from_json_says_what_is_missing(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"missing \['max_words'\]"):
        Vocab.from_json(json.dumps({"words": ["a"]}))
    with pytest.raises(ValueError, match="not valid JSON"):
        Vocab.from_json("{words")
    with pytest.raises(ValueError, match="list of strings"):
        Vocab.from_json(json.dumps({"words": [1, 2], "max_words": 5}))
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


def test_tokenize_normalises_unicode_forms_quotes_and_dashes() -> None:
    assert tokenize("cafe\u0301 CAFÉ café") == ["café"] * 3  # decomposed, upper and composed agree
    assert tokenize("Ｆｕｌｌ ｗｉｄｔｈ") == ["full", "width"]
    assert tokenize("the man’s hat") == tokenize("the man's hat") == ["the", "man", "'s", "hat"]
    assert tokenize("“Don’t” — it’s 3½ cups…") == ["do", "n't", "it", "'s", "3", "1/2", "cups"]


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
