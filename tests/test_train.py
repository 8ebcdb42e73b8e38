"""Ray Train stage: DDP on 2 CPU workers, the step plan, checkpoints and resume, the split roles
and evaluation that refuses training images (`ray job submit` of the training job:
tests/test_end_to_end.py)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import job_module

from raycap import feature_store as fstore
from raycap.config import run_job
from raycap.data.splits import KARPATHY
from raycap.data.synthetic import generate
from raycap.evaluate import EvaluateConfig, TrainOverlapError, evaluate_checkpoint
from raycap.features import ExtractConfig, extract_features
from raycap.models.checkpoint import load_checkpoint, load_optimizer_state
from raycap.models.decoders import DecoderConfig
from raycap.models.encoder_config import EncoderConfig
from raycap.recipe import TrainConfig
from raycap.train import TrainJobConfig, TrainOutcome, choose_run, plan_run, train

pytestmark = pytest.mark.integration
KARPATHY_ROLES = dict(zip(("train_splits", "select_split", "report_split"), KARPATHY))


def _job(features: str, storage: Path, name: str, epochs: int, **roles: object) -> TrainJobConfig:
    return TrainJobConfig(
        features=features,
        decoder=DecoderConfig("attention", embed_dim=32, decoder_dim=32, attention_dim=32, dropout=0.0),
        # 40 captions per step at the linearly scaled lr 3e-3, warmed up over the first epoch.
        train=TrainConfig(epochs=epochs, captions_per_step=40, lr=2.4e-3, beam_size=2, max_decode_len=16),
        num_workers=2,
        cpus_per_worker=1.0,
        storage_path=str(storage),
        run_name=name,
        keep_checkpoints=10,
        **roles,
    )


def _epochs(run_dir: str) -> dict[int, Path]:
    """Checkpoint directory of each reported epoch of a run."""
    found = {}
    for meta in Path(run_dir).glob("checkpoint_*/meta.json"):
        found[json.loads(meta.read_text())["epoch"]] = meta.parent
    return found


def _adam_steps(checkpoint: Path) -> int:
    state = load_optimizer_state(checkpoint)
    return int(next(iter(state["state"].values()))["step"])


@pytest.fixture(scope="module")
def karpathy_features(tiny_features: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The images of `tiny_features` (same seed and sizes) extracted with their Karpathy splits."""
    root = tmp_path_factory.mktemp("karpathy")
    data = generate(root / "coco", n_train=32, n_val=8, seed=3)
    out = str(root / "features")
    extract_features(
        ExtractConfig(
            out=out, coco_root=str(data.root), karpathy_file=str(data.karpathy_split),
            splits=("train", "restval", "val", "test"), min_freq=1,
            encoder=EncoderConfig("resnet18", "none", grid=3, image_size=64),
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def coco_run(tiny_features: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainJobConfig, TrainOutcome]:
    """3 epochs on the COCO 2017 layout: train on train2017, select on val2017's even ids."""
    cfg = _job(tiny_features, tmp_path_factory.mktemp("coco_run"), "ddp", epochs=3)
    return cfg, train(cfg)


def test_ddp_training_reports_metrics_and_checkpoints_and_loss_falls(
    coco_run: tuple[TrainJobConfig, TrainOutcome],
) -> None:
    cfg, outcome = coco_run
    epochs = _epochs(outcome.run_dir)
    assert sorted(epochs) == [0, 1, 2]
    losses = [load_checkpoint(epochs[e]).metrics["train_loss"] for e in range(3)]
    assert losses[2] < losses[0]
    for key in ("bleu1", "bleu4", "cider_d", "val_ce"):
        assert key in outcome.last_metrics
    best = load_checkpoint(outcome.best_checkpoint)
    assert best.metrics["bleu4"] == max(load_checkpoint(p).metrics["bleu4"] for p in epochs.values())
    predictions = json.loads((Path(outcome.best_checkpoint) / "predictions.json").read_text())
    val_ids = fstore.split_state(cfg.features, "val").feature_ids
    assert sorted(p["image_id"] for p in predictions) == sorted(i for i in val_ids if i % 2 == 0)  # val:even


def test_every_worker_takes_the_planned_steps_of_captions(coco_run: tuple[TrainJobConfig, TrainOutcome]) -> None:
    cfg, outcome = coco_run
    plan, data = plan_run(cfg)
    train_ids = fstore.split_state(cfg.features, "train").feature_ids
    assert (plan.images, plan.per_worker) == (len(train_ids), 20)
    assert plan.steps_per_epoch == -(-(len(train_ids) // 2) * 5 // 20)
    epochs = _epochs(outcome.run_dir)
    for epoch, path in epochs.items():
        assert load_checkpoint(path).metrics["steps"] == plan.steps_per_epoch
        assert _adam_steps(path) == (epoch + 1) * plan.steps_per_epoch  # one optimizer step per planned step
    recorded = load_checkpoint(epochs[2]).data
    assert recorded.train_ids.tolist() == sorted(train_ids.tolist())
    assert recorded.select_ids.tolist() == data.select_ids.tolist()
    assert (recorded.features, recorded.report_split) == (cfg.features, "val:odd")


def test_rerun_is_a_new_run_unless_resumed_which_goes_on_at_next_epoch_with_optimizer_state(
    tiny_features: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = train(_job(tiny_features, tmp_path, "resume", epochs=2))
    after_two = _epochs(first.run_dir)
    steps_two = _adam_steps(after_two[1])
    rerun, nothing = choose_run(_job(tiny_features, tmp_path, "resume", epochs=3))
    assert (rerun.name, nothing) == ("resume-2", None), "a rerun without --resume must be a new run"
    same, finished = choose_run(_job(tiny_features, tmp_path, "resume", epochs=2, resume=True))
    assert same.name == "resume" and finished is not None and finished.best_checkpoint == first.best_checkpoint
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "nothing to train" in line]
    assert f"run {first.run_dir} finished at epoch 2" in line and "--resume --epochs N" in line
    resumed = train(_job(tiny_features, tmp_path, "resume", epochs=3, resume=True))
    epochs = _epochs(resumed.run_dir)
    assert sorted(epochs) == [0, 1, 2]
    assert json.loads((epochs[2] / "meta.json").read_text())["epoch"] == 2
    # Adam's step count carried over: epoch 2 added half again the steps of epochs 0-1.
    assert _adam_steps(epochs[2]) == steps_two * 3 // 2
    final = load_checkpoint(epochs[2]).decoder.state_dict()
    previous = load_checkpoint(after_two[1]).decoder.state_dict()
    assert any(not torch.equal(final[k], previous[k]) for k in final)


@pytest.fixture(scope="module")
def karpathy_run(karpathy_features: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainOutcome, str]:
    """2 epochs on the Karpathy layout: train on train+restval, select on val; and what train printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        outcome = train(_job(karpathy_features, tmp_path_factory.mktemp("karpathy_run"), "k", epochs=2, **KARPATHY_ROLES))
    return outcome, printed.getvalue()


def test_karpathy_run_trains_on_train_restval_selects_on_val_reports_on_test(
    karpathy_features: str, karpathy_run: tuple[TrainOutcome, str], tmp_path: Path
) -> None:
    outcome, printed = karpathy_run
    ids = {s: fstore.split_state(karpathy_features, s).feature_ids for s in ("train", "restval", "val", "test")}
    n_train = len(ids["train"]) + len(ids["restval"])
    assert f"[raycap] plan: train on train+restval, select on val ({len(ids['val'])} images" in printed
    assert f"{n_train} images with {5 * n_train} captions" in printed
    recorded = load_checkpoint(outcome.best_checkpoint).data
    assert recorded.train_ids.tolist() == sorted([*ids["train"], *ids["restval"]])
    predictions = json.loads((Path(outcome.best_checkpoint) / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == sorted(ids["val"])  # selection on val only

    evaluate = EvaluateConfig(outcome.best_checkpoint, out=str(tmp_path / "eval"), pictures=0)
    report = evaluate_checkpoint(replace(evaluate, pictures=1))
    assert (report.split, report.label) == ("test", "test (report split)")
    assert sorted(report.predictions) == sorted(ids["test"])
    assert 0 <= report.metrics["bleu4"] <= 1 and len(report.pictures) == 1
    selection = evaluate_checkpoint(replace(evaluate, split="val"))
    assert selection.label == "val (selection split: optimistic)"
    with pytest.raises(TrainOverlapError, match=f"{len(ids['restval'])} of its {len(ids['restval'])} images"):
        evaluate_checkpoint(replace(evaluate, split="restval"))


@pytest.mark.skipif(shutil.which("java") is None, reason="--official runs the COCO toolkit's Java programs")
def test_official_prints_the_toolkits_scores_beside_raycaps(
    karpathy_run: tuple[TrainOutcome, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome, _ = karpathy_run
    job_module("evaluate").main(["--checkpoint", outcome.best_checkpoint, "--official", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "images of test (report split), raycap's scorer vs the COCO toolkit's:" in out
    meteor = next(line for line in out.splitlines() if line.startswith("meteor"))
    assert meteor.split()[1] == "-" and 0 <= float(meteor.split()[2]) <= 1
    saved = json.loads((tmp_path / "metrics_test.json").read_text())
    assert set(saved["official"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider_d"}


def test_karpathy_test_images_in_coco_2017_train_make_evaluate_refuse(
    coco_run: tuple[TrainJobConfig, TrainOutcome], karpathy_features: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """As on COCO: a model trained on COCO 2017's train split has seen most of Karpathy's test images."""
    _, outcome = coco_run
    test_ids = fstore.split_state(karpathy_features, "test").feature_ids
    leaked = int(np.isin(test_ids, load_checkpoint(outcome.best_checkpoint).data.train_ids).sum())
    assert 0 < leaked < len(test_ids)
    evaluate_job = job_module("evaluate")
    args = ["--checkpoint", outcome.best_checkpoint, "--features", karpathy_features, "--split", "test",
            "--out", str(tmp_path / "eval")]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        run_job(lambda: evaluate_job.main(args))
    assert info.value.code == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    print(f"\n{line}")
    assert line.startswith(f"error: refusing to report on test: {leaked} of its {len(test_ids)} images are among")
    assert "--allow-train-overlap" in line and not (tmp_path / "eval").exists()
    result = evaluate_checkpoint(
        EvaluateConfig(outcome.best_checkpoint, karpathy_features, split="test", out=str(tmp_path / "eval"),
                       pictures=0, allow_train_overlap=True)
    )  # fmt: skip
    assert result.label == f"test ({leaked} of {len(test_ids)} images trained on: not held out)"


def test_plan_flag_prints_the_plan_from_the_features_and_exits(
    karpathy_features: str, capsys: pytest.CaptureFixture[str]
) -> None:
    train_job = job_module("train")
    roles = ["--train-splits", "train", "restval", "--select-split", "val", "--report-split", "test"]
    cfg = TrainJobConfig(karpathy_features, num_workers=4, **KARPATHY_ROLES)
    plan, _ = plan_run(cfg)
    train_job.main(["--features", karpathy_features, *roles, "--num-workers", "4", "--plan"])
    out = capsys.readouterr().out
    assert f"32 captions per step (8 per worker x 4 workers): {plan.steps_per_epoch} steps per epoch" in out
    assert "lr 4.00e-04" in out and "[raycap] training" not in out
