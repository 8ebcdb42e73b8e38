"""Messy caption data end to end: missing image files, empty and non-ASCII captions, duplicate ids.

Each problem must surface as a clear error or warning where the data is read (annotation loading,
extraction), never as a crash deep in training; what survives must still train.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from raycap import feature_store as fstore
from raycap.data.synthetic import SyntheticSet, generate
from raycap.features import ExtractConfig, ExtractResult, extract_features
from raycap.models.decoders import DecoderConfig
from raycap.models.encoder_config import EncoderConfig
from raycap.recipe import TrainConfig
from raycap.train import TrainJobConfig, train

ENCODER = EncoderConfig("resnet18", "none", grid=3, image_size=64)
FRENCH = "Un chat sur la table — très joli 猫"
ACCENTED = "Un cercle rouge à gauche d’un carré"
MISSING = {"train": [4, 5], "val": [18]}  # image ids whose files are deleted
WORDLESS = 1  # train image whose captions are all blank or punctuation


def _edit(annotation_file: Path, edit: dict[int, list[str]]) -> None:
    """Replace the captions of the images in `edit` (annotation ids stay unique)."""
    data = json.loads(annotation_file.read_text(encoding="utf-8"))
    kept = [a for a in data["annotations"] if a["image_id"] not in edit]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    added = [
        {"id": next_id + i, "image_id": image_id, "caption": caption}
        for i, (image_id, caption) in enumerate((i, c) for i, captions in edit.items() for c in captions)
    ]
    data["annotations"] = kept + added
    annotation_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _messy_set(root: Path) -> SyntheticSet:
    """16 train and 6 val images (ids 1-16, 17-22) with files missing, wordless and non-ASCII captions."""
    data = generate(root, n_train=16, n_val=6, seed=5)
    _edit(
        data.train_captions,
        {WORDLESS: ["", "   ", "—", "🐱 🎉"], 2: [FRENCH, ACCENTED, "a cat"], 3: [FRENCH, "un chat noir"]},
    )
    _edit(data.val_captions, {17: [FRENCH, "a red circle"]})
    for split, ids in MISSING.items():
        for image_id in ids:
            (root / f"{split}2017" / f"{image_id:012d}.jpg").unlink()
    return data


@pytest.fixture(scope="module")
def extracted(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExtractResult, list[str]]:
    root = tmp_path_factory.mktemp("messy")
    data = _messy_set(root / "coco")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = extract_features(
            ExtractConfig(out=str(root / "features"), coco_root=str(data.root), encoder=ENCODER, min_freq=1)
        )
    return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_extraction_reports_missing_files_and_wordless_captions_and_keeps_non_ascii(
    extracted: tuple[ExtractResult, list[str]],
) -> None:
    result, warned = extracted
    assert any(f"image {WORDLESS}: dropped 4 empty caption(s)" in message for message in warned), warned
    for split, ids in MISSING.items():
        summary = result.splits[split]
        assert (summary.images, summary.failed, summary.ok) == (
            {"train": 16, "val": 6}[split], len(ids), {"train": 16, "val": 6}[split] - len(ids)
        )
        errors = fstore.read_errors(result.out, split)
        assert [row["image_id"] for row in errors] == ids
        assert all("could not read" in row["reason"] and row["key"].endswith(".jpg") for row in errors)
    captions = fstore.read_captions(result.out, "train")
    assert WORDLESS not in captions.image_ids.tolist()
    assert FRENCH in captions.texts and ACCENTED in captions.texts
    vocab = fstore.read_vocab(result.out)
    assert {"très", "猫", "d'un", "à"} <= set(vocab.itos)
    row = captions.texts.index(FRENCH)
    assert vocab.decode(captions.tokens[row]) == "un chat sur la table très joli 猫"
    assert fstore.read_references(result.out, "val")[17][0] == FRENCH


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_one_epoch_trains_on_what_survived_and_scores_only_extracted_images(
    extracted: tuple[ExtractResult, list[str]], tmp_path: Path
) -> None:
    result, _ = extracted
    outcome = train(
        TrainJobConfig(
            features=result.out,
            decoder=DecoderConfig("attention", embed_dim=32, decoder_dim=32, attention_dim=32, dropout=0.0),
            train=TrainConfig(epochs=1, captions_per_step=40, lr=3e-3, lr_rule="none", beam_size=2, max_decode_len=12),
            select_split="val",  # the whole of val, to check that only extracted images are scored
            report_split="test",
            num_workers=2,
            cpus_per_worker=0.5,
            storage_path=str(tmp_path),
            run_name="messy",
        )
    )
    assert outcome.best_checkpoint is not None and outcome.last_metrics["epoch"] == 0
    predictions = json.loads((Path(outcome.best_checkpoint) / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == [i for i in range(17, 23) if i not in MISSING["val"]]


@pytest.mark.timeout(60)
def test_duplicate_image_ids_stop_extraction_before_any_work(tmp_path: Path) -> None:
    data = generate(tmp_path / "coco", n_train=3, n_val=1, seed=1)
    annotations = json.loads(data.train_captions.read_text())
    annotations["images"].append({**annotations["images"][0], "file_name": "copy.jpg"})
    data.train_captions.write_text(json.dumps(annotations))
    out = tmp_path / "features"
    with pytest.raises(ValueError, match=r"captions_train2017\.json: duplicate image id 1"):
        extract_features(ExtractConfig(out=str(out), coco_root=str(data.root), encoder=ENCODER, min_freq=1))
    assert not out.exists()  # failed on reading the annotations: nothing written, no Ray job started
