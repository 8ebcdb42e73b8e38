"""Tokenisation and the caption vocabulary.

Non-ASCII captions: text is NFKC-normalised (composed accents, full-width letters folded) and
lower-cased; a word is a run of Unicode letters and digits with their combining marks ("très",
"gâteau", "बिल्ली" stay whole), with one optional apostrophe suffix as in English ("man's", also
with the typographic ’). Punctuation and symbols (—, «», emoji) separate words and are dropped.
CJK ideographs, which are written without spaces, are one token each, as BERT's basic tokenizer
does ("黑猫" -> "黑", "猫"), so `Vocab.decode` joins them with spaces. ASCII text takes a fast path
that gives the same tokens.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

_ASCII_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# CJK Unified Ideographs, extension A, compatibility ideographs, extensions B-F (BERT's ranges).
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3
_FORMAT = "raycap-vocab"


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens, punctuation dropped (see the module doc for non-ASCII); no downloaded data needed."""
    if text.isascii():
        return _ASCII_TOKEN.findall(text.lower())
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    return _unicode_token().findall(_CJK.sub(r" \g<0> ", text))


@functools.cache
def _unicode_token() -> re.Pattern[str]:
    """The ASCII pattern over all scripts: letters/digits plus combining marks (`re` has no \\p{M}: built once)."""
    ranges, start = [], None
    for code in range(sys.maxunicode + 2):
        is_mark = code <= sys.maxunicode and unicodedata.category(chr(code)).startswith("M")
        if is_mark and start is None:
            start = code
        elif not is_mark and start is not None:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(code - 1))}")
            start = None
    mark = "".join(ranges)
    return re.compile(f"[^\\W_](?:[^\\W_]|[{mark}])*(?:'(?:[^\\W\\d_]|[{mark}])+)?")


class Vocab:
    """Word <-> id mapping with the four special tokens first, and fixed-length caption encoding."""

    def __init__(self, words: Sequence[str], max_len: int = 50) -> None:
        """`words` excludes the specials; `max_len` counts words, without <start>/<end>."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        clashes = sorted(set(words) & set(SPECIALS))
        if clashes:
            raise ValueError(f"words must not contain the special tokens {clashes}")
        counts = Counter(words)
        duplicates = sorted(word for word, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"duplicate words in vocabulary: {duplicates[:10]}")
        self.max_len = max_len
        self.itos: list[str] = [*SPECIALS, *words]
        self.stoi: dict[str, int] = {word: i for i, word in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5, max_len: int = 50) -> Vocab:
        """Words seen at least `min_freq` times, most frequent first, ties alphabetical (deterministic)."""
        counts = Counter(token for caption in captions for token in tokenize(caption))
        kept = [word for word, count in counts.items() if count >= min_freq]
        kept.sort(key=lambda word: (-counts[word], word))
        return cls(kept, max_len=max_len)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.itos == other.itos and self.max_len == other.max_len

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, max_len={self.max_len})"

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return 1

    @property
    def end_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def encode(self, caption: str) -> list[int]:
        """<start> + word ids (truncated to max_len, unknown -> <unk>) + <end> + <pad>...: length max_len + 2."""
        ids = [self.stoi.get(token, self.unk_id) for token in tokenize(caption)[: self.max_len]]
        ids = [self.start_id, *ids, self.end_id]
        return ids + [self.pad_id] * (self.max_len + 2 - len(ids))

    def encode_batch(self, captions: Sequence[str]) -> np.ndarray:
        """Encode each caption: (N, max_len + 2) int32."""
        out = np.full((len(captions), self.max_len + 2), self.pad_id, dtype=np.int32)  # (N, max_len + 2)
        for row, caption in enumerate(captions):
            out[row] = self.encode(caption)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <end>; <start> and <pad> skipped, <unk> kept."""
        words = []
        for raw in ids:
            i = int(raw)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self.itos)})")
            words.append(self.itos[i])
        return " ".join(words)

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, "max_len": self.max_len, "words": self.itos[len(SPECIALS) :]})

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        """Parse `to_json` output; a ValueError says what is missing or malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"vocabulary is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"vocabulary JSON must be an object with 'words' and 'max_len', got {type(data).__name__}")
        missing = [key for key in ("words", "max_len") if key not in data]
        if missing:
            raise ValueError(
                f"vocabulary JSON is missing {missing}; expected keys 'words' (list of str) and 'max_len' (int)"
            )
        words, max_len = data["words"], data["max_len"]
        if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
            raise ValueError("vocabulary JSON 'words' must be a list of strings")
        if not isinstance(max_len, int) or isinstance(max_len, bool):
            raise ValueError(f"vocabulary JSON 'max_len' must be an int, got {max_len!r}")
        return cls(words, max_len=max_len)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
