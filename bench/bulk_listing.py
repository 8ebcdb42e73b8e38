"""Bulk captioning's listing and planning in bounded memory: the driver's peak RSS and keys/s.

Every case runs the job's own planning, `raycap.bulk.plan` (the output's progress record, then the
listing after its watermark cut into chunks and windows), in a fresh child process, so its peak RSS
(ru_maxrss) is its own:
  real      `storage.list_pages` over --real small objects on a loopback SeaweedFS S3 server, as a
            dry run lists. Setup, timed apart as setup_s: the files are written to a local folder
            and copied into the bucket by `weed filer.copy`.
  N keys    for each --fake size, a PagedListing: ListObjectsV2-like pages of 1,000 generated keys in
            lexicographic order, each naming the continuation token of the next, StartAfter honoured.
            Each chunk is committed in memory as it comes (Progress.advance), and the progress
            record is saved when the listing passes --kill-at of the keys: the last record before
            a kill. This source is for memory only (exactly-once: tests/test_bulk_listing.py).
  resume    a rerun of the largest case from that record: it lists after the watermark only.
ratio = peak RSS at the largest --fake size / at the smallest (goal: the growth from 1M to 10M keys
<= 100 MB); keys_per_s_real: listing and planning on the real server (goal: >= 20,000).

    python bench/bulk_listing.py [--real 200000] [--fake 1000000 10000000] [--kill-at 0.6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench"
PAGE = 1000  # keys per ListObjectsV2 page


class PagedListing:
    """`n` generated keys under s3://bench/photos, listed as S3 lists them: pages of up to 1,000 keys
    in lexicographic order, each naming the continuation token of the next; StartAfter seeks."""

    def __init__(self, n: int) -> None:
        self.n = n

    @staticmethod
    def key(i: int) -> str:
        return f"photos/{i // 1000:07d}/{i:010d}.jpg"  # zero-padded: index order is lexicographic order

    def list_objects_v2(self, start_after: str | None, token: str | None) -> tuple[list[tuple[str, int]], str | None]:
        """One page: (key, size) pairs, and the continuation token of the next page (None: the last)."""
        if token is not None:
            first = int(token)
        elif start_after is not None:
            first = int(start_after.rsplit("/", 1)[1].removesuffix(".jpg")) + 1  # keys are dense
        else:
            first = 0
        end = min(first + PAGE, self.n)
        return [(self.key(i), 1_000 + i % 5_000) for i in range(first, end)], (str(end) if end < self.n else None)

    def pages(self, source: str, start_after: str | None) -> Iterator[list]:
        """What `raycap.bulk.plan` takes as `list_pages`: FileInfo pages, as storage.list_pages gives them."""
        from raycap.storage import FileInfo

        base = f"s3://{BUCKET}/"
        assert source == base + "photos", source
        start, token = (start_after[len(base) :] if start_after else None), None
        while True:
            contents, token = self.list_objects_v2(start, token)
            yield [FileInfo(base + key, size) for key, size in contents]
            if token is None:
                return


def _rss_mb() -> float:
    """This process's current resident set (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(case: dict) -> dict:
    """One case, in this fresh process: plan the listing, commit chunks in memory, report."""
    from raycap import bulk, storage
    from raycap.bulk import BulkConfig

    cfg = BulkConfig(source=case["source"], out=case["out"])
    pages = PagedListing(case["n"]).pages if case["kind"] != "real" else storage.list_pages
    start_rss = _rss_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    run = bulk.plan(cfg, pages)
    kill_at = case.get("kill_at_keys")
    for window in run.windows:
        for chunk in window:
            run.progress.advance(chunk, ok=len(chunk.todo), failed=0)
            if kill_at is not None and run.progress.listed >= kill_at:
                bulk.save_progress(cfg.out, run.progress)  # the last record before the kill
                kill_at = None
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    figures = {
        "listed": run.planner.listed,
        "resumed_after": run.progress.listed - run.planner.listed,
        "seconds": seconds,
        "keys_per_s": run.planner.listed / seconds,
        "keys_per_cpu_s": run.planner.listed / cpu_s,  # this process's CPU: what the code costs, whatever the load
        "rss_mb_start": start_rss,
        "rss_mb_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }
    if case["kind"] == "real":  # the request and XML share of that rate: listing alone
        start = time.perf_counter()
        listed = sum(len(page) for page in storage.list_pages(cfg.source))
        figures["list_only_keys_per_s"] = listed / (time.perf_counter() - start)
    return figures


def _run_child(case: dict, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True,
                          env=env, cwd=REPO)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _label(n: int) -> str:
    """1000000 -> "1m", 20000 -> "20k"."""
    for unit, size in (("m", 1_000_000), ("k", 1_000)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _make_objects(server, n: int, work: Path) -> float:
    """`n` small objects under s3://bench/photos (1,000 a folder); returns the seconds it took."""
    from seaweed import weed_binary

    start = time.perf_counter()
    server.make_bucket(BUCKET)
    for i in range(n):
        folder = work / "photos" / f"{i // 1000:05d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        (folder / f"{i:09d}.jpg").write_bytes(b"\xff\xd8 raycap bench \xff\xd9")
    copy = subprocess.run([weed_binary(), "filer.copy", "-c=16", str(work / "photos"),
                           f"http://{server.filer}/buckets/{BUCKET}/"], capture_output=True, text=True)  # fmt: skip
    if copy.returncode != 0:
        raise RuntimeError(f"weed filer.copy failed:\n{copy.stdout[-2000:]}{copy.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=int, default=200_000, help="objects on the loopback S3 server")
    parser.add_argument("--fake", type=int, nargs=2, default=[1_000_000, 10_000_000], metavar=("SMALL", "LARGE"),
                        help="keys of the paged listing source, in two cases")  # fmt: skip
    parser.add_argument("--kill-at", type=float, default=0.6, help="share of the largest case committed at the kill")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    sys.path.insert(0, str(REPO / "tests"))
    from seaweed import running_s3_server

    small, large = sorted(args.fake)
    rows = []
    with tempfile.TemporaryDirectory(prefix="raycap-bench-listing-") as tmp:
        work = Path(tmp)
        (work / "weed").mkdir()
        with running_s3_server(work / "weed") as server:
            setup_s = _make_objects(server, args.real, work / "files")
            env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
                   "AWS_ENDPOINT_URL": server.endpoint_url, "AWS_REGION": "us-east-1"}  # fmt: skip
            for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "RAYCAP_S3_ENDPOINT"):
                env.pop(var, None)
            real = _run_child({"kind": "real", "source": f"s3://{BUCKET}/photos", "out": str(work / "out-real")}, env)
        if real["listed"] != args.real:
            raise RuntimeError(f"listed {real['listed']} of the {args.real} objects written")
        rows.append(("real S3 (SeaweedFS, loopback)", real))
        fake = {}
        for n in (small, large):
            case = {"kind": "fake", "n": n, "source": f"s3://{BUCKET}/photos", "out": str(work / f"out-{n}")}
            if n == large:
                case["kill_at_keys"] = int(n * args.kill_at)
            fake[n] = _run_child(case)
            rows.append((f"paged source, {_label(n)} keys", fake[n]))
        resume = _run_child({**case, "kill_at_keys": None})  # the largest case again, from its record
        rows.append((f"resume of {_label(large)} after {_label(resume['resumed_after'])}", resume))

    print(f"setup: {args.real} objects written in {setup_s:.1f} s (local files, then weed filer.copy)\n")
    print(f"{'case':<36} {'keys listed':>12} {'seconds':>9} {'keys/s':>10} {'keys/CPU-s':>11} "
          f"{'RSS MB at start':>16} {'peak':>8}")  # fmt: skip
    for name, r in rows:
        print(f"{name:<36} {r['listed']:>12,} {r['seconds']:>9.1f} {r['keys_per_s']:>10,.0f} "
              f"{r['keys_per_cpu_s']:>11,.0f} {r['rss_mb_start']:>16.1f} {r['rss_mb_peak']:>8.1f}")  # fmt: skip
    print(f"\nreal server, listing alone (no planning): {real['list_only_keys_per_s']:,.0f} keys/s; "
          f"load average {os.getloadavg()[0]:.1f}")
    s, g = _label(small), _label(large)
    growth = fake[large]["rss_mb_peak"] - fake[small]["rss_mb_peak"]
    print(f"peak RSS from {s} to {g} keys: {growth:+.1f} MB (goal: <= +100 MB); the resume listed "
          f"{resume['listed']:,} keys after the watermark at {resume['resumed_after']:,}")
    figures = {
        "keys_real": real["listed"],
        "setup_s": round(setup_s, 1),
        "keys_per_s_real": round(real["keys_per_s"]),
        "keys_per_s_real_list_only": round(real["list_only_keys_per_s"]),
        "keys_per_cpu_s_real": round(real["keys_per_cpu_s"]),
        "rss_mb_real": round(real["rss_mb_peak"], 1),
        f"rss_mb_{s}": round(fake[small]["rss_mb_peak"], 1),
        f"rss_mb_{g}": round(fake[large]["rss_mb_peak"], 1),
        f"keys_per_s_{s}": round(fake[small]["keys_per_s"]),
        f"keys_per_s_{g}": round(fake[large]["keys_per_s"]),
        "rss_mb_after_imports": round(fake[large]["rss_mb_start"], 1),
        f"rss_mb_resume_{g}": round(resume["rss_mb_peak"], 1),
        f"resume_watermark_at_{g}": resume["resumed_after"],
        f"resume_listed_{g}": resume["listed"],
        "rss_growth_mb": round(growth, 1),
        "load_average": round(os.getloadavg()[0], 1),
        "ratio": round(fake[large]["rss_mb_peak"] / fake[small]["rss_mb_peak"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
