"""COCO captions and Karpathy split loading, on the synthetic set and on hand-written JSON."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from raycap.data.coco import ImageRecord, coco_files, load_coco_captions, load_karpathy_split
from raycap.data.synthetic import SyntheticSet, generate, karpathy_splits


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSet:
    return generate(tmp_path_factory.mktemp("synthetic"), n_train=12, n_val=6, seed=0)


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _coco(images: list[dict], annotations: list[dict]) -> dict:
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations}


def _image(image_id: int, file_name: str = "") -> dict:
    return {"id": image_id, "file_name": file_name or f"{image_id:012d}.jpg", "width": 640, "height": 480}


def test_coco_files_follow_coco_2017_layout_for_dirs_and_uris() -> None:
    assert coco_files("/data/coco", "train") == (
        "/data/coco/annotations/captions_train2017.json",
        "/data/coco/train2017",
    )
    assert coco_files("s3://bucket/coco/", "val", year=2014) == (
        "s3://bucket/coco/annotations/captions_val2014.json",
        "s3://bucket/coco/val2014",
    )


def test_load_coco_captions_reads_synthetic_set(synthetic: SyntheticSet) -> None:
    annotations, image_dir = coco_files(str(synthetic.root), "train")
    records = load_coco_captions(annotations, image_dir, "train")
    assert [r.image_id for r in records] == list(range(1, 13))
    for record in records:
        assert record.split == "train"
        assert len(record.captions) == 5
        with Image.open(record.path) as image:
            assert image.size == (record.width, record.height)
    val = load_coco_captions(*coco_files(str(synthetic.root), "val"), "val")
    assert [r.image_id for r in val] == list(range(13, 19))


def test_load_karpathy_split_reads_synthetic_set(synthetic: SyntheticSet) -> None:
    root = str(synthetic.root)
    coco = {
        r.image_id: r
        for split in ("train", "val")
        for r in load_coco_captions(*coco_files(root, split), split)
    }
    expected = karpathy_splits(
        [i for i, r in coco.items() if r.split == "train"], [i for i, r in coco.items() if r.split == "val"]
    )
    for split in ("train", "restval", "val", "test"):
        records = load_karpathy_split(synthetic.karpathy_split, root, splits=(split,))
        assert records and [r.image_id for r in records] == sorted(i for i, s in expected.items() if s == split)
        for record in records:
            assert Path(record.path).is_file()
            same = coco[record.image_id]
            assert (record.path, record.width, record.height, record.captions) == (
                same.path, same.width, same.height, same.captions
            )


def test_hand_written_coco_json_keeps_non_ascii_and_captionless_images(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "captions.json",
        _coco(
            [_image(42, "b.jpg"), _image(7, "a.jpg"), _image(9)],
            [
                {"id": 1, "image_id": 42, "caption": "  A café with a crème brûlée.\n"},
                {"id": 2, "image_id": 7, "caption": "A dog."},
                {"id": 3, "image_id": 42, "caption": "Un gâteau sur une table"},
            ],
        ),
    )
    records = load_coco_captions(path, "s3://bucket/images/", "val")
    assert records == [
        ImageRecord(7, "s3://bucket/images/a.jpg", 640, 480, ("A dog.",), "val"),
        ImageRecord(9, "s3://bucket/images/000000000009.jpg", 640, 480, (), "val"),
        ImageRecord(
            42, "s3://bucket/images/b.jpg", 640, 480,
            ("A café with a crème brûlée.", "Un gâteau sur une table"), "val",
        ),
    ]


def test_empty_captions_are_dropped_with_a_warning_naming_the_image(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "captions.json",
        _coco([_image(5), _image(6)], [
            {"id": 1, "image_id": 5, "caption": "   "},
            {"id": 2, "image_id": 5, "caption": "a cat"},
            {"id": 3, "image_id": 6, "caption": "a hat"},
        ]),
    )
    with pytest.warns(UserWarning, match=r"image 5: dropped 1 empty caption"):
        records = load_coco_captions(path, "imgs", "train")
    assert records[0].captions == ("a cat",)


def test_captions_without_words_are_dropped_but_non_ascii_ones_kept(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "captions.json",
        _coco([_image(5)], [
            {"id": 1, "image_id": 5, "caption": "Un chat sur la table — très joli 猫"},
            {"id": 2, "image_id": 5, "caption": " — ! ? 🐱🎉 "},  # (the toolkit keeps "!?" as one token)
            {"id": 3, "image_id": 5, "caption": None},
            {"id": 4, "image_id": 5, "caption": "黑猫"},
        ]),
    )
    with pytest.warns(UserWarning, match=r"image 5: dropped 2 empty caption\(s\) \(no words\)"):
        records = load_coco_captions(path, "imgs", "train")
    assert records[0].captions == ("Un chat sur la table — très joli 猫", "黑猫")


def test_repeated_annotation_ids_warn_and_each_caption_stays_with_its_image(tmp_path: Path) -> None:
    # pycocotools indexes annotations by id: looking captions up by id would give image 1 image 2's caption.
    path = _write(
        tmp_path / "captions.json",
        _coco([_image(1), _image(2)], [
            {"id": 7, "image_id": 1, "caption": "a cat"},
            {"id": 7, "image_id": 2, "caption": "a dog"},
        ]),
    )
    with pytest.warns(UserWarning, match="annotation id 7 is used more than once"):
        records = load_coco_captions(path, "imgs", "train")
    assert [(r.image_id, r.captions) for r in records] == [(1, ("a cat",)), (2, ("a dog",))]


def test_non_integer_ids_are_errors_naming_the_entry(tmp_path: Path) -> None:
    path = _write(tmp_path / "captions.json", _coco([_image(1), {**_image(2), "id": "2"}], []))
    with pytest.raises(ValueError, match=r"images\[1\]: 'id' must be an integer, got '2'"):
        load_coco_captions(path, "imgs", "train")
    path = _write(tmp_path / "captions.json", _coco([_image(1)], [{"id": 1, "image_id": None, "caption": "x"}]))
    with pytest.raises(ValueError, match=r"annotations\[0\]: 'image_id' must be an integer, got None"):
        load_coco_captions(path, "imgs", "train")
    karpathy = _write(tmp_path / "k.json", {"images": [{**_karpathy_entry(4, "train", ["a"]), "cocoid": 4.5}]})
    with pytest.raises(ValueError, match=r"'cocoid' must be an integer, got 4.5"):
        load_karpathy_split(karpathy, "/coco")


def test_duplicate_image_id_is_an_error_naming_the_id(tmp_path: Path) -> None:
    path = _write(tmp_path / "captions.json", _coco([_image(3), _image(11), _image(11, "other.jpg")], []))
    with pytest.raises(ValueError, match="duplicate image id 11"):
        load_coco_captions(path, "imgs", "train")


def test_missing_or_invalid_annotation_file_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_coco_captions(tmp_path / "nothing.json", "imgs", "train")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json.*not valid"):
        load_coco_captions(broken, "imgs", "train")
    no_annotations = _write(tmp_path / "no_anns.json", {"images": []})
    with pytest.raises(ValueError, match="'annotations'"):
        load_coco_captions(no_annotations, "imgs", "train")
    no_file_name = _write(tmp_path / "no_name.json", _coco([{"id": 1, "width": 1, "height": 1}], []))
    with pytest.raises(ValueError, match=r"images\[0\] is missing \['file_name'\]"):
        load_coco_captions(no_file_name, "imgs", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_coco_captions(no_file_name, "imgs", "training")


def test_captions_for_unlisted_images_warn(tmp_path: Path) -> None:
    path = _write(tmp_path / "captions.json", _coco([_image(1)], [{"id": 1, "image_id": 2, "caption": "x"}]))
    with pytest.warns(UserWarning, match=r"not listed in 'images'.*\[2\]"):
        records = load_coco_captions(path, "imgs", "train")
    assert records[0].captions == ()


def _karpathy_entry(cocoid: int, split: str, sentences: list[str]) -> dict:
    return {
        "filepath": "val2014",
        "filename": f"COCO_val2014_{cocoid:012d}.jpg",
        "imgid": cocoid,
        "split": split,
        "cocoid": cocoid,
        "sentids": list(range(len(sentences))),
        "sentences": [{"raw": raw, "tokens": raw.lower().split(), "imgid": cocoid, "sentid": 0} for raw in sentences],
    }


def test_hand_written_karpathy_split_selects_splits_and_joins_paths(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                _karpathy_entry(30, "restval", ["a man on a horse ."]),
                _karpathy_entry(10, "train", ["A dog.", "  "]),
                _karpathy_entry(20, "test", ["A bird."]),
            ],
        },
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = load_karpathy_split(path, "s3://coco")
    assert [str(w.message) for w in caught] == [f"{path}: image 10: dropped 1 empty caption(s) (no words)"]
    assert train == [
        ImageRecord(10, "s3://coco/val2014/COCO_val2014_000000000010.jpg", 0, 0, ("A dog.",), "train"),
        ImageRecord(30, "s3://coco/val2014/COCO_val2014_000000000030.jpg", 0, 0, ("a man on a horse .",), "restval"),
    ]
    assert [r.image_id for r in load_karpathy_split(path, "/coco", splits=("test",))] == [20]


def test_karpathy_duplicate_cocoid_and_bad_entries_are_errors(tmp_path: Path) -> None:
    duplicate = _write(
        tmp_path / "dup.json", {"images": [_karpathy_entry(4, "train", ["a"]), _karpathy_entry(4, "val", ["b"])]}
    )
    with pytest.raises(ValueError, match="duplicate image id 4"):
        load_karpathy_split(duplicate, "/coco")
    entry = _karpathy_entry(5, "train", ["a"])
    del entry["cocoid"]
    no_id = _write(tmp_path / "no_id.json", {"images": [entry]})
    with pytest.raises(ValueError, match=r"missing \['cocoid'\]"):
        load_karpathy_split(no_id, "/coco")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_karpathy_split(tmp_path / "absent.json", "/coco")
