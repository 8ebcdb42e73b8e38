"""Which images a run trains on, selects on and reports on, and what a checkpoint keeps of that.

A split reference names a split of extracted features (`features/{name}/`), whole or one half of
it by image id parity: "val", "val:even", "val:odd". A run gives them three roles:

* train splits: what the decoder learns from (Karpathy: train + restval);
* the selection split: lr decay, early stopping and the best checkpoint are chosen on its scores,
  so those scores are optimistic;
* the report split: scored once, by jobs/evaluate.py, for the figures one reports.

COCO 2017 publishes no test captions, so its default halves val2017 by image id: even ids select,
odd ids report (deterministic, and anyone can redo it from the annotation file). A checkpoint keeps
its roles and the ids of every image its train splits offered (`TrainingData`), so evaluation can
refuse a split that shares images with them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HALVES = ("even", "odd")
KARPATHY = (("train", "restval"), "val", "test")  # train splits, selection split, report split
COCO2017 = (("train",), "val:even", "val:odd")


@dataclass(frozen=True)
class SplitRef:
    """A split of extracted features, or the half of it whose image ids are even or odd."""

    name: str
    half: str | None = None  # "even", "odd" or None (the whole split)

    @classmethod
    def parse(cls, text: str) -> SplitRef:
        name, _, half = text.partition(":")
        if not name or (half and half not in HALVES) or (_ and not half):
            raise ValueError(f"split {text!r}: expected a split name, optionally with :even or :odd (e.g. val:even)")
        return cls(name, half or None)

    def __str__(self) -> str:
        return f"{self.name}:{self.half}" if self.half else self.name

    def keep(self, image_ids: np.ndarray) -> np.ndarray:
        """Mask (N,) bool of the ids (N,) that belong to this split's half (all of them for a whole split)."""
        if self.half is None:
            return np.ones(len(image_ids), dtype=bool)
        return (np.asarray(image_ids) % 2 == 0) == (self.half == "even")

    def overlaps(self, other: SplitRef) -> bool:
        """True when the two may share images: the same split, unless they are its two halves."""
        return self.name == other.name and (self.half is None or other.half is None or self.half == other.half)


def check_roles(train_splits: Sequence[str], select_split: str, report_split: str) -> None:
    """Raise ValueError unless the three roles parse and no two of them name the same images."""
    if not train_splits:
        raise ValueError("train_splits is empty: name at least one split to train on")
    train = [SplitRef.parse(s) for s in train_splits]
    select, report = SplitRef.parse(select_split), SplitRef.parse(report_split)
    for role, ref in (("select_split", select), ("report_split", report)):
        clash = [str(t) for t in train if t.overlaps(ref)]
        if clash:
            raise ValueError(f"{role} {ref} shares images with train split {clash[0]}: the roles must be disjoint")
    if select.overlaps(report):
        raise ValueError(
            f"select_split {select} and report_split {report} share images: scores chosen on a split "
            "overstate it; report on another split or the other half (e.g. val:even / val:odd)"
        )


def ids_digest(image_ids: np.ndarray) -> str:
    """SHA-256 of the sorted unique ids as little-endian int64: the same set gives the same digest."""
    return hashlib.sha256(np.unique(np.asarray(image_ids, dtype="<i8")).tobytes()).hexdigest()


@dataclass(frozen=True)
class TrainingData:
    """What a checkpoint was trained and selected on."""

    features: str  # extraction output root (folder or s3:// prefix)
    train_splits: tuple[str, ...]
    select_split: str
    report_split: str
    train_ids: np.ndarray  # (N,) int64, sorted unique: every image the train splits offered
    select_ids: np.ndarray  # (S,) int64, sorted unique

    def describe(self) -> str:
        return f"{'+'.join(self.train_splits)} of {self.features}"
