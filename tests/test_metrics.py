"""BLEU, ROUGE-L and CIDEr-D against hand-worked values (the COCO toolkit's conventions) and an
independent CIDEr-D. Parity with the toolkit's Java tokenizer: tests/test_metrics_parity.py."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from raycap.metrics import official_scores, per_image_scores, score_captions

# nltk's corpus_bleu docstring example: long hypotheses, so the toolkit's BLEU-4 is nltk's 0.5920778868801042.
NLTK_REFS = {
    1: [
        "It is a guide to action that ensures that the military will forever heed Party commands",
        "It is the guiding principle which guarantees the military forces always being under the command of the Party",
        "It is the practical guide for the army always to heed the directions of the party",
    ],
    2: ["he was interested in world history because he read the book"],
}
NLTK_HYPS = {
    1: "It is a guide to action which ensures that the military always obeys the commands of the party",
    2: "he read the book because he was interested in world history",
}

CORPUS_REFS = {
    "horse": ["a man riding a horse on a beach", "a person rides a brown horse", "a man on a horse near the sea"],
    "cats": ["two cats sleeping on a red sofa", "a pair of cats asleep on the couch"],
    "pizza": ["a pizza with cheese on a table", "a cheese pizza sitting on a wooden table", "pizza on a plate"],
    "dog": ["a dog running on the grass", "a brown dog runs across a field"],
}
CORPUS_HYPS = {
    "horse": "a man riding a horse on the beach",
    "cats": "two cats on a a a sofa",
    "pizza": "a pizza on a table",
    "dog": "a cat sitting on a sofa",
}
METRICS = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d"]


def _bleu(refs: dict, hyps: dict) -> list[float]:
    scores = score_captions(refs, hyps)
    return [scores[f"bleu{n}"] for n in range(1, 5)]


def _cider_d(refs: dict, hyps: dict) -> float:
    return score_captions(refs, hyps)["cider_d"]


def _reference_cider_d(refs: dict[str, list[str]], hyps: dict[str, str], n: int = 4, sigma: float = 6) -> float:
    """CIDEr-D written from the paper's formulas, with raw n-gram counts as tf as coco-caption uses."""

    def grams(text: str, k: int) -> Counter:
        words = text.split()
        return Counter(tuple(words[i : i + k]) for i in range(len(words) - k + 1))

    def tfidf(text: str, k: int) -> dict[tuple[str, ...], float]:
        return {g: c * math.log(len(refs) / max(1, df[g])) for g, c in grams(text, k).items()}

    def norm(vec: dict) -> float:
        return math.sqrt(sum(x * x for x in vec.values()))

    df = Counter()
    for image_refs in refs.values():
        df.update({g for ref in image_refs for k in range(1, n + 1) for g in grams(ref, k)})
    per_image = []
    for image_id, hyp in hyps.items():
        total = 0.0
        for ref in refs[image_id]:
            penalty = math.exp(-((len(hyp.split()) - len(ref.split())) ** 2) / (2 * sigma**2))
            for k in range(1, n + 1):
                h, r = tfidf(hyp, k), tfidf(ref, k)
                if norm(h) and norm(r):
                    clipped = sum(min(x, r.get(g, 0.0)) * r.get(g, 0.0) for g, x in h.items())
                    total += penalty * clipped / (norm(h) * norm(r))
        per_image.append(10 * total / (n * len(refs[image_id])))
    return sum(per_image) / len(per_image)


def test_bleu_nltk_docstring_example() -> None:
    # Clipped matches / candidate n-grams over both hypotheses (18 and 11 tokens); BP = 1 since
    # the closest reference lengths are 18 and 11.
    p = [28 / 29, 19 / 27, 13 / 25, 8 / 23]
    scores = _bleu(NLTK_REFS, NLTK_HYPS)
    assert scores == pytest.approx([math.prod(p[:n]) ** (1 / n) for n in range(1, 5)], rel=1e-8)
    assert scores[3] == pytest.approx(0.5920778868801042, rel=1e-8)


def test_bleu_clips_counts_and_a_short_hypothesis_adds_no_longer_ngrams() -> None:
    refs = {1: ["a cat sits on the mat", "there is a cat on the mat"], 2: ["the dog ran"]}
    hyps = {1: "a cat on the mat", 2: "the the dog"}
    # Image 1 matches all its n-grams (5, 4, 3, 2); image 2: "the" clipped to 1 of 2, "the dog" only,
    # and, 3 words long, no 4-gram at all (the toolkit's count; nltk would add one unmatched 4-gram).
    p = [7 / 8, 5 / 6, 3 / 4, 2 / 2]
    brevity = math.exp(1 - (6 + 3) / (5 + 3))  # closest reference lengths 6 and 3
    assert _bleu(refs, hyps) == pytest.approx([brevity * math.prod(p[:n]) ** (1 / n) for n in range(1, 5)], rel=1e-8)


def test_bleu_is_unsmoothed() -> None:
    # 3-grams match, no 4-gram does: COCO's unsmoothed BLEU-4 collapses to ~1e-4 (the toolkit's
    # 1e-15 floor on a precision, to the power 1/4).
    scores = _bleu({1: ["a dog runs on grass"], 2: ["two cats sleep"]}, {1: "a dog runs fast", 2: "two cats sleep"})
    assert scores[2] > 0.5
    assert scores[3] < 1e-3


def test_perfect_match_scores_one() -> None:
    refs = {1: ["a man riding a horse", "someone on a horse"], 2: ["two cats on a sofa"]}
    hyps = {1: "a man riding a horse", 2: "two cats on a sofa"}
    scores = score_captions(refs, hyps)
    assert [scores[m] for m in METRICS[:5]] == pytest.approx([1.0] * 5)


def test_scores_use_the_toolkit_tokens() -> None:
    # Case and the toolkit's punctuation do not count; hyphenated words and clitics are its tokens.
    refs = {1: ["A man, riding a HORSE."], 2: ["Two cats -- on a sofa!"], 3: ["A boy in a t-shirt. It's red"]}
    hyps = {1: "a Man riding a horse", 2: "two cats on the sofa .", 3: "a boy in a t-shirt , it 's red"}
    clean_refs = {1: ["a man riding a horse"], 2: ["two cats on a sofa"], 3: ["a boy in a t-shirt it 's red"]}
    clean_hyps = {1: "a man riding a horse", 2: "two cats on the sofa", 3: "a boy in a t-shirt it 's red"}
    assert score_captions(refs, hyps) == score_captions(clean_refs, clean_hyps)
    split = {**clean_hyps, 3: "a boy in a t shirt its red"}
    assert score_captions(clean_refs, split)["bleu1"] < score_captions(clean_refs, clean_hyps)["bleu1"]


def test_rouge_l_hand_worked() -> None:
    # LCS("a cat on the mat", "a cat sits on the mat") = 5: precision 5/5, recall 5/6, F with beta 1.2;
    # the better of the two references counts (the toolkit takes the max precision and recall).
    refs = {1: ["a cat sits on the mat", "a dog"], 2: ["two birds"]}
    precision, recall, beta2 = 1.0, 5 / 6, 1.2**2
    image1 = (1 + beta2) * precision * recall / (recall + beta2 * precision)
    assert score_captions(refs, {1: "a cat on the mat", 2: "two birds"})["rouge_l"] == pytest.approx((image1 + 1) / 2)


def test_cider_d_hand_worked_idf_and_scale() -> None:
    # "a" is in both images' references: idf log(2/2) = 0. "a dog" shares nothing else with "a cat"
    # (0); "a bird" matches in 1- and 2-grams (cosine 1) but has no 3-/4-grams: 10 * (1+1+0+0)/4.
    refs = {1: ["a cat"], 2: ["a bird"]}
    assert _cider_d(refs, {1: "a dog", 2: "a bird"}) == pytest.approx((0 + 5) / 2)


def test_cider_d_hand_worked_clipping_and_length_penalty() -> None:
    # "dog dog" vs "dog": clipped unigram term min(2w, w) * w / (2w * w) = 1/2, no shared bigram,
    # one word longer -> gaussian penalty exp(-1 / (2 * 6**2)); "a cat" matches itself: 5.
    refs = {1: ["dog"], 2: ["a cat"]}
    image1 = 10 * (0.5 * math.exp(-1 / 72)) / 4
    assert _cider_d(refs, {1: "dog dog", 2: "a cat"}) == pytest.approx((image1 + 5) / 2, rel=1e-12)


def test_cider_d_exact_single_reference_scores_ten() -> None:
    refs = {1: ["a man rides a horse"], 2: ["two cats sleep on the sofa"]}
    assert _cider_d(refs, {1: refs[1][0], 2: refs[2][0]}) == pytest.approx(10.0)


def test_cider_d_matches_independent_implementation() -> None:
    assert _cider_d(CORPUS_REFS, CORPUS_HYPS) == pytest.approx(_reference_cider_d(CORPUS_REFS, CORPUS_HYPS), rel=1e-9)


def test_cider_d_ranks_matching_captions_above_unrelated() -> None:
    matching = {image_id: refs[0] for image_id, refs in CORPUS_REFS.items()}
    unrelated = dict(zip(CORPUS_REFS, ["a red bus", "a plate of food", "a man surfing", "a kitchen sink"]))
    assert 0 < _cider_d(CORPUS_REFS, matching) < 10
    assert _cider_d(CORPUS_REFS, matching) > _cider_d(CORPUS_REFS, unrelated) >= 0


def test_cider_d_single_image_is_zero() -> None:
    # idf = log(N / df) = log(1 / 1) for every reference n-gram: coco-caption's CIDEr-D needs N > 1.
    assert _cider_d({1: ["a man rides a horse"]}, {1: "a man rides a horse"}) == 0.0


def test_references_of_unscored_images_are_ignored() -> None:
    extra = {**CORPUS_REFS, "bus": ["a red bus on a street", "a double decker bus"]}
    assert score_captions(extra, CORPUS_HYPS) == score_captions(CORPUS_REFS, CORPUS_HYPS)


def test_empty_hypothesis_adds_no_ngrams() -> None:
    with_empty = {**CORPUS_HYPS, "dog": ""}
    with_unrelated = {**CORPUS_HYPS, "dog": "zebra"}
    assert _cider_d(CORPUS_REFS, with_empty) == pytest.approx(_cider_d(CORPUS_REFS, with_unrelated))
    assert score_captions(CORPUS_REFS, with_empty)["rouge_l"] == pytest.approx(
        score_captions(CORPUS_REFS, with_unrelated)["rouge_l"]
    )
    # No n-grams from the empty caption: BLEU-1's precision rises, only the brevity penalty grows.
    assert _bleu(CORPUS_REFS, with_empty)[0] < _bleu(CORPUS_REFS, CORPUS_HYPS)[0]
    all_empty = dict.fromkeys(CORPUS_HYPS, " . ")
    assert score_captions(CORPUS_REFS, all_empty) == dict.fromkeys(METRICS, 0.0)


def test_score_captions_reports_bleu_rouge_and_cider_d() -> None:
    scores = score_captions(NLTK_REFS, NLTK_HYPS)
    assert sorted(scores) == sorted(METRICS)
    assert all(isinstance(value, float) and 0 < value for value in scores.values())


def test_per_image_scores_are_each_images_own_bleu4_and_average_to_the_corpus_cider_d() -> None:
    """BLEU-4 of one image is that image scored alone; CIDEr-D's document frequencies come from all
    the scored images, so the corpus CIDEr-D is the mean of the per-image ones."""
    scores = per_image_scores(CORPUS_REFS, CORPUS_HYPS)
    assert list(scores) == list(CORPUS_HYPS) and all(sorted(s) == ["bleu4", "cider_d"] for s in scores.values())
    for image, hypothesis in CORPUS_HYPS.items():
        alone = score_captions({image: CORPUS_REFS[image]}, {image: hypothesis})["bleu4"]
        assert scores[image]["bleu4"] == pytest.approx(alone, rel=1e-12, abs=1e-15)
    ciders = [s["cider_d"] for s in scores.values()]
    assert sum(ciders) / len(ciders) == pytest.approx(score_captions(CORPUS_REFS, CORPUS_HYPS)["cider_d"], rel=1e-12)
    assert len(set(ciders)) == len(ciders) and max(ciders) == scores["horse"]["cider_d"] > 1 > scores["dog"]["cider_d"]
    assert scores["horse"]["bleu4"] > 0.5 > scores["cats"]["bleu4"]


def test_hypothesis_without_references_is_rejected() -> None:
    with pytest.raises(ValueError, match="image 42 has a hypothesis but no reference"):
        score_captions({"42": ["a dog"]}, {42: "a dog"})
    with pytest.raises(ValueError, match="image 'x' has a hypothesis but no reference"):
        score_captions({"x": [], "y": ["a cat"]}, {"x": "a dog", "y": "a cat"})


def test_empty_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="no hypotheses"):
        score_captions({1: ["a dog"]}, {})


def test_references_as_one_string_are_rejected() -> None:
    with pytest.raises(TypeError, match=r"references\[1\] is one string"):
        score_captions({1: "a dog on the grass"}, {1: "a dog"})


def test_official_scores_without_java_says_what_to_install(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    with pytest.raises(RuntimeError, match=r"java is not on PATH: install a Java runtime"):
        official_scores(CORPUS_REFS, CORPUS_HYPS)


# --- behaviours the mutation tests found unchecked (`mutmut run`, see pyproject.toml) ---------------


def test_scoring_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    # The toolkit's BLEU prints its n-gram counts unless told not to.
    score_captions(CORPUS_REFS, CORPUS_HYPS)
    per_image_scores(CORPUS_REFS, CORPUS_HYPS)
    assert capsys.readouterr() == ("", "")


def test_input_errors_say_what_to_do_in_full() -> None:
    with pytest.raises(ValueError) as empty:
        score_captions({1: ["a dog"]}, {})
    assert str(empty.value) == "no hypotheses to score: pass at least one {image_id: caption}"
    with pytest.raises(ValueError) as unmatched:
        score_captions({"42": ["a dog"]}, {42: "a dog"})
    assert str(unmatched.value) == (
        "image 42 has a hypothesis but no reference captions; "
        "score only images with ground truth (check that the id types match)"
    )
