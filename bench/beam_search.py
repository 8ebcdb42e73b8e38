"""Beam search throughput: one batched call over all images vs the same `beam_search` per image.

Both sides run the same decoder (random weights, eval mode) on the same features. The decoder is
the reference's: embed/decoder/attention 512 over a 14x14x2048 ResNet-101 grid, and a COCO-sized
vocabulary of 9,490 entries (the reference's word map: Karpathy train words seen more than 5 times,
plus 4 specials), because the output layer and the softmax/top-k over the vocabulary are a large
share of each step and a toy vocabulary would flatter the per-image loop. Random weights
almost never pick <end>, so every caption runs all `--max-len` words: a fixed amount of work per
image, and an upper bound on the steps a trained model takes. The two sides alternate (which goes
first flips each repeat) after a warm-up, and the median of `--repeats` runs counts.

Distance to the limit (bench/flops.py): the batched side's useful FLOP/s (the decoder's matmuls per
beam step, from the layer shapes; checked against torch's own count on two images) as a share of
this machine's matmul rate at the same shapes and threads, measured in the same run, before and
after the two sides (the faster of the two counts). `--profile`
prints where the rest goes: torch.profiler's top ops of one batched attention call.

    python bench/beam_search.py [--images 64 --max-len 20 --beams 3 5 --repeats 5] [--quick] [--profile]

Prints a table, then one JSON line last; "ratio" is batched/per-image images/s for the attention
decoder at beam 3 (GRU figures are extra keys; "*_cpu_ratio" compares process CPU time, which a
loaded shared machine disturbs far less than wall time; "gemm_share" is the attention decoder's
batched share of the GEMM rate at that beam, "gemm_share_cpu" the same per CPU second).

"ceiling" is the ratio the batched call would reach at 100% of the GEMM rate, all else free:
ratio / share. The per-image loop's matmuls have 1 image's k rows, so they stream every weight
matrix once per word for k rows and run at memory speed; on a CPU whose batched matmuls are only a
few times faster than that, no batching reaches a ratio above the ceiling.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from flops import Matmul, counted_flops, decoder_matmuls, pass_flops, profile_table, reference

from raycap.models.beam import beam_search
from raycap.models.decoders import Decoder, DecoderConfig, build_decoder

COCO_VOCAB = 9490  # entries in the reference's COCO word map
GRID, FEATURE_DIM = 14, 2048  # ResNet-101 at 256x256 input, pooled to 14x14
START, END = 1, 2


def _seconds(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call. CPU time barely moves when neighbours load the machine."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(decoder: Decoder, features: torch.Tensor, beam: int, max_len: int, repeats: int) -> dict[str, float]:
    """Median images/s (wall clock) of one batched call and of a per-image loop, run alternately,
    and the ratio of their median CPU times."""

    def batched() -> None:
        beam_search(decoder, features, START, END, beam_size=beam, max_len=max_len)

    def per_image() -> None:
        for i in range(features.size(0)):
            beam_search(decoder, features[i : i + 1], START, END, beam_size=beam, max_len=max_len)

    warm = features[:2]
    beam_search(decoder, warm, START, END, beam_size=beam, max_len=max_len)
    beam_search(decoder, warm[:1], START, END, beam_size=beam, max_len=max_len)
    wall: dict[str, list[float]] = {"batched": [], "per_image": []}
    cpu: dict[str, list[float]] = {"batched": [], "per_image": []}
    for repeat in range(repeats):
        order = [("batched", batched), ("per_image", per_image)]
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            seconds, cpu_seconds = _seconds(fn, features.device)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    n = features.size(0)
    batched_ips = n / statistics.median(wall["batched"])
    per_image_ips = n / statistics.median(wall["per_image"])
    return {
        "batched": batched_ips,
        "per_image": per_image_ips,
        "ratio": batched_ips / per_image_ips,
        "cpu_ratio": statistics.median(cpu["per_image"]) / statistics.median(cpu["batched"]),
        "batched_per_cpu_s": n / statistics.median(cpu["batched"]),
    }


def gemm_matmuls(decoder: Decoder, cfg: DecoderConfig, features: torch.Tensor, beam: int, max_len: int) -> list[Matmul]:
    """The matmuls of one batched call over `features` (bench/flops.py), once their formula has
    matched torch's own count on two images."""

    def matmuls(images: int) -> list[Matmul]:
        # Random weights run every caption for all max_len words, plus the step that scores <end>.
        return decoder_matmuls(cfg, decoder.vocab_size, GRID * GRID, FEATURE_DIM, images, beam, max_len + 1, search=True)

    counted = counted_flops(lambda: beam_search(decoder, features[:2], START, END, beam, max_len))
    if counted != pass_flops(matmuls(2), training=False):
        raise RuntimeError(
            f"{cfg.kind} beam {beam}: torch counts {counted:.6g} FLOPs on 2 images, bench/flops.py "
            f"{pass_flops(matmuls(2), training=False):.6g}: update decoder_matmuls to the decoder"
        )
    return matmuls(features.size(0))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=20, help="words per caption (COCO captions average ~10)")
    parser.add_argument("--beams", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=COCO_VOCAB)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="16 images, beam 3, 2 repeats: a smoke run")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one batched attention call")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.beams, args.repeats = 16, [3], 2

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    features = torch.rand(args.images, GRID * GRID, FEATURE_DIM, device=device)  # (B, P, C), post-ReLU-like
    print(
        f"{args.images} images, features {GRID}x{GRID}x{FEATURE_DIM}, vocab {args.vocab}, max_len {args.max_len}, "
        f"device {device}, {args.threads} torch threads, median of {args.repeats}",
        flush=True,
    )
    header = f"{'decoder':<10} {'beam':>4} {'batched img/s':>14} {'per-image img/s':>16} {'ratio':>7}"
    header = f"{header} {'CPU-time ratio':>15} {'GFLOP/s':>8} {'GEMM GFLOP/s':>13} {'share':>6} {'share (CPU)':>12}"
    print(f"{header} {'ceiling':>8}")
    figures: dict[str, object] = {
        "images": args.images,
        "max_len": args.max_len,
        "vocab": args.vocab,
        "feature_shape": [GRID * GRID, FEATURE_DIM],
        "device": str(device),
        "threads": args.threads,
        "repeats": args.repeats,
    }
    headline_beam = 3 if 3 in args.beams else args.beams[0]
    references = {}
    for kind in ("attention", "gru"):
        cfg = DecoderConfig(kind=kind)
        decoder = build_decoder(cfg, args.vocab, FEATURE_DIM).to(device).eval()
        for beam in args.beams:
            matmuls = gemm_matmuls(decoder, cfg, features, beam, args.max_len)
            before = reference(matmuls, training=False, device=device)
            result = compare(decoder, features, beam, args.max_len, args.repeats)
            # The machine's rate at its least disturbed, of one measure before and one after.
            after = reference(matmuls, training=False, device=device)
            ref = references[kind, beam] = max(before, after, key=lambda r: r.rate)
            calls_per_s = result["batched"] / args.images
            result |= {"gflops": calls_per_s * ref.flops / 1e9, "gemm_gflops": ref.rate / 1e9}
            result["gemm_share"] = ref.share(calls_per_s)
            result["gemm_share_cpu"] = ref.share(result["batched_per_cpu_s"] / args.images, per_cpu_s=True)
            # The ratio if the batched call ran every matmul at the GEMM rate and nothing else took time.
            result["ceiling"] = result["ratio"] / result["gemm_share"]
            row = f"{kind:<10} {beam:>4} {result['batched']:>14.2f} {result['per_image']:>16.2f}"
            row = f"{row} {result['ratio']:>6.2f}x {result['cpu_ratio']:>14.2f}x {result['gflops']:>8.2f}"
            row = f"{row} {result['gemm_gflops']:>13.1f} {result['gemm_share']:>6.1%}"
            print(f"{row} {result['gemm_share_cpu']:>12.1%} {result['ceiling']:>7.2f}x", flush=True)
            for key, value in result.items():
                figures[f"{kind}_beam{beam}_{key}"] = round(value, 3)
        if kind == "attention" and args.profile:
            print(f"\nprofile: one batched call, attention, beam {headline_beam}, {args.images} images", flush=True)
            search = functools.partial(beam_search, decoder, features, START, END, headline_beam, args.max_len)
            print(profile_table(search, device), flush=True)
    print(f"\nmatmuls of one batched attention call at beam {headline_beam}, {args.images} images, measured alone:")
    print(references["attention", headline_beam].table())
    figures["gemm_share"] = figures[f"attention_beam{headline_beam}_gemm_share"]
    figures["gemm_share_cpu"] = figures[f"attention_beam{headline_beam}_gemm_share_cpu"]
    figures["ratio"] = figures[f"attention_beam{headline_beam}_ratio"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
