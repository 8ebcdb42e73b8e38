"""Score a checkpoint on a split of extracted features; write predictions, metrics and attention pictures.

Predictions are in COCO's results format (`[{"image_id", "caption"}]`), so the official COCO
caption tools read them too. Attention pictures show, for each word, where the decoder looked
(Xu et al. 2015, figure 3): the attention grid upsampled over the image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from raycap import feature_store as fstore
from raycap import storage
from raycap.data.images import load_image
from raycap.metrics import score_captions
from raycap.models.checkpoint import CaptionModel, load_checkpoint
from raycap.recipe import caption_features

PANEL = 160  # pixels per picture panel


@dataclass
class EvalResult:
    metrics: dict[str, float]
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


def evaluate_checkpoint(
    checkpoint: str,
    features_root: str,
    out_dir: str,
    split: str = "val",
    beam_size: int = 3,
    max_len: int = 50,
    pictures: int = 4,
    endpoint: str | None = None,
) -> EvalResult:
    """Caption every image of `split` with `checkpoint`, score it and write the outputs to `out_dir`."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: CaptionModel = load_checkpoint(checkpoint, device)
    image_ids, features = fstore.read_features(features_root, split, endpoint)
    found = caption_features(model.decoder, features, model.vocab, beam_size, max_len)
    predictions = {int(i): model.vocab.decode(c[0].tokens) for i, c in zip(image_ids, found)}
    metrics = score_captions(fstore.read_references(features_root, split, endpoint), predictions)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions_file = out / f"predictions_{split}.json"
    predictions_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in sorted(predictions.items())]))
    metrics_file = out / f"metrics_{split}.json"
    metrics_file.write_text(json.dumps({"checkpoint": checkpoint, "split": split, "beam_size": beam_size, **metrics}, indent=2))

    written = []
    if pictures and found[0][0].alphas is not None:
        keys = _image_keys(features_root, split, endpoint)
        for image_id, captions in list(zip(image_ids.tolist(), found))[:pictures]:
            best = captions[0]
            image, _ = load_image(storage.read_bytes(keys[image_id], endpoint), model.encoder_cfg.image_size)
            words = [model.vocab.itos[t] for t in best.tokens]
            path = out / f"attention_{image_id}.png"
            attention_picture(image, words, best.alphas.numpy(), predictions[image_id]).save(path)
            written.append(str(path))
    return EvalResult(metrics, predictions, str(predictions_file), str(metrics_file), written)


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per model, BLEU-1..4 and CIDEr-D columns."""
    columns = ["bleu1", "bleu2", "bleu3", "bleu4", "cider_d"]
    lines = [f"{'model':<12}" + "".join(f"{c:>9}" for c in columns)]
    for name, metrics in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{metrics[c]:>9.3f}" for c in columns))
    return "\n".join(lines)
