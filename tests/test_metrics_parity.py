"""raycap's tokens and scores against the COCO caption toolkit run with its Java tokenizer.

The corpus (tests/data/coco_parity_captions.json) is COCO-style: 81 images with 5 references each
(hyphens, possessives, contractions, numbers, times, brackets, quotes, abbreviations, case, extra
spaces) and prediction sets from good to empty. Java runs once for the module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from raycap.data.vocab import tokenize
from raycap.metrics import official_scores, score_captions

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO toolkit's tokenizer needs java")

CORPUS = json.loads((Path(__file__).parent / "data" / "coco_parity_captions.json").read_text(encoding="utf-8"))
REFERENCES = {image["id"]: image["references"] for image in CORPUS["images"]}
PREDICTIONS = {name: {int(i): c for i, c in hyps.items()} for name, hyps in CORPUS["predictions"].items()}


@pytest.fixture(scope="module")
def java() -> dict[tuple[str, int], list[str]]:
    """The toolkit's tokens of every reference and prediction, from one Java run: (set or "refs", image) -> captions."""
    captions = {("refs", i): captions for i, captions in REFERENCES.items()}
    captions |= {(name, i): [c] for name, hyps in PREDICTIONS.items() for i, c in hyps.items()}
    return PTBTokenizer().tokenize({key: [{"caption": c} for c in caps] for key, caps in captions.items()})


def test_corpus_covers_the_coco_cases() -> None:
    assert len(REFERENCES) >= 60 and all(len(refs) == 5 for refs in REFERENCES.values())
    text = " ".join(c for refs in REFERENCES.values() for c in refs)
    for case in ("t-shirt", "10-year-old", "dog's", "don't", "can't", "3:30", "1,000", "2.5", "1/2", "(", '"',
                 "'", "/", "&", "Mr.", "U.S.", "...", "  ", "\t", "A MAN", "$", "%", "#", ";", "?", "!", "--"):
        assert case in text, case
    assert {"good", "mediocre", "short", "empty"} <= set(PREDICTIONS)
    assert all(1 <= len(c.split()) <= 3 for c in PREDICTIONS["short"].values())
    assert not any(tokenize(c) for c in PREDICTIONS["empty"].values())


def test_tokens_are_the_java_tokenizers(java: dict[tuple[str, int], list[str]]) -> None:
    pairs = [(c, j) for i, refs in REFERENCES.items() for c, j in zip(refs, java["refs", i])]
    pairs += [(c, java[name, i][0]) for name, hyps in PREDICTIONS.items() for i, c in hyps.items()]
    ours = [" ".join(tokenize(caption)) for caption, _ in pairs]
    differ = [(caption, theirs, mine) for (caption, theirs), mine in zip(pairs, ours) if mine != theirs]
    assert len(pairs) >= 300
    assert not differ, f"{len(differ)}/{len(pairs)} tokenized unlike Java (caption, java, raycap): {differ[:5]}"


@pytest.mark.parametrize("name", sorted(PREDICTIONS))
def test_scores_are_the_toolkits(name: str, java: dict[tuple[str, int], list[str]]) -> None:
    gts = {i: java["refs", i] for i in PREDICTIONS[name]}
    res = {i: java[name, i] for i in PREDICTIONS[name]}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    ours = score_captions(REFERENCES, PREDICTIONS[name])
    assert [ours[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-4)
    assert ours["rouge_l"] == pytest.approx(rouge, abs=1e-4)
    assert ours["cider_d"] == pytest.approx(cider, abs=1e-3)


def test_official_scores_agree_with_score_captions() -> None:
    # The toolkit end to end (Java tokenizer, METEOR) on a few images: METEOR's start-up is most of the time.
    images = list(REFERENCES)[:4]
    hyps = {i: PREDICTIONS["good"][i] for i in images}
    official = official_scores(REFERENCES, hyps)
    ours = score_captions(REFERENCES, hyps)
    assert sorted(official) == sorted([*ours, "meteor"])
    assert {k: official[k] for k in ours} == pytest.approx(ours, abs=1e-9)
    assert 0 < official["meteor"] < 1
