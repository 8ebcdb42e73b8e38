"""COCO caption annotations (via pycocotools) and the Karpathy split, as one record per image.

Image paths are joined with "/" so that `image_root` may be a local folder or an s3://bucket/prefix
URI. Images without any usable caption are still returned: feature extraction needs every image,
training filters them out.

Bad input fails here, naming the file and entry, rather than deep in extraction or training:
missing keys, non-integer ids and duplicate image ids are errors; empty captions (no word at all,
e.g. only punctuation), captions of unlisted images and repeated annotation ids are warnings.
Image files are not opened here (that would mean a request per image on S3): extraction records
a missing or undecodable one as an error row and goes on.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from raycap.data.vocab import tokenize

SPLITS = ("train", "val", "test", "restval")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its reference captions."""

    image_id: int
    path: str  # image_root + "/" + file name (local path or s3:// URI)
    width: int  # 0 where the source does not record it (Karpathy files usually don't)
    height: int
    captions: tuple[str, ...]  # stripped, each with a word; may be empty for an image without captions
    split: str  # one of SPLITS


def coco_files(root: str, split: str, year: int = 2017) -> tuple[str, str]:
    """COCO's layout: (root/annotations/captions_{split}{year}.json, root/{split}{year})."""
    return _join(root, "annotations", f"captions_{split}{year}.json"), _join(root, f"{split}{year}")


def load_coco_captions(annotation_file: str | Path, image_root: str, split: str) -> list[ImageRecord]:
    """Read a COCO captions file (e.g. captions_train2017.json) into records sorted by image id."""
    _check_splits([split])
    source = str(annotation_file)
    data = _read_json(annotation_file, "COCO caption annotation file")
    images = _list_field(data, "images", source)
    annotations = _list_field(data, "annotations", source)
    for i, image in enumerate(images):
        keys = ("id", "file_name", "width", "height")
        _require(image, keys, f"{source}: images[{i}]", ints=("id", "width", "height"))
    for i, annotation in enumerate(annotations):
        _require(annotation, ("id", "image_id", "caption"), f"{source}: annotations[{i}]", ints=("image_id",))
    _check_unique((image["id"] for image in images), source)
    _warn_duplicate_annotation_ids(annotations, source)

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()

    orphans = {annotation["image_id"] for annotation in annotations} - set(coco.imgs)
    if orphans:
        warnings.warn(
            f"{source}: captions refer to {len(orphans)} image id(s) not listed in 'images' "
            f"(e.g. {sorted(orphans)[:5]}); those captions are ignored",
            stacklevel=2,
        )
    records = []
    for image_id in sorted(coco.getImgIds()):
        (image,) = coco.loadImgs(image_id)
        # imgToAnns holds the annotations themselves; loadAnns(getAnnIds()) would look them up by
        # annotation id and give one image another's caption where ids repeat.
        raw = [annotation["caption"] for annotation in coco.imgToAnns[image_id]]
        records.append(
            ImageRecord(
                image_id=int(image_id),
                path=_join(image_root, image["file_name"]),
                width=int(image["width"]),
                height=int(image["height"]),
                captions=_clean_captions(raw, image_id, source),
                split=split,
            )
        )
    return records


def load_karpathy_split(
    split_file: str | Path, image_root: str, splits: Sequence[str] = ("train", "restval")
) -> list[ImageRecord]:
    """Read Karpathy's dataset_coco.json, keeping images in `splits`; path = image_root/filepath/filename."""
    _check_splits(splits)
    source = str(split_file)
    data = _read_json(split_file, "Karpathy split file")
    entries = _list_field(data, "images", source)
    for i, entry in enumerate(entries):
        _require(
            entry, ("filepath", "filename", "cocoid", "split", "sentences"), f"{source}: images[{i}]", ints=("cocoid",)
        )
    _check_unique((entry["cocoid"] for entry in entries), source)

    records = []
    for entry in entries:
        if entry["split"] not in splits:
            continue
        image_id = int(entry["cocoid"])
        raw = [sentence.get("raw") if isinstance(sentence, Mapping) else None for sentence in entry["sentences"]]
        records.append(
            ImageRecord(
                image_id=image_id,
                path=_join(image_root, entry["filepath"], entry["filename"]),
                width=int(entry.get("width", 0)),
                height=int(entry.get("height", 0)),
                captions=_clean_captions(raw, image_id, source),
                split=entry["split"],
            )
        )
    return sorted(records, key=lambda record: record.image_id)


def _join(root: str, *parts: str) -> str:
    """Join with "/" (never os.path.join: it would mangle s3:// URIs on some platforms)."""
    root = str(root)
    return "/".join([root.rstrip("/"), *parts]) if root else "/".join(parts)


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid UTF-8 JSON: {exc}") from None


def _list_field(data: Any, key: str, source: str) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{source}: expected a JSON object with a list under '{key}'")
    return data[key]


def _require(item: Any, keys: Sequence[str], where: str, ints: Sequence[str] = ()) -> None:
    """`item` is an object with `keys`, of which `ints` hold JSON integers."""
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(item).__name__}")
    missing = [key for key in keys if key not in item]
    if missing:
        raise ValueError(f"{where} is missing {missing} (needs {list(keys)})")
    for key in ints:
        if not isinstance(item[key], int) or isinstance(item[key], bool):
            raise ValueError(f"{where}: '{key}' must be an integer, got {item[key]!r}")


def _check_unique(image_ids: Iterable[Any], source: str) -> None:
    duplicates = sorted(image_id for image_id, count in Counter(image_ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"{source}: duplicate image id {duplicates[0]} ({len(duplicates)} duplicated in all)")


def _warn_duplicate_annotation_ids(annotations: list[dict[str, Any]], source: str) -> None:
    """Repeated annotation ids are harmless here (captions go by image_id) but a sign of a merged or edited file."""
    duplicates = sorted(i for i, count in Counter(repr(a["id"]) for a in annotations).items() if count > 1)
    if duplicates:
        warnings.warn(
            f"{source}: annotation id {duplicates[0]} is used more than once ({len(duplicates)} repeated ids); "
            "each caption is kept with its own image_id",
            stacklevel=3,
        )


def _check_splits(splits: Iterable[str]) -> None:
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {list(SPLITS)}")


def _clean_captions(raw: Iterable[Any], image_id: int, source: str) -> tuple[str, ...]:
    """Strip captions; drop non-string ones and those without a word (blank, only punctuation or emoji)
    with a warning naming the image: they would train the decoder to say nothing."""
    raw = list(raw)
    captions = tuple(caption.strip() for caption in raw if isinstance(caption, str) and tokenize(caption))
    if len(captions) < len(raw):
        warnings.warn(
            f"{source}: image {image_id}: dropped {len(raw) - len(captions)} empty caption(s) (no words)", stacklevel=3
        )
    return captions
