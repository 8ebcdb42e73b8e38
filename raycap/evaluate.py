"""Score a checkpoint on a split of extracted features; write predictions, metrics and attention pictures.

By default the split is the checkpoint's report split and the features its own feature root
(`raycap.data.splits`). A split that shares images with the checkpoint's training images is
refused (`TrainOverlapError`) unless overlap is allowed, and every result is labelled with the
split's role: scores on the selection split are optimistic, since the checkpoint was chosen on them.

Predictions are in COCO's results format (`[{"image_id", "caption"}]`), so the official COCO
caption tools read them too. Attention pictures show, for each word, where the decoder looked
(Xu et al. 2015, figure 3): the attention grid upsampled over the image.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from raycap import feature_store as fstore
from raycap import storage
from raycap.data.images import load_image
from raycap.data.splits import SplitRef, TrainingData
from raycap.metrics import official_scores, score_captions
from raycap.models.checkpoint import CaptionModel, load_checkpoint
from raycap.recipe import caption_features

PANEL = 160  # pixels per picture panel
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider_d")  # the order tables show


class TrainOverlapError(ValueError):
    """The split to score shares images with the checkpoint's training images (or they are unknown)."""


@dataclass
class EvalResult:
    split: str
    label: str  # the split and its role, e.g. "test (report split)", "val (selection split: optimistic)"
    metrics: dict[str, float]
    official: dict[str, float] | None  # the COCO toolkit's Java scorers, when asked for
    predictions: dict[int, str]
    predictions_file: str
    metrics_file: str
    pictures: list[str]


def attention_picture(image: np.ndarray, words: Sequence[str], alphas: np.ndarray, caption: str) -> Image.Image:
    """One panel for the image and one per word with its attention map over the image.

    image (S, S, 3) uint8; alphas (len(words), grid*grid) summing to 1 per word.
    """
    grid = int(math.isqrt(alphas.shape[1]))
    base = Image.fromarray(image).resize((PANEL, PANEL), Image.BILINEAR)
    panels = [(base, "(image)")]
    for word, alpha in zip(words, alphas):
        heat = alpha.reshape(grid, grid) / max(float(alpha.max()), 1e-8)  # (grid, grid) in [0, 1]
        mask = Image.fromarray((heat * 255).astype(np.uint8)).resize((PANEL, PANEL), Image.BILINEAR)
        dark = Image.blend(base, Image.new("RGB", base.size), 0.75)
        panels.append((Image.composite(base, dark, mask), word))
    font = ImageFont.load_default(size=14)
    cols = min(len(panels), 6)
    rows = math.ceil(len(panels) / cols)
    header = 28
    sheet = Image.new("RGB", (cols * PANEL, header + rows * (PANEL + 20)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 6), caption, fill="black", font=font)
    for n, (panel, label) in enumerate(panels):
        x, y = (n % cols) * PANEL, header + (n // cols) * (PANEL + 20)
        sheet.paste(panel, (x, y))
        draw.text((x + 4, y + PANEL + 2), label, fill="black", font=font)
    return sheet


def _image_keys(features_root: str, split: str, endpoint: str | None) -> dict[int, str]:
    return dict(zip(*fstore.read_keys(features_root, split, endpoint)))


def held_out_label(checkpoint: str, split: str, image_ids: np.ndarray, data: TrainingData | None, allow: bool) -> str:
    """`split` labelled with its role for the checkpoint; TrainOverlapError if it shares images
    (image_ids (N,)) with the checkpoint's training images, or they are unknown, and `allow` is False."""
    how = "pass --allow-train-overlap to score it anyway"
    if data is None:
        if not allow:
            raise TrainOverlapError(
                f"checkpoint {checkpoint} does not record its training images (not written by jobs/train.py), "
                f"so {split} cannot be checked for images it was trained on; {how}"
            )
        return f"{split} (training images unknown)"
    trained = int(np.isin(image_ids, data.train_ids).sum())
    if trained:
        if not allow:
            raise TrainOverlapError(
                f"refusing to report on {split}: {trained:,} of its {len(image_ids):,} images are among the "
                f"{len(data.train_ids):,} this checkpoint was trained on ({data.describe()}), so its scores would "
                f"overstate the model on unseen images; {how}"
            )
        return f"{split} ({trained:,} of {len(image_ids):,} images trained on: not held out)"
    selected = int(np.isin(image_ids, data.select_ids).sum())
    if selected == len(image_ids):
        return f"{split} (selection split: optimistic)"
    if selected:
        return f"{split} ({selected:,} of {len(image_ids):,} images from the selection split: optimistic)"
    return f"{split} (report split)" if split == data.report_split else f"{split} (held out)"


def evaluate_checkpoint(
    checkpoint: str,
    features_root: str | None,
    out_dir: str,
    *,
    split: str | None = None,
    beam_size: int = 3,
    max_decode_len: int = 50,
    allow_unk: bool = False,
    pictures: int = 4,
    endpoint: str | None = None,
    allow_train_overlap: bool = False,
    official: bool = False,
) -> EvalResult:
    """Caption every image of `split` (default: the checkpoint's report split) with `checkpoint`, score
    it (also with the COCO toolkit's Java scorers if `official`) and write the outputs to `out_dir`.
    `features_root` None means the checkpoint's own. Captions never hold <unk> unless `allow_unk`."""
    if official and shutil.which("java") is None:
        raise FileNotFoundError(
            "--official needs java on PATH (the COCO caption toolkit's tokenizer and METEOR are Java programs): "
            "install a Java runtime (e.g. apt-get install default-jre-headless) or leave out --official"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: CaptionModel = load_checkpoint(checkpoint, device)
    data = model.data
    features_root = features_root or (data.features if data else None)
    split = split or (data.report_split if data else None)
    if features_root is None or split is None:
        raise ValueError(f"checkpoint {checkpoint} records no feature root or report split: give --features and --split")
    ref = SplitRef.parse(split)
    references = fstore.read_references(features_root, ref.name, endpoint)
    listed = fstore.split_state(features_root, ref.name, endpoint).feature_ids  # (N,): checked before features are read
    listed = listed[ref.keep(listed) & np.isin(listed, list(references))]
    if not len(listed):
        raise ValueError(f"split {split} has no images with both features and captions under {features_root}")
    label = held_out_label(checkpoint, split, listed, data, allow_train_overlap)
    image_ids, features = fstore.read_features(features_root, ref.name, endpoint)  # (N,), (N, P, C)
    keep = np.isin(image_ids, listed)
    image_ids, features = image_ids[keep], features[keep]
    found = caption_features(model.decoder, features, model.vocab, beam_size, max_decode_len, allow_unk=allow_unk)
    predictions = {int(i): model.vocab.decode(c[0].tokens) for i, c in zip(image_ids, found)}
    metrics = score_captions(references, predictions)
    official_metrics = official_scores(references, predictions) if official else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = split.replace(":", "-")
    predictions_file = out / f"predictions_{name}.json"
    predictions_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in sorted(predictions.items())]))
    metrics_file = out / f"metrics_{name}.json"
    summary = {
        "checkpoint": checkpoint, "features": features_root, "split": split, "label": label,
        "images": len(predictions), "beam_size": beam_size, "max_decode_len": max_decode_len,
        "allow_unk": allow_unk,
        **metrics, "official": official_metrics,
    }  # fmt: skip
    metrics_file.write_text(json.dumps(summary, indent=2))

    written = []
    if pictures and found[0][0].alphas is not None:
        keys = _image_keys(features_root, ref.name, endpoint)
        for image_id, captions in list(zip(image_ids.tolist(), found))[:pictures]:
            best = captions[0]
            image, _ = load_image(storage.read_bytes(keys[image_id], endpoint), model.encoder_cfg.image_size)
            words = [model.vocab.itos[t] for t in best.tokens]
            path = out / f"attention_{image_id}.png"
            attention_picture(image, words, best.alphas.numpy(), model.vocab.decode_text(best.tokens)).save(path)
            written.append(str(path))
    return EvalResult(
        split, label, metrics, official_metrics, predictions, str(predictions_file), str(metrics_file), written
    )


def metrics_table(rows: dict[str, dict[str, float]], header: str = "model") -> str:
    """A plain-text table: one row per model (or split), BLEU-1..4, ROUGE-L and CIDEr-D columns."""
    columns = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d"]
    width = max([len(header), *map(len, rows)]) + 2
    lines = [f"{header:<{width}}" + "".join(f"{c:>9}" for c in columns)]
    for name, metrics in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{metrics[c]:>9.3f}" for c in columns))
    return "\n".join(lines)


def compare_table(ours: dict[str, float], official: dict[str, float]) -> str:
    """raycap's scores beside the COCO toolkit's (Java tokenizer, METEOR), one metric per row."""
    names = [m for m in METRICS if m in ours or m in official]
    lines = [f"{'metric':<10}{'raycap':>10}{'official':>10}"]
    for m in names:
        cells = (f"{d[m]:>10.3f}" if m in d else f"{'-':>10}" for d in (ours, official))
        lines.append(f"{m:<10}" + "".join(cells))
    return "\n".join(lines)
