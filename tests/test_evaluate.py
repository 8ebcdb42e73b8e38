"""jobs/evaluate.py without a trained model: its flags, the --official error without Java, the tables,
a random-weight checkpoint scored from S3 as from a folder, features of another encoder refused.
(Scoring trained checkpoints, the report split and the leak refusal: tests/test_train.py.)"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import WORDS, image, job_module

from raycap import feature_store as fstore
from raycap import storage
from raycap.config import run_job
from raycap.data.splits import TrainingData
from raycap.data.vocab import Vocab
from raycap.evaluate import EncoderMismatchError, EvaluateConfig, compare_table, evaluate_checkpoint, metrics_table
from raycap.metrics import per_image_scores
from raycap.models.checkpoint import CaptionModel, save_checkpoint
from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.models.encoder_config import EncoderConfig

if TYPE_CHECKING:
    from conftest import S3Server

ENCODER = EncoderConfig("resnet18", "none", grid=2, image_size=64)
TEST_IDS = list(range(1, 7))


def _features(root: str, encoder: EncoderConfig) -> None:
    """A "test" split of random features made by `encoder`, with two captions and an image per id,
    under `root` (a folder or s3:// prefix), in the layout jobs/extract_features.py writes."""
    rng = np.random.default_rng(0)
    vocab = Vocab(WORDS)
    texts = [" ".join(rng.choice(WORDS, 4)) for _ in range(2 * len(TEST_IDS))]
    fstore.write_table(fstore.captions_table(TEST_IDS * 2, texts, vocab), fstore.captions_uri(root, "test"))
    keys = [storage.join(root, "images", f"{i}.jpg") for i in TEST_IDS]
    for i, key in zip(TEST_IDS, keys):
        storage.write_bytes(key, image(i))
    spec = fstore.FeatureSpec(encoder)
    n = len(TEST_IDS)
    features = rng.standard_normal((n, *spec.shape)).astype(np.float32)  # (N, P, C)
    table = fstore.features_table(
        spec, np.array(TEST_IDS), keys, np.full(n, 80), np.full(n, 60), [None] * n, features
    )
    fstore.write_table(table, storage.join(fstore.features_dir(root, "test"), "part-00000.parquet"))


def _checkpoint(uri: str, features_root: str, kind: str = "attention", seed: int = 0) -> str:
    """A random-weight checkpoint on ENCODER that reports on `features_root`'s test split."""
    torch.manual_seed(seed)
    vocab = Vocab(WORDS)
    decoder_cfg = DecoderConfig(kind, embed_dim=16, decoder_dim=16, attention_dim=16, dropout=0.0)
    decoder = build_decoder(decoder_cfg, len(vocab), ENCODER.feature_dim, ENCODER.grid)
    data = TrainingData(features_root, ("train",), "val", "test", np.array([100, 101]), np.array([200]))
    return save_checkpoint(uri, CaptionModel(decoder, vocab, ENCODER, decoder_cfg, data=data))


def test_official_without_java_stops_with_one_error_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate_job = job_module("evaluate")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    with pytest.raises(SystemExit) as info:
        run_job(lambda: evaluate_job.main(["--checkpoint", str(tmp_path / "missing"), "--official"]))
    assert info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --official needs java on PATH"), errors


def test_evaluate_defaults_come_from_the_checkpoint() -> None:
    cfg = job_module("evaluate").parse_args(["--checkpoint", "ck", "--max-decode-len", "20"])
    assert (cfg.features, cfg.split, cfg.max_decode_len) == (None, None, 20)
    assert (cfg.allow_train_overlap, cfg.official) == (False, False)
    flags = job_module("evaluate").parse_args(["--checkpoint", "ck", "--allow-train-overlap", "--official"])
    assert (flags.allow_train_overlap, flags.official) == (True, True)


def test_compare_table_puts_both_scorers_side_by_side() -> None:
    table = compare_table({"bleu4": 0.25, "cider_d": 0.8}, {"bleu4": 0.2468, "meteor": 0.21, "cider_d": 0.79})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "raycap", "official"]
    assert [line.split() for line in lines[1:]] == [
        ["bleu4", "0.250", "0.247"], ["meteor", "-", "0.210"], ["cider_d", "0.800", "0.790"]
    ]


def test_metrics_table_fits_long_split_labels() -> None:
    metrics = {"bleu1": 0.5, "bleu2": 0.4, "bleu3": 0.3, "bleu4": 0.2, "rouge_l": 0.45, "cider_d": 1.0}
    label = "val (selection split: optimistic)"
    header, row = metrics_table({label: metrics}, header="split").splitlines()
    assert row.startswith(label + "  ") and row.split()[-6:] == ["0.500", "0.400", "0.300", "0.200", "0.450", "1.000"]
    assert header.index("bleu1") == row.index("0.500") + len("0.500") - len("bleu1")


@pytest.mark.integration
def test_an_s3_checkpoint_scores_as_its_local_copy_with_outputs_on_s3(
    s3_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = f"s3://{s3_server.make_bucket()}"
    features = storage.join(bucket, "features")
    _features(features, ENCODER)
    local_checkpoint = _checkpoint(str(tmp_path / "checkpoint"), features)
    local = evaluate_checkpoint(EvaluateConfig(local_checkpoint, out=str(tmp_path / "eval")))
    checkpoint = _checkpoint(storage.join(bucket, "runs", "checkpoint_000000"), features)
    out = storage.join(bucket, "eval")
    job_module("evaluate").main(["--checkpoint", checkpoint, "--out", out, "--pictures", "1"])
    printed = capsys.readouterr().out
    assert f"predictions: {out}/predictions_test.json" in printed
    metrics = json.loads(storage.read_bytes(f"{out}/metrics_test.json"))
    assert (metrics["checkpoint"], metrics["label"], metrics["images"]) == (checkpoint, "test (report split)", 6)
    assert {k: metrics[k] for k in local.metrics} == local.metrics
    predictions = json.loads(storage.read_bytes(f"{out}/predictions_test.json"))
    assert {p["image_id"]: p["caption"] for p in predictions} == local.predictions
    assert storage.read_bytes(f"{out}/attention_1.png").startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "other", [EncoderConfig("resnet34", "none", grid=2, image_size=64), EncoderConfig("resnet18", "none", 2, 96)]
)
def test_features_of_another_encoder_with_as_many_channels_are_refused_in_one_line(
    other: EncoderConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert other.feature_dim == ENCODER.feature_dim  # the decoder would take them without a shape error
    features = str(tmp_path / "features")
    _features(features, other)
    checkpoint = _checkpoint(str(tmp_path / "checkpoint"), features)
    with pytest.raises(EncoderMismatchError):
        evaluate_checkpoint(EvaluateConfig(checkpoint, out=str(tmp_path / "eval")))
    with pytest.raises(SystemExit) as info:
        run_job(lambda: job_module("evaluate").main(["--checkpoint", checkpoint, "--out", str(tmp_path / "eval")]))
    assert info.value.code == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line == (
        f"error: the features of test under {features} were made by {other.arch} (none weights) at "
        f"{other.image_size}x{other.image_size}, grid 2, but checkpoint {checkpoint} was trained on resnet18 "
        "(none weights) at 64x64, grid 2: give --features extracted with its encoder"
    )
    assert not (tmp_path / "eval").exists()


def test_compare_writes_one_sheet_of_every_models_captions_and_scores_most_disagreeing_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features = str(tmp_path / "features")
    _features(features, ENCODER)
    attention = _checkpoint(str(tmp_path / "attention"), features)
    gru = _checkpoint(str(tmp_path / "gru"), features, kind="gru", seed=1)
    out = tmp_path / "eval"
    job_module("evaluate").main(["--checkpoint", attention, "--compare", gru, "--out", str(out), "--pictures", "0"])
    printed = capsys.readouterr().out
    assert all(f"comparison sheet: {out}/compare_test.{ext}" in printed for ext in ("html", "png"))
    captions = {
        "attention": {p["image_id"]: p["caption"] for p in json.loads((out / "predictions_test.json").read_text())},
        "gru": evaluate_checkpoint(EvaluateConfig(gru, out=str(tmp_path / "gru_eval"), pictures=0)).predictions,
    }
    references = fstore.read_references(features, "test")
    scores = {m: per_image_scores(references, c) for m, c in captions.items()}
    page = (out / "compare_test.html").read_text()
    rows = page.split('<tr><td><img src="data:image/jpeg;base64,')[1:]
    assert [int(re.search(r'alt="image (\d+)"', row)[1]) for row in rows] == sorted(
        TEST_IDS,
        key=lambda i: (-len({captions[m][i] for m in captions}),
                       -abs(scores["attention"][i]["cider_d"] - scores["gru"][i]["cider_d"]), i),
    )  # fmt: skip
    for row in rows:
        i = int(re.search(r'alt="image (\d+)"', row)[1])
        assert all(f"<li>{html.escape(r)}</li>" in row for r in references[i])
        for model in ("attention", "gru"):
            s = scores[model][i]
            cell = f'<p class="caption">{html.escape(captions[model][i])}</p>'
            assert f'{cell}<p class="score">BLEU-4 {s["bleu4"]:.3f} &middot; CIDEr-D {s["cider_d"]:.3f}</p>' in row
    assert "<th>attention</th><th>gru</th>" in page
    assert Image.open(out / "compare_test.png").size[1] > 100 * len(TEST_IDS)
