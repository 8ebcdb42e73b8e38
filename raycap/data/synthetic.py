"""A synthetic COCO-format captioning set: two coloured shapes per image, captions naming their relation.

The files follow COCO 2017's layout and schema exactly (train2017/, val2017/, annotations/captions_*.json,
plus Karpathy's dataset_coco.json), so the real loaders read them unchanged. The Karpathy file
relates to the 2017 split as the real one does: its val, test and restval images come from a pool
(every third train2017 image and all of val2017, like val2014), so at the default sizes most of its
test images are in train2017: training on COCO 2017's train split and testing on Karpathy's test
leaks, as it would on COCO. Captions say which object is where, so a decoder that attends to the
right region beats one that does not. Everything is deterministic in the seed: the same seed gives
byte-identical files.

    python -m raycap.data.synthetic --out data/synthetic
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from raycap.config import Parser
from raycap.data.coco import coco_files
from raycap.data.vocab import tokenize

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 160, 65),
    "blue": (40, 75, 215),
    "yellow": (240, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTION = {"small": 0.18, "large": 0.36}  # of the shorter image side
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")  # objects[0] relative to objects[1]
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
YEAR = 2017
MIN_SIDE, MAX_SIDE = 160, 320
CAPTIONS_PER_IMAGE = 5
POOL_DEAL = ("restval", "test", "restval", "val")  # Karpathy splits dealt over the val2014-like pool
JPEG_QUALITY = 90

# "{s}" is the subject, "{o}" the reference object; the relation phrase says where the subject is.
_LONG = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_SHORT = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_PRONOUN = {"left": "on its left", "right": "on its right", "above": "above it", "below": "below it"}
_TEMPLATES = (
    "a {s} {long} a {o}",
    "a {s} {short} a {o}",
    "the {s} is {long} the {o}",
    "a {s} sits {long} a {o}",
    "there is a {o} and a {s} {pronoun}",
    "a {o} with a {s} {pronoun}",
)


@dataclass(frozen=True)
class SyntheticObject:
    """One drawn shape; bbox is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    colour: str
    shape: str
    size: str
    bbox: tuple[int, int, int, int]

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class SyntheticImage:
    """Ground truth of one image: `relation` is where objects[0] is relative to objects[1]."""

    image_id: int
    file_name: str
    width: int
    height: int
    objects: tuple[SyntheticObject, SyntheticObject]
    relation: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class SyntheticSet:
    """Where `generate` wrote the data set (COCO 2017 layout under root)."""

    root: Path
    train_captions: Path  # annotations/captions_train2017.json
    val_captions: Path  # annotations/captions_val2017.json
    train_objects: Path  # annotations/synthetic_objects_train2017.json (ground truth)
    val_objects: Path
    karpathy_split: Path  # dataset_coco.json with train, restval, val and test (`karpathy_splits`)


def make_captions(
    rng: np.random.Generator, objects: tuple[SyntheticObject, SyntheticObject], relation: str
) -> tuple[str, ...]:
    """CAPTIONS_PER_IMAGE distinct captions, each template told from either object's point of view."""
    views = ((objects[0], objects[1], relation), (objects[1], objects[0], INVERSE[relation]))
    pool = list(  # dict.fromkeys drops repeats (long and short phrases coincide for above/below), keeps order
        dict.fromkeys(
            template.format(
                s=subject.phrase, o=reference.phrase, long=_LONG[rel], short=_SHORT[rel], pronoun=_PRONOUN[rel]
            )
            for template in _TEMPLATES
            for subject, reference, rel in views
        )
    )
    picks = rng.choice(len(pool), size=CAPTIONS_PER_IMAGE, replace=False)
    return tuple(pool[i][0].upper() + pool[i][1:] + "." for i in picks)  # COCO-like: "A small ... square."


def sample_scene(rng: np.random.Generator, image_id: int) -> SyntheticImage:
    """Image size, two distinct objects in disjoint halves, their relation and captions."""
    width, height = (int(side) for side in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    first = (SIZES[rng.integers(len(SIZES))], *_colour_shape(rng))
    second = first
    while second == first:  # the two objects must be told apart by size, colour or shape
        second = (SIZES[rng.integers(len(SIZES))], *_colour_shape(rng))
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    boxes = _place(rng, width, height, SIZE_FRACTION[first[0]], SIZE_FRACTION[second[0]], relation)
    objects = tuple(
        SyntheticObject(colour=colour, shape=shape, size=size, bbox=box)
        for (size, colour, shape), box in zip((first, second), boxes)
    )
    return SyntheticImage(
        image_id=image_id,
        file_name=f"{image_id:012d}.jpg",
        width=width,
        height=height,
        objects=objects,
        relation=relation,
        captions=make_captions(rng, objects, relation),
    )


def render(rng: np.random.Generator, scene: SyntheticImage) -> Image.Image:
    """Draw the scene on a light, tinted background, then add mild pixel noise."""
    background = tuple(int(c) for c in rng.integers(205, 250, size=3))
    image = Image.new("RGB", (scene.width, scene.height), background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        box = (x0, y0, x1 - 1, y1 - 1)  # PIL boxes are inclusive
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=colour)
    noise = rng.normal(0.0, 5.0, size=(scene.height, scene.width, 3))  # (H, W, 3)
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def make_image(rng: np.random.Generator, image_id: int) -> tuple[Image.Image, SyntheticImage]:
    """One random scene and its picture."""
    scene = sample_scene(rng, image_id)
    return render(rng, scene), scene


def generate(root: str | Path, n_train: int = 400, n_val: int = 100, seed: int = 0) -> SyntheticSet:
    """Write the data set under root (COCO 2017 layout); image ids 1..n_train train, then val."""
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ids = {"train": range(1, n_train + 1), "val": range(n_train + 1, n_train + n_val + 1)}
    scenes: dict[str, list[SyntheticImage]] = {}
    paths: dict[str, tuple[Path, Path]] = {}
    next_annotation_id = 1  # annotation ids are unique across splits, as in COCO
    for split, split_ids in ids.items():
        captions_file, image_dir = (Path(p) for p in coco_files(str(root), split, YEAR))
        image_dir.mkdir(exist_ok=True)
        scenes[split] = []
        for image_id in split_ids:
            # One generator per image: an image does not change with the set's size.
            image, scene = make_image(np.random.default_rng([seed, image_id]), image_id)
            image.save(image_dir / scene.file_name, format="JPEG", quality=JPEG_QUALITY)
            scenes[split].append(scene)
        objects_file = root / "annotations" / f"synthetic_objects_{split}{YEAR}.json"
        _write_json(captions_file, _coco_captions(scenes[split], next_annotation_id))
        _write_json(objects_file, {"images": [_scene_to_json(scene) for scene in scenes[split]]})
        next_annotation_id += sum(len(scene.captions) for scene in scenes[split])
        paths[split] = (captions_file, objects_file)
    karpathy_file = root / "dataset_coco.json"
    _write_json(karpathy_file, _karpathy(scenes["train"], scenes["val"]))
    return SyntheticSet(
        root=root,
        train_captions=paths["train"][0],
        val_captions=paths["val"][0],
        train_objects=paths["train"][1],
        val_objects=paths["val"][1],
        karpathy_split=karpathy_file,
    )


def karpathy_splits(train_ids: Sequence[int], val_ids: Sequence[int]) -> dict[int, str]:
    """Karpathy split of each image id, from its train2017 and val2017 ids.

    Like val2014 in the real file, a pool (every train2017 id divisible by 3, then all of val2017, in
    id order) is dealt out as restval, test, restval, val, ...; the other train2017 images are train.
    """
    pool = [i for i in train_ids if i % 3 == 0] + list(val_ids)
    splits = {i: "train" for i in train_ids}
    splits.update({image_id: POOL_DEAL[n % len(POOL_DEAL)] for n, image_id in enumerate(pool)})
    return splits


def load_ground_truth(root: str | Path, split: str) -> dict[int, SyntheticImage]:
    """The objects and relation of every image of a split ("train" or "val"), by image id."""
    path = Path(root) / "annotations" / f"synthetic_objects_{split}{YEAR}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"synthetic ground truth not found: {path}; write it with `python -m raycap.data.synthetic --out {root}`"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return {entry["image_id"]: _scene_from_json(entry) for entry in data["images"]}


def names_objects_correctly(caption: str, image: SyntheticImage) -> bool:
    """True when the caption's colour-shape mentions are exactly the image's objects' colours and shapes.

    A mention is a colour word directly followed by a shape word ("red circle", also in "small red
    circle"). The multiset of mentions must equal the objects' (colour, shape) pairs: both objects
    named, nothing else named. Sizes, order and the relation are not checked (see
    `describes_relation_correctly`).
    """
    mentions = sorted((colour, shape) for _, colour, shape in _mentions(tokenize(caption)))
    return mentions == sorted((obj.colour, obj.shape) for obj in image.objects)


def describes_relation_correctly(caption: str, image: SyntheticImage) -> bool:
    """True when the caption names both objects in full (size, colour, shape) and says where they are.

    Checked: exactly two mentions, which are the two objects (in either order), exactly one relation
    word (left/right/above/below), and that word true of the first-named object relative to the
    second - or of the second relative to the first when it is phrased with "it"/"its"
    ("a blue square with a red circle on its left").
    """
    tokens = tokenize(caption)
    mentions = _mentions(tokens)
    truth = [(obj.size, obj.colour, obj.shape) for obj in image.objects]
    words = [token for token in tokens if token in RELATIONS]
    if len(mentions) != 2 or sorted(mentions, key=str) != sorted(truth, key=str) or len(words) != 1:
        return False
    relation = words[0] if not {"it", "its"} & set(tokens) else INVERSE[words[0]]  # first-named vs second
    return relation == (image.relation if mentions[0] == truth[0] else INVERSE[image.relation])


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write the synthetic set and print where its files went."""
    defaults = {name: p.default for name, p in inspect.signature(generate).parameters.items()}
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (COCO 2017 layout is written inside)")
    parser.add_argument("--train", type=int, default=defaults["n_train"], help="number of train2017 images")
    parser.add_argument("--val", type=int, default=defaults["n_val"], help="number of val2017 images")
    parser.add_argument(
        "--seed", type=int, default=defaults["seed"], help="random seed; the same seed gives identical files"
    )
    args = parser.parse_args(argv)
    out = generate(args.out, n_train=args.train, n_val=args.val, seed=args.seed)
    print(f"wrote {args.train} train and {args.val} val images under {out.root}")
    for name in ("train_captions", "val_captions", "train_objects", "val_objects", "karpathy_split"):
        print(f"{name}: {getattr(out, name)}")


def _colour_shape(rng: np.random.Generator) -> tuple[str, str]:
    colours = list(COLOURS)
    return colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]


def _place(
    rng: np.random.Generator, width: int, height: int, fraction0: float, fraction1: float, relation: str
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Boxes for objects 0 and 1 such that object 0 is `relation` of object 1.

    The objects sit in opposite halves along the relation's axis (so they never overlap) and near the
    middle across it, so the offset along the axis always exceeds the offset across it.
    """
    short = min(width, height)
    horizontal = relation in ("left", "right")
    along, across = (width, height) if horizontal else (height, width)
    sides = [round(fraction * short * rng.uniform(0.92, 1.08)) for fraction in (fraction0, fraction1)]
    margin, gap = round(0.04 * short), round(0.04 * short)
    before = 0 if relation in ("left", "above") else 1  # the object nearer x=0 (or y=0)
    boxes = []
    for i, side in enumerate(sides):
        if i == before:
            low, high = margin, along // 2 - gap // 2 - side
        else:
            low, high = along // 2 + gap // 2, along - margin - side
        start_along = int(rng.integers(low, high + 1))
        centre_across = across / 2 + rng.uniform(-0.08, 0.08) * short
        start_across = round(centre_across - side / 2)
        if horizontal:
            boxes.append((start_along, start_across, start_along + side, start_across + side))
        else:
            boxes.append((start_across, start_along, start_across + side, start_along + side))
    return boxes[0], boxes[1]


def _mentions(tokens: list[str]) -> list[tuple[str | None, str, str]]:
    """(size or None, colour, shape) for every colour word directly followed by a shape word."""
    found = []
    for i in range(len(tokens) - 1):
        if tokens[i] in COLOURS and tokens[i + 1] in SHAPES:
            size = tokens[i - 1] if i > 0 and tokens[i - 1] in SIZES else None
            found.append((size, tokens[i], tokens[i + 1]))
    return found


def _coco_captions(scenes: list[SyntheticImage], first_annotation_id: int) -> dict[str, Any]:
    """COCO 2017 captions schema: info, licenses, images, annotations."""
    images = [
        {
            "id": scene.image_id,
            "file_name": scene.file_name,
            "width": scene.width,
            "height": scene.height,
            "license": 1,
            "date_captured": "2017-01-01 00:00:00",
            "coco_url": "",
            "flickr_url": "",
        }
        for scene in scenes
    ]
    pairs = [(scene.image_id, caption) for scene in scenes for caption in scene.captions]
    annotations = [
        {"id": first_annotation_id + i, "image_id": image_id, "caption": caption}
        for i, (image_id, caption) in enumerate(pairs)
    ]
    return {
        "info": {
            "description": "raycap synthetic shapes (COCO 2017 captions format)",
            "url": "",
            "version": "1.0",
            "year": YEAR,
            "contributor": "raycap",
            "date_created": "2017/01/01",
        },
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
    }


def _karpathy(train: list[SyntheticImage], val: list[SyntheticImage]) -> dict[str, Any]:
    """Karpathy's dataset_coco.json; adds width/height, which the loader reads when present."""
    splits = karpathy_splits([s.image_id for s in train], [s.image_id for s in val])
    tagged = [(scene, f"train{YEAR}") for scene in train] + [(scene, f"val{YEAR}") for scene in val]
    images, sentence_id = [], 0
    for imgid, (scene, filepath) in enumerate(tagged):
        sentence_ids = list(range(sentence_id, sentence_id + len(scene.captions)))
        sentence_id += len(scene.captions)
        images.append(
            {
                "filepath": filepath,
                "filename": scene.file_name,
                "imgid": imgid,
                "split": splits[scene.image_id],
                "cocoid": scene.image_id,
                "width": scene.width,
                "height": scene.height,
                "sentids": sentence_ids,
                "sentences": [
                    {"tokens": tokenize(raw), "raw": raw, "imgid": imgid, "sentid": sid}
                    for sid, raw in zip(sentence_ids, scene.captions)
                ],
            }
        )
    return {"dataset": "coco", "images": images}


def _scene_to_json(scene: SyntheticImage) -> dict[str, Any]:
    return {
        "image_id": scene.image_id,
        "file_name": scene.file_name,
        "width": scene.width,
        "height": scene.height,
        "objects": [
            {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "bbox": list(obj.bbox)}
            for obj in scene.objects
        ],
        "relation": scene.relation,
        "captions": list(scene.captions),
    }


def _scene_from_json(entry: dict[str, Any]) -> SyntheticImage:
    objects = tuple(
        SyntheticObject(colour=obj["colour"], shape=obj["shape"], size=obj["size"], bbox=tuple(obj["bbox"]))
        for obj in entry["objects"]
    )
    return SyntheticImage(
        image_id=entry["image_id"],
        file_name=entry["file_name"],
        width=entry["width"],
        height=entry["height"],
        objects=objects,
        relation=entry["relation"],
        captions=tuple(entry["captions"]),
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
