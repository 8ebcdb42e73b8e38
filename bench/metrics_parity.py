"""Caption-metric parity with the COCO toolkit: raycap's tokenizer and scores vs pycocoevalcap with Java.

The toolkit side is what coco-caption runs: Stanford's PTBTokenizer (Java, -lowerCase -preserveLines,
then its punctuation list removed) and the Bleu(4), Cider and Rouge scorers on those tokens. The
raycap side is only the public API, `raycap.data.vocab.tokenize` and `raycap.metrics.score_captions`,
so the script measures any version of them. The corpus (tests/data/coco_parity_captions.json) holds
COCO-style references (hyphens, possessives, contractions, numbers, times, punctuation, case) and
several prediction sets (good, mediocre, 1-3 words, empty).

    python bench/metrics_parity.py [--corpus tests/data/coco_parity_captions.json]

Prints the share of captions (the references, then each prediction set, each a Java run as in
COCOEvalCap) tokenized exactly as Java does, with the first differences; then per prediction set
raycap's and the toolkit's BLEU-4 and CIDEr-D and the largest |difference| of BLEU-1..4, CIDEr-D and
ROUGE-L (nan where raycap gives no ROUGE-L). Ends with one JSON line whose "ratio" is the share of
identical tokenizations. Needs `java` on PATH.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from raycap.data.vocab import tokenize
from raycap.metrics import score_captions

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "coco_parity_captions.json"
SHOWN_DIFFERENCES = 10


def java_tokens(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """The toolkit's tokenization (space-joined), one Java run over all captions as COCOEvalCap runs it."""
    return PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})


def toolkit_scores(refs: dict[int, list[str]], hyps: dict[int, str]) -> dict[str, float]:
    """BLEU-1..4, CIDEr-D and ROUGE-L from the toolkit's scorers on already tokenized text."""
    gts, res = {i: refs[i] for i in hyps}, {i: [hyp] for i, hyp in hyps.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {**{f"bleu{n}": float(b) for n, b in enumerate(bleu, 1)}, "cider_d": float(cider), "rouge_l": float(rouge)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args()
    if shutil.which("java") is None:
        raise SystemExit("java is not on PATH: the toolkit's PTBTokenizer needs a Java runtime (e.g. openjdk-17-jre)")

    corpus = json.loads(args.corpus.read_text(encoding="utf-8"))
    refs = {image["id"]: image["references"] for image in corpus["images"]}
    sets = {name: {int(i): c for i, c in hyps.items()} for name, hyps in corpus["predictions"].items()}
    # Java tokenizes the references in one run and each prediction set in another, as COCOEvalCap does
    # (a caption's last tokens can depend on the next line of that run).
    java_refs = java_tokens(refs)
    java_sets = {name: {i: caps[0] for i, caps in java_tokens({i: [c] for i, c in hyps.items()}).items()}
                 for name, hyps in sets.items()}  # fmt: skip
    pairs = [(c, j) for i in refs for c, j in zip(refs[i], java_refs[i])]
    pairs += [(hyps[i], java_sets[name][i]) for name, hyps in sets.items() for i in hyps]
    differ = [(c, j, " ".join(tokenize(c))) for c, j in pairs if " ".join(tokenize(c)) != j]
    identical = 1 - len(differ) / len(pairs)

    n_refs = sum(map(len, refs.values()))
    print(f"corpus: {len(refs)} images, {n_refs} references, {len(sets)} prediction sets of {len(refs)} captions")
    print(f"identical tokenizations: {len(pairs) - len(differ)}/{len(pairs)} captions = {identical:.2%}")
    for c, java, ours in differ[:SHOWN_DIFFERENCES]:
        print(f"  {c!r}\n    java:   {java!r}\n    raycap: {ours!r}")
    if len(differ) > SHOWN_DIFFERENCES:
        print(f"  ... and {len(differ) - SHOWN_DIFFERENCES} more")

    figures: dict[str, float] = {"ratio": identical, "captions": len(pairs), "images": len(refs)}
    print(f"\n{'set':<12}{'BLEU-4 raycap':>14}{'toolkit':>9}{'CIDEr-D raycap':>15}{'toolkit':>9}"
          f"{'max|dBLEU|':>12}{'|dCIDEr-D|':>12}{'|dROUGE-L|':>12}")  # fmt: skip
    for name, hyps in sets.items():
        raycap = score_captions(refs, hyps)
        toolkit = toolkit_scores(java_refs, java_sets[name])
        bleu_diff = max(abs(raycap[f"bleu{n}"] - toolkit[f"bleu{n}"]) for n in range(1, 5))
        cider_diff = abs(raycap["cider_d"] - toolkit["cider_d"])
        rouge_diff = abs(raycap["rouge_l"] - toolkit["rouge_l"]) if "rouge_l" in raycap else float("nan")
        print(f"{name:<12}{raycap['bleu4']:>14.4f}{toolkit['bleu4']:>9.4f}{raycap['cider_d']:>15.4f}"
              f"{toolkit['cider_d']:>9.4f}{bleu_diff:>12.2e}{cider_diff:>12.2e}{rouge_diff:>12.2e}")  # fmt: skip
        figures |= {f"{name}_max_bleu_diff": bleu_diff, f"{name}_cider_d_diff": cider_diff}
        if "rouge_l" in raycap:
            figures[f"{name}_rouge_l_diff"] = rouge_diff
    figures["max_bleu_diff"] = max(v for k, v in figures.items() if k.endswith("_max_bleu_diff"))
    figures["max_cider_d_diff"] = max(v for k, v in figures.items() if k.endswith("_cider_d_diff"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
