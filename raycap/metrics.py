"""Caption metrics as the COCO caption toolkit (pycocoevalcap, coco-caption) computes them.

`score_captions` runs the toolkit's own BLEU-1..4, ROUGE-L and CIDEr-D scorers on the tokens of
`raycap.data.ptb.tokenize`, the toolkit's Java PTB tokenization reproduced in Python, so it needs no
Java and gives the toolkit's numbers (tests/test_metrics_parity.py checks both against Java).
`official_scores` runs the toolkit itself as coco-caption's COCOEvalCap does: the Java tokenizer, then
BLEU, METEOR (also Java), ROUGE-L and CIDEr-D; SPICE is left out.

Both take `references` as {image_id: [caption, ...]} and `hypotheses` as {image_id: caption}; only
the images in `hypotheses` are scored, so `references` may hold more (e.g. the whole split). The
toolkit's conventions hold: BLEU is the corpus score, unsmoothed (an n-gram order with no match
gives ~0) and a hypothesis shorter than n words adds no n-grams; CIDEr-D's document frequencies come
from the references of the scored images, so a single image scores 0 and scores compare across
models on one image set, not across sets.
"""

from __future__ import annotations

import shutil
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from raycap.data.vocab import tokenize

References = Mapping[Hashable, Sequence[str]]
Hypotheses = Mapping[Hashable, str]
Scored = dict[int, list[str]]  # the toolkit's input: image index -> captions


def score_captions(references: References, hypotheses: Hypotheses) -> dict[str, float]:
    """{"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d"}: the toolkit's scorers on our tokens."""
    return _scores(*_tokenized(references, hypotheses))


def per_image_scores(references: References, hypotheses: Hypotheses) -> dict[Hashable, dict[str, float]]:
    """{image_id: {"bleu4", "cider_d"}}: the toolkit's per-image BLEU-4 and CIDEr-D on our tokens,
    CIDEr-D's document frequencies from all the scored images' references (as in the corpus score)."""
    gts, res = _tokenized(references, hypotheses)
    _, bleu = Bleu(4).compute_score(gts, res, verbose=0)  # bleu[3]: BLEU-4 per image
    _, cider = Cider().compute_score(gts, res)  # (images,)
    return {
        image_id: {"bleu4": float(bleu[3][i]), "cider_d": float(cider[i])} for i, image_id in enumerate(hypotheses)
    }


def _tokenized(references: References, hypotheses: Hypotheses) -> tuple[Scored, Scored]:
    """The toolkit's input (`_toolkit_input`) tokenized as its Java PTB tokenizer does, space-joined."""
    refs, hyps = _toolkit_input(references, hypotheses)
    tokenized = {i: [" ".join(tokenize(caption)) for caption in captions] for i, captions in refs.items()}
    return tokenized, {i: [" ".join(tokenize(hyp))] for i, (hyp,) in hyps.items()}


def official_scores(references: References, hypotheses: Hypotheses) -> dict[str, float]:
    """The toolkit end to end (Java tokenizer, METEOR): score_captions' keys and "meteor". Needs java."""
    if shutil.which("java") is None:
        raise RuntimeError(
            "the COCO caption toolkit's tokenizer and METEOR are Java programs and java is not on PATH: "
            "install a Java runtime (e.g. apt-get install default-jre-headless, or conda install openjdk)"
        )
    from pycocoevalcap.meteor.meteor import Meteor  # noqa: PLC0415 - starts a JVM: only here
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: PLC0415

    refs, hyps = _toolkit_input(references, hypotheses)
    tokenizer = PTBTokenizer()  # two Java runs, references then hypotheses, as COCOEvalCap does
    gts = tokenizer.tokenize({i: [{"caption": c} for c in captions] for i, captions in refs.items()})
    res = tokenizer.tokenize({i: [{"caption": c} for c in captions] for i, captions in hyps.items()})
    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        if meteor.lock.locked():  # a failed compute_score keeps the lock that __del__ needs
            meteor.lock.release()
        del meteor  # its __del__ stops the JVM
    return {**_scores(gts, res), "meteor": float(score)}


def _toolkit_input(references: References, hypotheses: Hypotheses) -> tuple[Scored, Scored]:
    """Check the inputs; the scored images' references and hypotheses keyed by position, as the scorers want."""
    if not hypotheses:
        raise ValueError("no hypotheses to score: pass at least one {image_id: caption}")
    refs, hyps = {}, {}
    for i, (image_id, hypothesis) in enumerate(hypotheses.items()):
        captions = references.get(image_id, ())
        if isinstance(captions, str):
            raise TypeError(f"references[{image_id!r}] is one string; pass a list of reference captions")
        if not captions:
            raise ValueError(
                f"image {image_id!r} has a hypothesis but no reference captions; "
                "score only images with ground truth (check that the id types match)"
            )
        refs[i], hyps[i] = list(captions), [hypothesis]
    return refs, hyps


def _scores(gts: Scored, res: Scored) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D from the toolkit's scorers on tokenized, space-joined captions."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: no print of the n-gram counts
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{n}": float(b) for n, b in enumerate(bleu, 1)}, "rouge_l": float(rouge), "cider_d": float(cider)}
