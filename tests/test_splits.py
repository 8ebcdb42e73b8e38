"""Split roles and leaks: split references, disjoint roles, what a checkpoint records of its training
images, and evaluation refusing a split that shares images with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raycap.data.splits import COCO2017, KARPATHY, SplitRef, TrainingData, check_roles, ids_digest
from raycap.data.vocab import Vocab
from raycap.evaluate import TrainOverlapError, held_out_label
from raycap.models.checkpoint import CaptionModel, CheckpointError, load_checkpoint, save_checkpoint
from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.models.encoder_config import EncoderConfig
from raycap.train import TrainJobConfig

ENCODER = EncoderConfig("resnet18", "none", grid=3, image_size=64)


def _data(train_ids: list[int], select_ids: list[int]) -> TrainingData:
    return TrainingData("/f", ("train", "restval"), "val", "test", np.array(train_ids), np.array(select_ids))


def _checkpoint(directory: Path, data: TrainingData | None) -> Path:
    vocab = Vocab(["a", "cat"], max_words=4)
    cfg = DecoderConfig("gru", embed_dim=8, decoder_dim=8, dropout=0.0)
    decoder = build_decoder(cfg, len(vocab), ENCODER.feature_dim)
    return Path(save_checkpoint(directory, CaptionModel(decoder, vocab, ENCODER, cfg, data=data)))


def test_split_references_name_a_split_or_its_even_or_odd_half() -> None:
    ids = np.arange(10, 16)
    assert SplitRef.parse("val") == SplitRef("val") and SplitRef.parse("val").keep(ids).all()
    assert ids[SplitRef.parse("val:even").keep(ids)].tolist() == [10, 12, 14]
    assert ids[SplitRef.parse("val:odd").keep(ids)].tolist() == [11, 13, 15]
    assert str(SplitRef.parse("val:odd")) == "val:odd"
    for bad in ("val:", ":even", "val:first", ""):
        with pytest.raises(ValueError, match="optionally with :even or :odd"):
            SplitRef.parse(bad)


def test_halves_of_a_split_are_disjoint_but_a_half_overlaps_its_whole() -> None:
    even, odd, whole = SplitRef.parse("val:even"), SplitRef.parse("val:odd"), SplitRef.parse("val")
    assert not even.overlaps(odd) and even.overlaps(whole) and whole.overlaps(odd) and even.overlaps(even)
    assert not whole.overlaps(SplitRef("test"))


def test_roles_must_be_disjoint() -> None:
    check_roles(*KARPATHY)
    check_roles(*COCO2017)
    with pytest.raises(ValueError, match="report_split test shares images with train split test"):
        check_roles(("train", "test"), "val", "test")
    with pytest.raises(ValueError, match="select_split val:even shares images with train split val"):
        check_roles(("train", "val"), "val:even", "test")
    with pytest.raises(ValueError, match="select_split val and report_split val:odd share images"):
        check_roles(("train",), "val", "val:odd")
    with pytest.raises(ValueError, match="train_splits is empty"):
        check_roles((), "val", "test")


def test_ids_digest_depends_on_the_set_only() -> None:
    assert ids_digest(np.array([3, 1, 2, 2])) == ids_digest(np.array([1, 2, 3]))
    assert ids_digest(np.array([1, 2, 3])) != ids_digest(np.array([1, 2, 4]))


def test_checkpoint_records_roles_and_training_ids(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "ck", _data([5, 1, 3], [8, 10]))
    data = load_checkpoint(path).data
    assert (data.features, data.train_splits, data.select_split, data.report_split) == (
        "/f", ("train", "restval"), "val", "test"
    )
    assert data.train_ids.tolist() == [1, 3, 5] and data.select_ids.tolist() == [8, 10]
    meta = json.loads((path / "meta.json").read_text())["data"]
    assert meta["train_ids"] == {"file": "train_ids.npy", "count": 3, "sha256": ids_digest(np.array([1, 3, 5]))}
    assert load_checkpoint(_checkpoint(tmp_path / "plain", None)).data is None


def test_an_id_file_that_does_not_match_its_digest_or_holds_a_pickle_is_refused(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "edited", _data([1, 3, 5], [8]))
    np.save(path / "train_ids.npy", np.array([1, 3]))  # an image quietly taken out of the record
    with pytest.raises(CheckpointError, match=r"train_ids\.npy does not match the count and SHA-256"):
        load_checkpoint(path)
    np.save(path / "train_ids.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match=r"train_ids\.npy is not a readable NumPy id file"):
        load_checkpoint(path)


def test_a_split_holding_training_images_is_refused_with_the_count_and_the_override() -> None:
    data = _data([1, 2, 3, 4], [10, 11])
    with pytest.raises(TrainOverlapError) as info:
        held_out_label("ck", "test", np.array([3, 4, 20, 21, 22]), data, allow=False)
    message = str(info.value)
    assert "refusing to report on test: 2 of its 5 images are among the 4 this checkpoint was trained on" in message
    assert "train+restval of /f" in message and "--allow-train-overlap" in message and "\n" not in message
    allowed = held_out_label("ck", "test", np.array([3, 4, 20, 21, 22]), data, allow=True)
    assert allowed == "test (2 of 5 images trained on: not held out)"


def test_labels_say_which_role_a_split_plays() -> None:
    data = _data([1, 2], [10, 11])
    assert held_out_label("ck", "test", np.array([20, 21]), data, allow=False) == "test (report split)"
    assert held_out_label("ck", "val", np.array([10, 11]), data, allow=False) == "val (selection split: optimistic)"
    assert held_out_label("ck", "val2", np.array([10, 30]), data, allow=False) == (
        "val2 (1 of 2 images from the selection split: optimistic)"
    )
    assert held_out_label("ck", "other", np.array([30]), data, allow=False) == "other (held out)"


def test_a_checkpoint_without_a_record_is_scored_only_when_overlap_is_allowed() -> None:
    with pytest.raises(TrainOverlapError, match="does not record its training images.*--allow-train-overlap"):
        held_out_label("ck", "test", np.array([1]), None, allow=False)
    assert held_out_label("ck", "test", np.array([1]), None, allow=True) == "test (training images unknown)"


def test_train_job_config_refuses_overlapping_roles() -> None:
    assert (TrainJobConfig("f").train_splits, TrainJobConfig("f").select_split) == (("train",), "val:even")
    with pytest.raises(ValueError, match="report_split val:even"):
        TrainJobConfig("f", select_split="val:odd", report_split="val:even", train_splits=("val:even",))
