"""When an output's rows were published: a thread lists a folder and notes when each shard appears.

Shards are published whole (`raycap.storage.write_bytes` renames a hidden temp file), so a listed
shard is complete. The same clock times both sides of a benchmark, from outside either.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from types import TracebackType

import pyarrow.parquet as pq


@dataclass(frozen=True)
class Timing:
    """One run's figures: start-up (to its first shard), steady state (between first and last) and end to end."""

    rows: int
    startup_s: float  # start to the first published shard
    steady_images_per_s: float  # rows after the first shard / time from the first shard to the last
    elapsed_s: float  # start to end

    @property
    def images_per_s(self) -> float:
        return self.rows / self.elapsed_s


class ShardClock:
    """Notes the first time each `*.parquet` / `*.jsonl` file in `folder` is listed (every `interval_s`)."""

    def __init__(self, folder: str, interval_s: float = 0.02) -> None:
        self.folder, self.interval_s = folder, interval_s
        self.seen: dict[str, float] = {}  # file name -> epoch seconds when first listed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ShardClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()  # a shard published in the last interval

    def _scan(self) -> None:
        now = time.time()
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith((".parquet", ".jsonl")) and not name.startswith("."):
                self.seen.setdefault(name, now)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._scan()

    def timing(self, start: float, end: float) -> Timing:
        """Figures for a run from `start` to `end` (epoch seconds) that published the shards seen."""
        if not self.seen:
            raise RuntimeError(f"no shard was published under {self.folder}")
        shards = sorted((t, _rows(os.path.join(self.folder, name))) for name, t in self.seen.items())
        (first, first_rows), last = shards[0], shards[-1][0]
        rows = sum(n for _, n in shards)
        steady = (rows - first_rows) / (last - first) if last > first else float("nan")
        return Timing(rows=rows, startup_s=first - start, steady_images_per_s=steady, elapsed_s=end - start)


def _rows(path: str) -> int:
    if path.endswith(".parquet"):
        return pq.read_metadata(path).num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
