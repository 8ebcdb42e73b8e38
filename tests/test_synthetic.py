"""The synthetic COCO-format set: determinism, layout, geometry, captions that follow the scene."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raycap.data.synthetic import (
    COLOURS,
    INVERSE,
    SyntheticImage,
    SyntheticSet,
    describes_relation_correctly,
    generate,
    karpathy_splits,
    load_ground_truth,
    make_captions,
    names_objects_correctly,
    sample_scene,
)
from raycap.data.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL = 16, 6


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSet:
    return generate(tmp_path_factory.mktemp("synthetic"), n_train=N_TRAIN, n_val=N_VAL, seed=0)


@pytest.fixture(scope="module")
def scenes(synthetic: SyntheticSet) -> list[SyntheticImage]:
    truth = {**load_ground_truth(synthetic.root, "train"), **load_ground_truth(synthetic.root, "val")}
    return [truth[i] for i in sorted(truth)]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(synthetic: SyntheticSet, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", n_train=N_TRAIN, n_val=N_VAL, seed=0)
    other = generate(tmp_path / "other", n_train=N_TRAIN, n_val=N_VAL, seed=1)
    reference = _files(synthetic.root)
    assert _files(again.root) == reference
    others = _files(other.root)
    assert others.keys() == reference.keys()
    assert all(others[name] != reference[name] for name in reference if name.endswith(".jpg"))


def test_writes_coco_2017_layout_and_schema(synthetic: SyntheticSet) -> None:
    root = synthetic.root
    assert sorted(p.name for p in (root / "train2017").iterdir()) == [f"{i:012d}.jpg" for i in range(1, N_TRAIN + 1)]
    assert len(list((root / "val2017").iterdir())) == N_VAL
    image_ids, annotation_ids = [], []
    for path in (synthetic.train_captions, synthetic.val_captions):
        data = json.loads(path.read_text())
        assert list(data) == ["info", "licenses", "images", "annotations"]
        for image in data["images"]:
            assert set(image) == {
                "id", "file_name", "width", "height", "license", "date_captured", "coco_url", "flickr_url"
            }
        assert all(set(a) == {"id", "image_id", "caption"} for a in data["annotations"])
        image_ids += [image["id"] for image in data["images"]]
        annotation_ids += [a["id"] for a in data["annotations"]]
    assert len(set(image_ids)) == N_TRAIN + N_VAL
    assert len(set(annotation_ids)) == len(annotation_ids) == 5 * (N_TRAIN + N_VAL)
    karpathy = json.loads(synthetic.karpathy_split.read_text())["images"]
    assert sorted(e["cocoid"] for e in karpathy) == sorted(image_ids)
    assert all(e["filepath"] == ("train2017" if e["cocoid"] <= N_TRAIN else "val2017") for e in karpathy)
    assert all(s["tokens"] and s["raw"] for e in karpathy for s in e["sentences"])


def test_karpathy_splits_relate_to_coco_2017_as_the_real_ones_do() -> None:
    train2017, val2017 = range(1, 901), range(901, 1001)  # the demo's sizes
    splits = karpathy_splits(train2017, val2017)
    assert sorted(splits) == [*train2017, *val2017]
    counts = {name: sum(s == name for s in splits.values()) for name in ("train", "restval", "val", "test")}
    assert sum(counts.values()) == 1000 and counts["restval"] == counts["val"] + counts["test"]
    assert abs(counts["val"] - counts["test"]) <= 1 and counts["train"] > counts["restval"]
    assert all(splits[i] != "train" for i in val2017)  # val2017 lies inside the val2014-like pool
    test = [i for i, s in splits.items() if s == "test"]
    # As with real COCO, most Karpathy test images are COCO 2017 training images.
    assert sum(i in train2017 for i in test) > len(test) / 2


def test_objects_are_distinct_disjoint_inside_and_clearly_related(scenes: list[SyntheticImage]) -> None:
    for scene in scenes:
        a, b = scene.objects
        assert (a.size, a.colour, a.shape) != (b.size, b.colour, b.shape)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
        disjoint_x = a.bbox[2] <= b.bbox[0] or b.bbox[2] <= a.bbox[0]
        disjoint_y = a.bbox[3] <= b.bbox[1] or b.bbox[3] <= a.bbox[1]
        assert disjoint_x or disjoint_y
        (ax, ay), (bx, by) = [((o.bbox[0] + o.bbox[2]) / 2, (o.bbox[1] + o.bbox[3]) / 2) for o in (a, b)]
        along, across = {"left": (bx - ax, by - ay), "right": (ax - bx, ay - by),
                         "above": (by - ay, bx - ax), "below": (ay - by, ax - bx)}[scene.relation]
        assert along > abs(across), scene  # a is clearly `relation` of b


def test_pixels_show_each_object_in_its_colour_on_a_light_background(
    synthetic: SyntheticSet, scenes: list[SyntheticImage]
) -> None:
    for scene in scenes:
        split_dir = "train2017" if scene.image_id <= N_TRAIN else "val2017"
        with Image.open(synthetic.root / split_dir / scene.file_name) as image:
            assert image.format == "JPEG" and image.size == (scene.width, scene.height)
            pixels = np.asarray(image.convert("RGB"), dtype=np.int32)  # (H, W, 3)
        assert pixels[1, 1].min() > 180  # corner is background
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            centre = pixels[(y0 + y1) // 2 - 1 : (y0 + y1) // 2 + 2, (x0 + x1) // 2 - 1 : (x0 + x1) // 2 + 2]
            assert np.abs(centre.mean(axis=(0, 1)) - COLOURS[obj.colour]).max() < 30, (scene.image_id, obj)


def test_captions_name_objects_and_relation_per_ground_truth(scenes: list[SyntheticImage]) -> None:
    first_named = set()
    for scene in scenes:
        assert len(scene.captions) == len(set(scene.captions)) == 5
        for caption in scene.captions:
            assert names_objects_correctly(caption, scene), caption
            assert describes_relation_correctly(caption, scene), caption
            first_named.add(caption.lower().startswith(f"a {scene.objects[0].phrase}"))
    assert first_named == {True, False}  # both objects get to be named first


def test_captions_change_with_the_spatial_relation(scenes: list[SyntheticImage]) -> None:
    for scene in scenes:
        mirrored = dataclasses.replace(scene, relation=INVERSE[scene.relation])
        assert not any(describes_relation_correctly(c, mirrored) for c in scene.captions)
        swapped = dataclasses.replace(scene, objects=scene.objects[::-1])
        assert not any(describes_relation_correctly(c, swapped) for c in scene.captions)
        left = make_captions(np.random.default_rng(0), scene.objects, "left")
        right = make_captions(np.random.default_rng(0), scene.objects, "right")
        assert not set(left) & set(right)


def test_names_objects_correctly_checks_colour_and_shape_of_both_objects(scenes: list[SyntheticImage]) -> None:
    scene = next(s for s in scenes if s.objects[0].colour != s.objects[1].colour)
    a, b = scene.objects
    wrong_colour = next(c for c in COLOURS if c not in (a.colour, b.colour))
    assert names_objects_correctly(f"a {b.colour} {b.shape} and a {a.colour} {a.shape}", scene)
    assert not names_objects_correctly(f"a {a.colour} {a.shape} next to a thing", scene)
    assert not names_objects_correctly(f"a {a.colour} {a.shape} and a {wrong_colour} {b.shape}", scene)
    assert not names_objects_correctly(f"a {a.colour} {a.shape} and a {a.colour} {a.shape}", scene)
    assert not names_objects_correctly(f"a {b.colour} {b.shape} left of a {a.colour} {a.shape} and a red circle", scene)


def test_min_freq_5_vocab_from_300_images_covers_unseen_captions() -> None:
    train = [c for i in range(300) for c in sample_scene(np.random.default_rng([0, i]), i).captions]
    held_out = [c for i in range(300, 400) for c in sample_scene(np.random.default_rng([0, i]), i).captions]
    vocab = Vocab.build(train, min_freq=5)
    assert len(vocab) < 40
    assert not (vocab.encode_batch(held_out) == vocab.unk_id).any()


def test_cli_writes_the_set_and_says_where(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "raycap.data.synthetic", "--out", str(out), "--train", "3", "--val", "2", "--seed", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )
    assert str(out) in result.stdout
    assert len(list((out / "train2017").glob("*.jpg"))) == 3
    assert sorted(load_ground_truth(out, "val")) == [4, 5]


def test_missing_ground_truth_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="python -m raycap.data.synthetic"):
        load_ground_truth(tmp_path, "train")
