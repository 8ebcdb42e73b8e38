"""What Ray Data runs on each batch of feature extraction: decode (tasks), encode (actors), write (sink).

Plain callables and a Datasink: tests call them directly, without a Ray cluster.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from raycap import feature_store as fstore
from raycap import storage
from raycap.data.images import load_images
from raycap.feature_store import FeatureSpec

if TYPE_CHECKING:
    from ray.data._internal.execution.interfaces import TaskContext  # Datasink.write's argument type

Batch = dict[str, np.ndarray]


def decode_batch(batch: Batch, image_size: int, max_pixels: int) -> Batch:
    """Read, decode and resize each image (`load_images`); an unusable one gets an `error` reason
    instead of a crash. Adds image (B, S, S, 3) uint8, width, height, converted_from (original mode
    or ""), error ("" if ok)."""
    images, decoded, errors = load_images(batch["key"], storage.read_bytes, image_size, max_pixels)
    widths = np.array([d.width if d else 0 for d in decoded], np.int32)  # (B,)
    heights = np.array([d.height if d else 0 for d in decoded], np.int32)  # (B,)
    # "" rather than None: an all-None object column would lose its string type in Arrow.
    converted = np.array([(d.converted_from or "") if d else "" for d in decoded], dtype=object)  # (B,)
    return {**batch, "image": images, "width": widths, "height": heights, "converted_from": converted, "error": errors}


class FeatureEncoder:
    """Stateful batch function: loads the encoder once, then encodes the decodable rows of each batch
    at the spec's stored grid (pooled on the encoder's device, in float32, when not the native one)."""

    def __init__(self, spec: FeatureSpec, torch_threads: int | None = None) -> None:
        import torch  # here, not at the top: decode tasks and the sink import this module, and need no torch

        from raycap.models.encoder import Encoder

        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = Encoder(spec.encoder).to(device)
        self.spec = spec
        self.dtype = getattr(torch, spec.dtype)  # cast on the encoder's device: fewer bytes to copy back

    def __call__(self, batch: Batch) -> Batch:
        from raycap.models.encoder import pool_to_grid  # loaded by __init__

        ok = batch["error"] == ""  # (B,) bool
        features = np.zeros((len(ok), *self.spec.shape), self.spec.dtype)  # (B, P, C); failed rows stay 0
        if ok.any():
            encoded = pool_to_grid(self.encoder.encode(batch["image"][ok]), self.spec.stored_grid)  # (N, P, C) float32
            features[ok] = encoded.to(self.dtype).cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        return {**out, "features": features}


class FeatureSink(Datasink[dict[str, Counter]]):
    """Writes each block's rows per split: good rows to features/, failed ones to errors/."""

    def __init__(self, out: str, spec: FeatureSpec, rows_per_shard: int) -> None:
        self.out, self.spec, self.rows_per_shard = out, spec, rows_per_shard
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"  # shard names never collide
        self.counts: dict[str, Counter] = {}

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> dict[str, Counter]:
        table = pa.concat_tables([BlockAccessor.for_block(block).to_arrow() for block in blocks])
        name = f"part-{self.run_id}-{ctx.task_idx:05d}.parquet"
        counts = {}
        for split in pc.unique(table.column("split")).to_pylist():
            rows = table.filter(pc.equal(table.column("split"), split))
            counts[split] = self._write_split(rows, split, name)
        return counts

    def _write_split(self, rows: pa.Table, split: str, name: str) -> Counter:
        is_ok = pc.equal(rows.column("error"), "")
        failed, good = rows.filter(pc.invert(is_ok)), rows.filter(is_ok)
        counts = Counter(ok=len(good), failed=len(failed))
        if len(good):
            features = BlockAccessor.for_block(good.select(["features"])).to_numpy("features")  # (N, P, C)
            table = fstore.features_table(
                self.spec,
                good.column("image_id").to_numpy(),
                good.column("key").to_pylist(),
                good.column("width").to_numpy(),
                good.column("height").to_numpy(),
                [mode or None for mode in good.column("converted_from").to_pylist()],
                features,
            )
            fstore.write_table(table, storage.join(fstore.features_dir(self.out, split), name))
        if len(failed):
            keys, reasons = failed.column("key").to_pylist(), failed.column("error").to_pylist()
            table = fstore.errors_table(keys, failed.column("image_id").to_numpy(), reasons)
            fstore.write_table(table, storage.join(fstore.errors_dir(self.out, split), name))
        return counts

    def on_write_complete(self, write_result: WriteResult[dict[str, Counter]]) -> None:
        for result in write_result.write_returns:
            for split, counts in result.items():
                self.counts.setdefault(split, Counter()).update(counts)
