"""The caption vocabulary: words <-> ids, fixed-length caption encoding, JSON files.

Captions are split by `tokenize` (raycap.data.ptb), the COCO caption toolkit's tokenization
without Java, so training targets, decoded captions and scores all use the toolkit's tokens.
`Vocab.decode` gives them space-joined (the form the scorers take); `Vocab.decode_text` joins them
for people ("a dog 's frisbee" -> "a dog's frisbee").
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from raycap.data.ptb import detokenize, tokenize

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3
_FORMAT = "raycap-vocab"


class Vocab:
    """Word <-> id mapping with the four special tokens first, and fixed-length caption encoding."""

    def __init__(self, words: Sequence[str], max_words: int = 50) -> None:
        """`words` excludes the specials; `max_words`: words kept per encoded caption, without <start>/<end>."""
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        clashes = sorted(set(words) & set(SPECIALS))
        if clashes:
            raise ValueError(f"words must not contain the special tokens {clashes}")
        counts = Counter(words)
        duplicates = sorted(word for word, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"duplicate words in vocabulary: {duplicates[:10]}")
        self.max_words = max_words
        self.itos: list[str] = [*SPECIALS, *words]
        self.stoi: dict[str, int] = {word: i for i, word in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 5, max_words: int = 50) -> Vocab:
        """Words seen at least `min_freq` times, most frequent first, ties alphabetical (deterministic)."""
        counts = Counter(token for caption in captions for token in tokenize(caption))
        kept = [word for word, count in counts.items() if count >= min_freq]
        kept.sort(key=lambda word: (-counts[word], word))
        return cls(kept, max_words=max_words)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.itos == other.itos and self.max_words == other.max_words

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, max_words={self.max_words})"

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
        """<start> + word ids (truncated to max_words, unknown -> <unk>) + <end> + <pad>...: length max_words + 2."""
        ids = [self.stoi.get(token, self.unk_id) for token in tokenize(caption)[: self.max_words]]
        ids = [self.start_id, *ids, self.end_id]
        return ids + [self.pad_id] * (self.max_words + 2 - len(ids))

    def encode_batch(self, captions: Sequence[str]) -> np.ndarray:
        """Encode each caption: (N, max_words + 2) int32."""
        out = np.full((len(captions), self.max_words + 2), self.pad_id, dtype=np.int32)  # (N, max_words + 2)
        for row, caption in enumerate(captions):
            out[row] = self.encode(caption)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens up to the first <end>, space-joined as scorers take them; <start>, <pad> skipped, <unk> kept."""
        return " ".join(self._tokens(ids))

    def decode_text(self, ids: Iterable[int]) -> str:
        """The caption for people: `decode`'s tokens detokenised ("a dog 's ball" -> "a dog's ball")."""
        return detokenize(self._tokens(ids))

    def _tokens(self, ids: Iterable[int]) -> list[str]:
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
        return words

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, "max_words": self.max_words, "words": self.itos[len(SPECIALS) :]})

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        """Parse `to_json` output; a ValueError says what is missing or malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"vocabulary is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"vocabulary JSON must be an object with 'words' and 'max_words', got {type(data).__name__}"
            )
        if "max_words" not in data and "max_len" in data:  # files written before the key was renamed
            data["max_words"] = data.pop("max_len")
        missing = [key for key in ("words", "max_words") if key not in data]
        if missing:
            raise ValueError(
                f"vocabulary JSON is missing {missing}; expected keys 'words' (list of str) and 'max_words' (int)"
            )
        words, max_words = data["words"], data["max_words"]
        if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
            raise ValueError("vocabulary JSON 'words' must be a list of strings")
        if not isinstance(max_words, int) or isinstance(max_words, bool):
            raise ValueError(f"vocabulary JSON 'max_words' must be an int, got {max_words!r}")
        return cls(words, max_words=max_words)

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
