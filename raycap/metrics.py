"""Caption metrics: corpus BLEU-1..4 (nltk) and CIDEr-D (the coco-caption scorer), on our tokeniser.

Both take `references` as {image_id: [caption, ...]} and `hypotheses` as {image_id: caption}; only
the images in `hypotheses` are scored, so `references` may hold more (e.g. the whole split).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence

from nltk.translate.bleu_score import corpus_bleu
from pycocoevalcap.cider.cider import Cider

from raycap.data.vocab import tokenize

References = Mapping[Hashable, Sequence[str]]
Hypotheses = Mapping[Hashable, str]
Tokens = list[str]

_BLEU_WEIGHTS = {
    "bleu1": (1.0,),
    "bleu2": (1 / 2,) * 2,
    "bleu3": (1 / 3,) * 3,
    "bleu4": (1 / 4,) * 4,
}


def _tokenized(references: References, hypotheses: Hypotheses) -> tuple[list[list[Tokens]], list[Tokens]]:
    """Check the inputs and tokenise the scored images: (references per image, hypothesis per image)."""
    if not hypotheses:
        raise ValueError("no hypotheses to score: pass at least one {image_id: caption}")
    refs, hyps = [], []
    for image_id, hypothesis in hypotheses.items():
        captions = references.get(image_id, ())
        if isinstance(captions, str):
            raise TypeError(f"references[{image_id!r}] is one string; pass a list of reference captions")
        if not captions:
            raise ValueError(
                f"image {image_id!r} has a hypothesis but no reference captions; "
                "score only images with ground truth (check that the id types match)"
            )
        refs.append([tokenize(caption) for caption in captions])
        hyps.append(tokenize(hypothesis))
    return refs, hyps


def _bleu(refs: list[list[Tokens]], hyps: list[Tokens]) -> dict[str, float]:
    with warnings.catch_warnings():  # nltk warns on every order without a match; the score (~0) says it
        warnings.filterwarnings("ignore", message=r"\nThe hypothesis contains 0 counts", category=UserWarning)
        scores = corpus_bleu(refs, hyps, weights=list(_BLEU_WEIGHTS.values()))
    return {name: float(score) for name, score in zip(_BLEU_WEIGHTS, scores)}


def _cider_d(refs: list[list[Tokens]], hyps: list[Tokens]) -> float:
    gts = {i: [" ".join(ref) for ref in image_refs] for i, image_refs in enumerate(refs)}
    res = {i: [" ".join(hyp)] for i, hyp in enumerate(hyps)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def bleu(references: References, hypotheses: Hypotheses) -> dict[str, float]:
    """Corpus BLEU-1..4 ("bleu1".."bleu4") against all references of each image.

    Unsmoothed, as in the COCO evaluation: an n-gram order with no match anywhere in the corpus
    gives that BLEU-n (and higher) ~0. A hypothesis with fewer than n words counts as one unmatched
    n-gram (nltk's convention; coco-caption counts none): an empty hypothesis adds one miss per order.
    """
    return _bleu(*_tokenized(references, hypotheses))


def cider_d(references: References, hypotheses: Hypotheses) -> float:
    """CIDEr-D (n=4, sigma=6, clipped tf-idf, x10) as coco-caption computes it (its "CIDEr").

    Document frequencies come from the references of the scored images only, so scores compare
    across models on the same image set, not across sets; a single image always scores 0 (idf=0).
    """
    return _cider_d(*_tokenized(references, hypotheses))


def score_captions(references: References, hypotheses: Hypotheses) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D: {"bleu1", "bleu2", "bleu3", "bleu4", "cider_d"}."""
    refs, hyps = _tokenized(references, hypotheses)
    return {**_bleu(refs, hyps), "cider_d": _cider_d(refs, hyps)}
