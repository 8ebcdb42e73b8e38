"""Score a checkpoint on a split of extracted features; write predictions, metrics and attention pictures.

The checkpoint, the features and the outputs are folders or s3:// prefixes alike. By default the
split is the checkpoint's report split and the features its own feature root (`raycap.data.splits`).
Features made by another encoder than the checkpoint's are refused (`EncoderMismatchError`). A split
that shares images with the checkpoint's training images is refused (`TrainOverlapError`) unless
overlap is allowed, and every result is labelled with the split's role: scores on the selection
split are optimistic, since the checkpoint was chosen on them.

With other checkpoints to compare (`compare`), it captions the same images with each and writes a
side-by-side sheet (`raycap.sheet`: HTML and PNG) of every model's captions with per-image scores.

Predictions are in COCO's results format (`[{"image_id", "caption"}]`), so the official COCO
caption tools read them too. Attention pictures show, for each word, where the decoder looked
(Xu et al. 2015, figure 3): the attention grid upsampled over the image.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from raycap import feature_store as fstore
from raycap import storage
from raycap.config import check_bounds, flag
from raycap.data.images import load_image
from raycap.data.splits import SplitRef, TrainingData
from raycap.metrics import official_scores, per_image_scores, score_captions
from raycap.models.checkpoint import CaptionModel, load_checkpoint, pick_checkpoint
from raycap.models.decoding import BEAM_SIZE, MAX_DECODE_LEN
from raycap.models.encoder_config import EncoderConfig
from raycap.recipe import caption_features
from raycap.sheet import sheet_html, sheet_png, sheet_rows

PANEL = 160  # pixels per picture panel
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider_d")  # the order tables show


class TrainOverlapError(ValueError):
    """The split to score shares images with the checkpoint's training images (or they are unknown)."""


class EncoderMismatchError(ValueError):
    """The features to score were made by another encoder than the one the checkpoint was trained on."""


@dataclass(frozen=True)
class EvaluateConfig:
    """What to score and how; decoding defaults are training's validation ones (raycap.models.decoding)."""

    checkpoint: str = flag(
        "--checkpoint",
        help="checkpoint folder or s3:// prefix written by jobs/train.py, or its run's folder (its best; <run>/latest)",
    )
    features: str | None = flag(
        "--features", None, help="extraction output root (folder or s3:// prefix); default: the checkpoint's"
    )
    split: str | None = flag(
        "--split", None, help="split to score (test, val, val:even, ...); default: the checkpoint's report split"
    )
    out: str = flag("--out", "eval_out", help="folder or s3:// prefix for predictions, metrics and pictures")
    beam_size: int = flag("--beam-size", BEAM_SIZE, at_least=1)
    max_decode_len: int = flag("--max-decode-len", MAX_DECODE_LEN, at_least=1, help="words per caption at most")
    allow_unk: bool = flag(
        "--allow-unk", False,
        help="let captions hold <unk> (the word for every rare word); by default beam search never emits it",
    )
    pictures: int = flag("--pictures", 4, at_least=0, help="attention pictures to draw (attention model)")
    compare: tuple[str, ...] = flag(
        "--compare", (), action="append",
        help="another checkpoint to caption the same images with (repeatable; same encoder): writes a "
        "side-by-side sheet, compare_SPLIT.html and .png, of every model's captions with per-image BLEU-4/CIDEr-D",
    )
    allow_train_overlap: bool = flag(
        "--allow-train-overlap", False,
        help="score a split even if it holds images the checkpoint was trained on (the result is not held out)",
    )
    official: bool = flag(
        "--official", False,
        help="also score with the COCO caption toolkit's Java tokenizer and METEOR, side by side (needs java)",
    )

    def __post_init__(self) -> None:
        check_bounds(self)


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
    models: dict[str, dict[str, float]] = field(default_factory=dict)  # with `compare`: every model's metrics
    sheet: list[str] = field(default_factory=list)  # with `compare`: the sheet's HTML and PNG


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


def _image_keys(features_root: str, split: str) -> dict[int, str]:
    return dict(zip(*fstore.read_keys(features_root, split)))


def _encoder_words(cfg: EncoderConfig) -> str:
    return f"{cfg.arch} ({cfg.weights} weights) at {cfg.image_size}x{cfg.image_size}, grid {cfg.grid}"


def check_encoder(
    checkpoint: str, expected: EncoderConfig, features_root: str, split: str, found: EncoderConfig | None
) -> None:
    """EncoderMismatchError unless the features of `split` were made by the checkpoint's encoder: a
    decoder fed another trunk's features (even with as many channels) scores without failing, wrongly."""
    if found is not None and found != expected:
        raise EncoderMismatchError(
            f"the features of {split} under {features_root} were made by {_encoder_words(found)}, but checkpoint "
            f"{checkpoint} was trained on {_encoder_words(expected)}: give --features extracted with its encoder"
        )


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


def evaluate_checkpoint(cfg: EvaluateConfig) -> EvalResult:
    """Caption every image of `cfg.split` (default: the checkpoint's report split) with `cfg.checkpoint`,
    score it (also with the COCO toolkit's Java scorers if `cfg.official`) and write the outputs to
    `cfg.out` (each a folder or s3:// prefix). `cfg.features` None means the checkpoint's own.
    Captions never hold <unk> unless `cfg.allow_unk`."""
    beam_size, max_decode_len, allow_unk = cfg.beam_size, cfg.max_decode_len, cfg.allow_unk
    if cfg.official and shutil.which("java") is None:
        raise FileNotFoundError(
            "--official needs java on PATH (the COCO caption toolkit's tokenizer and METEOR are Java programs): "
            "install a Java runtime (e.g. apt-get install default-jre-headless) or leave out --official"
        )
    cfg = replace(cfg, checkpoint=pick_checkpoint(cfg.checkpoint), compare=tuple(pick_checkpoint(c) for c in cfg.compare))
    checkpoint, out_dir = cfg.checkpoint, storage.absolute(cfg.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: CaptionModel = load_checkpoint(checkpoint, device)
    data = model.data
    features_root = cfg.features or (data.features if data else None)
    split = cfg.split or (data.report_split if data else None)
    if features_root is None or split is None:
        raise ValueError(f"checkpoint {checkpoint} records no feature root or report split: give --features and --split")
    ref = SplitRef.parse(split)
    fstore.check_root(features_root)
    references = fstore.read_references(features_root, ref.name)
    listed = fstore.split_state(features_root, ref.name).feature_ids  # (N,): checked before features are read
    listed = listed[ref.keep(listed) & np.isin(listed, list(references))]
    if not len(listed):
        raise ValueError(
            f"split {split} has no images with both features and captions under {features_root}: extract it first, "
            f"python jobs/extract_features.py --out {features_root} --splits {ref.name} (with the encoder flags used before)"
        )
    spec = fstore.stored_spec(features_root, ref.name)  # the first shard's; read_features checks the rest
    check_encoder(checkpoint, model.encoder_cfg, features_root, split, spec.encoder if spec else None)
    label = held_out_label(checkpoint, split, listed, data, cfg.allow_train_overlap)
    image_ids, features = fstore.read_features(features_root, ref.name)  # (N,), (N, P, C)
    keep = np.isin(image_ids, listed)
    image_ids, features = image_ids[keep], features[keep]
    found = caption_features(model.decoder, features, model.vocab, beam_size, max_decode_len, allow_unk=allow_unk)
    predictions = {int(i): model.vocab.decode(c[0].tokens) for i, c in zip(image_ids, found)}
    metrics = score_captions(references, predictions)
    official_metrics = official_scores(references, predictions) if cfg.official else None

    name = split.replace(":", "-")
    predictions_file = storage.join(out_dir, f"predictions_{name}.json")
    rows = [{"image_id": i, "caption": c} for i, c in sorted(predictions.items())]
    storage.write_bytes(predictions_file, json.dumps(rows).encode("utf-8"))
    metrics_file = storage.join(out_dir, f"metrics_{name}.json")
    summary = {
        "checkpoint": checkpoint, "features": features_root, "split": split, "label": label,
        "images": len(predictions), "beam_size": beam_size, "max_decode_len": max_decode_len,
        "allow_unk": allow_unk,
        **metrics, "official": official_metrics,
    }  # fmt: skip
    storage.write_bytes(metrics_file, json.dumps(summary, indent=2).encode("utf-8"))

    written = []
    if cfg.pictures and found[0][0].alphas is not None:
        keys = _image_keys(features_root, ref.name)
        for image_id, captions in list(zip(image_ids.tolist(), found))[: cfg.pictures]:
            best = captions[0]
            image, _ = load_image(storage.read_bytes(keys[image_id]), model.encoder_cfg.image_size)
            words = [model.vocab.itos[t] for t in best.tokens]
            picture = attention_picture(image, words, best.alphas.numpy(), model.vocab.decode_text(best.tokens))
            png = io.BytesIO()
            picture.save(png, format="PNG")
            path = storage.join(out_dir, f"attention_{image_id}.png")
            storage.write_bytes(path, png.getvalue())
            written.append(path)
    result = EvalResult(split, label, metrics, official_metrics, predictions, predictions_file, metrics_file, written)
    if cfg.compare:
        result.models, result.sheet = _compare(cfg, model, result, features, image_ids, references, features_root)
    return result


def _labels(models: Sequence[CaptionModel]) -> list[str]:
    """Each model's decoder kind (attention, gru), numbered where two share one."""
    kinds = [m.decoder_cfg.kind for m in models]
    return [f"{k} #{kinds[:i].count(k) + 1}" if kinds.count(k) > 1 else k for i, k in enumerate(kinds)]


def _compare(
    cfg: EvaluateConfig,
    model: CaptionModel,
    result: EvalResult,
    features: np.ndarray,
    image_ids: np.ndarray,
    references: dict[int, list[str]],
    features_root: str,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Caption the scored images (features (N, P, C), image_ids (N,)) with each of `cfg.compare`,
    refused as the first checkpoint is (another encoder, trained on these images); write the sheet.
    Returns each model's metrics by label, and the sheet's HTML and PNG paths."""
    split, device = result.split, "cuda" if torch.cuda.is_available() else "cpu"
    others = {c: load_checkpoint(c, device) for c in cfg.compare}
    labels = _labels([model, *others.values()])
    captions = {labels[0]: result.predictions}  # model -> {image_id: caption}
    for (checkpoint, other), label in zip(others.items(), labels[1:]):
        check_encoder(checkpoint, other.encoder_cfg, features_root, split, model.encoder_cfg)
        held_out_label(checkpoint, split, image_ids, other.data, cfg.allow_train_overlap)
        found = caption_features(other.decoder, features, other.vocab, cfg.beam_size, cfg.max_decode_len,
                                 allow_unk=cfg.allow_unk)  # fmt: skip
        captions[label] = {int(i): other.vocab.decode(c[0].tokens) for i, c in zip(image_ids, found)}
    scores = {label: per_image_scores(references, predictions) for label, predictions in captions.items()}
    metrics = {label: score_captions(references, predictions) for label, predictions in captions.items()}
    keys = _image_keys(features_root, SplitRef.parse(split).name)
    images = {i: load_image(storage.read_bytes(keys[i]), model.encoder_cfg.image_size)[0] for i in result.predictions}
    rows = sheet_rows(images, references, captions, scores)
    title = f"{' vs '.join(captions)} on {result.label}, beam {cfg.beam_size}"
    name = split.replace(":", "-")
    html_file, png_file = (storage.join(storage.absolute(cfg.out), f"compare_{name}.{ext}") for ext in ("html", "png"))
    storage.write_bytes(html_file, sheet_html(rows, title).encode("utf-8"))
    png = io.BytesIO()
    sheet_png(rows, title).save(png, format="PNG")
    storage.write_bytes(png_file, png.getvalue())
    return metrics, [html_file, png_file]


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
