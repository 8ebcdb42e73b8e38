"""Inference-only speedups for Serve on CPU, measured: what earns the Encoder's `cpu_bfloat16`.

Offline, the exact compute of one Serve batch, each variant against what Serve runs by default
(float32 under `inference_mode`, BatchNorm folded), in one process, alternating, medians of
--repeats: `Encoder.encode` on --batch decoded photos at the served image size, and `beam_search`
on those features (beam 3, --max-len words). One thread, as Ray gives a replica with num_cpus < 1
(OMP_NUM_THREADS=1). Times are process CPU time, which a loaded shared machine disturbs far less
than wall time (wall in brackets). Each variant is applied from outside the model code:

    encoder  bn_kept        BatchNorm kept as layers: the Encoder before it folded them (fold_batchnorm=False)
             no_grad        torch.no_grad instead of inference_mode
             channels_last  trunk weights channels-last (the NHWC uint8 input makes activations so already)
             bf16           bfloat16 autocast around the trunk: Serve's Encoder with cpu_bfloat16
    decoder  bf16 autocast  bfloat16 autocast around beam search
             bf16 output    the output layer (vocabulary x decoder_dim) in bfloat16
             int8 output    torch.ao.quantization.quantize_dynamic on the output layer
             int8 out+lstm  the same on the output layer and the LSTM cell

The model is bench/serve.py's: the reference attention decoder (random weights, vocabulary 9,490)
over ResNet-18 at 224x224. "same" counts captions identical to float32's on the same photos; random
weights leave near ties, so this is the strictest check. --demo-checkpoint adds quality: BLEU-4 of a
trained checkpoint on its report split, through Serve's path (image -> encoder -> beam search, in
batches of --batch), and its encoder's CPU ms. "passes": over 5% less compute and either identical
captions or BLEU-4 at most --tolerance lower.

--serve then measures requests/s at --concurrency through Serve with bench/serve.py's machinery (one
pinned Encoder and Decoder replica) with the Encoder's cpu_bfloat16 off and on, two rounds in
alternating order, and the CPU ms per request of Serve's processes (Encoder, Decoder, and http: the
proxy and the ingress), which a loaded machine disturbs less than requests/s.

    python bench/serve_cpu.py [--demo-checkpoint DIR] [--repeats 5] [--serve --serve-seconds 20]

Prints a table, then one JSON line last; "ratio" is Serve's requests/s with cpu_bfloat16 over
without (medians of the rounds) with --serve ("serve_model_cpu_ratio": Encoder + Decoder CPU ms per
request, without over with), else the per-batch compute ratio (encoder + decoder CPU ms).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raycap import feature_store as fstore
from raycap import storage
from raycap.metrics import score_captions
from raycap.models.beam import beam_search
from raycap.models.checkpoint import load_checkpoint
from raycap.models.decoders import Decoder
from raycap.models.encoder import Encoder
from raycap.models.encoder_config import EncoderConfig
from raycap.serve import load_model

EncodeFn = Callable[[torch.Tensor], torch.Tensor]  # (B, S, S, 3) uint8 -> (B, P, C) float32
DecodeFn = Callable[[torch.Tensor], list[list[int]]]  # (B, P, C) float32 -> best caption's tokens per image
BASE = ("fp32", "fp32")  # (encoder variant, decoder variant): what Serve runs by default
KEPT = ("bf16", "fp32")  # what the Encoder's cpu_bfloat16 runs


def seeded_encoder(cfg: EncoderConfig, fold_batchnorm: bool = True) -> Encoder:
    """An Encoder whose random weights (weights "none") are the same whether or not it folds BatchNorm."""
    torch.manual_seed(0)
    return Encoder(cfg, fold_batchnorm)


def encoder_variants(cfg: EncoderConfig) -> tuple[Encoder, dict[str, EncodeFn]]:
    """Serve's Encoder for `cfg`, and each way to run it on a batch: fp32 and bf16 are Serve's Encoder
    without and with cpu_bfloat16."""
    encoder = seeded_encoder(cfg)
    channels_last = copy.deepcopy(encoder).to(memory_format=torch.channels_last)

    def no_grad(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return encoder(images)

    return encoder, {
        "fp32": encoder.encode,
        "bn_kept": seeded_encoder(cfg, fold_batchnorm=False).encode,
        "no_grad": no_grad,
        "channels_last": channels_last.encode,
        "bf16": functools.partial(encoder.encode, cpu_bfloat16=True),
    }


class Bfloat16Linear(nn.Module):
    """A linear layer computed in bfloat16, between float32 tensors."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = copy.deepcopy(linear).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(torch.bfloat16)).float()


def decoder_variants(checkpoint: str, beam: int, max_len: int) -> dict[str, DecodeFn]:
    """Each way to run beam search with the checkpoint's decoder (fp32: as Serve's Decoder does). The
    layers are swapped by name: the attention reads its own layers' weights, so it stays float32."""
    loaded = load_model(checkpoint).model
    fp32, vocab = loaded.decoder, loaded.vocab

    def search(decoder: Decoder, autocast: bool = False) -> DecodeFn:
        def run(features: torch.Tensor) -> list[list[int]]:
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
                found = beam_search(
                    decoder, features, vocab.start_id, vocab.end_id,
                    beam_size=beam, max_len=max_len, banned=(vocab.unk_id,),
                )  # fmt: skip
            return [c[0].tokens for c in found]

        return run

    bf16_output = copy.deepcopy(fp32)
    bf16_output.fc = Bfloat16Linear(fp32.fc)

    def int8(layers: set[str]) -> Decoder:
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), layers, dtype=torch.qint8)

    return {
        "fp32": search(fp32),
        "bf16 autocast": search(fp32, autocast=True),
        "bf16 output": search(bf16_output),
        "int8 output": search(int8({"fc"})),
        "int8 out+lstm": search(int8({"fc", "lstm"})),
    }


@dataclass
class Timings:
    """Per-call seconds of each variant: process CPU time and wall time."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)

    def median_ms(self, name: str, clock: str = "cpu") -> float:
        return 1000.0 * statistics.median(getattr(self, clock)[name])


def time_alternating(calls: dict[str, Callable[[], object]], repeats: int) -> Timings:
    """Every call once to warm up, then `repeats` rounds, the order rotating each round."""
    names = list(calls)
    for fn in calls.values():
        fn()
    out = Timings({n: [] for n in names}, {n: [] for n in names})
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            calls[name]()
            out.cpu[name].append(time.process_time() - cpu)
            out.wall[name].append(time.perf_counter() - wall)
    return out


def caption_all(encode: EncodeFn, decode: DecodeFn, images: torch.Tensor, batch: int) -> list[list[int]]:
    """Best caption's tokens for each image (N, S, S, 3), `batch` images per model call, as Serve batches."""
    return [t for i in range(0, len(images), batch) for t in decode(encode(images[i : i + batch]))]


def load_images(encoder: Encoder, data: Sequence[bytes]) -> torch.Tensor:
    """Encoded images -> (N, S, S, 3) uint8, decoded and resized as Serve's Encoder does."""
    return torch.from_numpy(np.stack([encoder.preprocess(x)[0] for x in data]))


def demo_bleu(
    checkpoint: str, pairs: Sequence[tuple[str, str]], batch: int, beam: int, repeats: int
) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """BLEU-4 of a trained checkpoint on its report split for each (encoder, decoder) variant pair,
    its images encoded and captioned as Serve does; and its encoder's CPU ms per batch per variant."""
    model = load_checkpoint(checkpoint)
    if model.data is None:
        raise ValueError(f"{checkpoint} records no feature root or report split: use a checkpoint from jobs/train.py")
    root, split = model.data.features, model.data.report_split
    references = fstore.read_references(root, split)
    image_ids, keys = fstore.read_keys(root, split)
    encoder, encode = encoder_variants(model.encoder_cfg)
    images = load_images(encoder, [storage.read_bytes(k) for k in keys])  # (N, S, S, 3)
    decode = decoder_variants(checkpoint, beam, max_len=50)
    scores = {}
    for e, d in pairs:
        tokens = caption_all(encode[e], decode[d], images, batch)
        predictions = {int(i): model.vocab.decode(t) for i, t in zip(image_ids, tokens)}
        scores[e, d] = score_captions(references, predictions)["bleu4"]
    timings = time_alternating({e: functools.partial(encode[e], images[:batch]) for e in encode}, repeats)
    return scores, {e: timings.median_ms(e) for e in encode}


SERVE_ROLES = {  # process title prefix -> role
    "ray::ServeReplica:raycap:Encoder": "encoder",
    "ray::ServeReplica:raycap:Decoder": "decoder",
    "ray::ServeReplica:raycap:Captioner": "http",
    "ray::ProxyActor": "http",
}


def serve_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this machine's Serve processes, by role (Linux /proc)."""
    out = dict.fromkeys(SERVE_ROLES.values(), 0.0)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        role = next((r for prefix, r in SERVE_ROLES.items() if title.startswith(prefix)), None)
        if role:
            out[role] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return out


def serve_rps(
    checkpoint: str, configs: dict[str, bool], seconds: float, concurrency: int, max_len: int
) -> dict[str, list[dict[str, float]]]:
    """Requests/s at `concurrency` through Serve (one pinned Encoder and Decoder replica) and the
    Serve processes' CPU ms per request, for each config's Encoder cpu_bfloat16, switched by
    reconfigure, two rounds in alternating order."""
    import ray
    from ray import serve
    from serve import REPO, closed_loop, free_port, photos

    from raycap.serve_deploy import deploy, load_config

    ray.init(include_dashboard=False)
    port = free_port()

    def config(cpu_bfloat16: bool):  # noqa: ANN202
        pinned = {"num_replicas": 1, "autoscaling_config": None}
        deployments = {
            "Encoder": {**pinned, "user_config": {"cpu_bfloat16": cpu_bfloat16}},
            "Decoder": {**pinned, "user_config": {"max_decode_len": max_len}},
        }
        overrides = {"deployments": deployments, "logging_config": {"enable_access_log": False}}
        return load_config(REPO / "serve_config.yaml", checkpoint=checkpoint, port=port, overrides=overrides)

    images = photos(8)
    names = list(configs)
    url = deploy(config(configs[names[0]])) + "/caption"
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(2):
        for name in names if r % 2 == 0 else names[::-1]:
            deploy(config(configs[name]))
            asyncio.run(closed_loop(url, images, concurrency, 3.0, 100_000))  # warm-up
            before = serve_cpu_seconds()
            result = asyncio.run(closed_loop(url, images, concurrency, seconds, 100_000))
            used = {role: cpu - before[role] for role, cpu in serve_cpu_seconds().items()}
            ms = {f"{role}_cpu_ms": round(1000.0 * cpu / max(result["requests"], 1), 1) for role, cpu in used.items()}
            runs[name].append({"rps": round(result["rps"], 2), "p50_ms": round(result["p50_ms"]), **ms})
            print(f"  serve c={concurrency} {name:<13} {result['rps']:6.2f} req/s  p50 {result['p50_ms']:5.0f} ms  "
                  f"{result['requests']} requests, {result['failures']} failed; CPU ms/request: "
                  + ", ".join(f"{k[:-7]} {v:.1f}" for k, v in ms.items()), flush=True)  # fmt: skip
    serve.shutdown()
    ray.shutdown()
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="images per batch: Serve's max_batch_size")
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=20, help="words per caption (bench/serve.py's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads: 1, as in a Serve replica")
    parser.add_argument("--demo-checkpoint", default=None, help="a trained checkpoint for BLEU-4 on its report split")
    parser.add_argument("--tolerance", type=float, default=0.005, help="BLEU-4 a variant may lose and still pass")
    parser.add_argument("--serve", action="store_true", help="then Serve's requests/s, Encoder cpu_bfloat16 off/on")
    parser.add_argument("--serve-seconds", type=float, default=20.0, help="measured seconds per config and round")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from serve import make_checkpoint, photos  # bench/serve.py: its model and photos

    tmp = tempfile.TemporaryDirectory(prefix="raycap-bench-")
    checkpoint = make_checkpoint(Path(tmp.name))
    encoder, encode = encoder_variants(load_checkpoint(checkpoint).encoder_cfg)
    images = load_images(encoder, photos(args.batch))  # (B, S, S, 3)
    decode = decoder_variants(checkpoint, args.beam, args.max_len)
    pairs = [(e, "fp32") for e in encode] + [("fp32", d) for d in decode if d != "fp32"]
    features = {e: fn(images) for e, fn in encode.items()}  # (B, P, C) each
    reference = decode["fp32"](features["fp32"])
    same = {(e, d): sum(a == b for a, b in zip(decode[d](features[e]), reference)) for e, d in pairs}
    enc_t = time_alternating({e: functools.partial(encode[e], images) for e in encode}, args.repeats)
    dec_t = time_alternating({d: functools.partial(decode[d], features["fp32"]) for d in decode}, args.repeats)
    bleu: dict[tuple[str, str], float] = {}
    demo_enc_ms: dict[str, float] = {}
    if args.demo_checkpoint:
        bleu, demo_enc_ms = demo_bleu(args.demo_checkpoint, pairs, args.batch, args.beam, args.repeats)

    load = os.getloadavg()
    print(f"{args.batch} images, beam {args.beam}, {args.max_len} words, {args.threads} thread(s); ms per batch: "
          f"process CPU [wall]; ratio: (encoder + decoder) CPU ms of fp32 / variant's; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")  # fmt: skip
    print(f"{'encoder':<14} {'decoder':<14} {'encoder ms':>13} {'decoder ms':>13} {'ratio':>5} {'same':>5} "
          f"{'BLEU-4':>7} {'delta':>7} {'demo enc ms':>11}  passes")  # fmt: skip
    base = enc_t.median_ms("fp32") + dec_t.median_ms("fp32")
    results = {}
    for e, d in pairs:
        ratio = base / (enc_t.median_ms(e) + dec_t.median_ms(d))
        score = bleu.get((e, d))
        delta = None if score is None else score - bleu[BASE]
        quality = same[e, d] == args.batch or (delta is not None and delta >= -args.tolerance)
        passes = (e, d) != BASE and ratio > 1.05 and quality
        enc = f"{enc_t.median_ms(e):.0f} [{enc_t.median_ms(e, 'wall'):.0f}]"
        dec = f"{dec_t.median_ms(d):.0f} [{dec_t.median_ms(d, 'wall'):.0f}]"
        bleu_cells = "       -       -" if score is None else f"{score:>7.4f} {delta:>+7.4f}"
        demo_ms = f"{demo_enc_ms[e]:.0f}" if e in demo_enc_ms and d == "fp32" else "-"
        print(f"{e:<14} {d:<14} {enc:>13} {dec:>13} {ratio:>5.2f} {same[e, d]:>2}/{args.batch:<2} {bleu_cells} "
              f"{demo_ms:>11}  {'yes' if passes else 'no'}", flush=True)  # fmt: skip
        results[f"{e} / {d}"] = {
            "encoder_cpu_ms": round(enc_t.median_ms(e), 1), "encoder_wall_ms": round(enc_t.median_ms(e, "wall"), 1),
            "decoder_cpu_ms": round(dec_t.median_ms(d), 1), "decoder_wall_ms": round(dec_t.median_ms(d, "wall"), 1),
            "compute_ratio": round(ratio, 3), "same_captions": same[e, d],
            "demo_bleu4": None if score is None else round(score, 4),
            "demo_bleu4_delta": None if delta is None else round(delta, 4), "passes": passes,
        }  # fmt: skip
    figures = {
        "model": "attention 512/512/512, vocab 9490, resnet18 224px (random weights)",
        "demo_checkpoint": args.demo_checkpoint,
        "demo_encoder_cpu_ms": {e: round(v, 1) for e, v in demo_enc_ms.items()},
        "batch": args.batch, "beam": args.beam, "max_len": args.max_len, "threads": args.threads,
        "load_average": [round(x, 2) for x in load], "variants": results,
        "kept": "Encoder cpu_bfloat16 (" + " / ".join(KEPT) + ")",
        "ratio_kind": "(encoder + decoder) CPU ms per batch, fp32 / Encoder cpu_bfloat16",
        "ratio": results[" / ".join(KEPT)]["compute_ratio"],
    }  # fmt: skip
    if args.serve:
        runs = serve_rps(checkpoint, {"fp32": False, "encoder bf16": True}, args.serve_seconds, args.concurrency,
                         args.max_len)  # fmt: skip
        rps = {name: statistics.median(run["rps"] for run in v) for name, v in runs.items()}
        model_ms = {name: statistics.median(run["encoder_cpu_ms"] + run["decoder_cpu_ms"] for run in v)
                    for name, v in runs.items()}  # fmt: skip
        figures["serve"] = runs
        figures["serve_load_average"] = [round(x, 2) for x in os.getloadavg()]
        figures["serve_model_cpu_ratio"] = round(model_ms["fp32"] / model_ms["encoder bf16"], 3)
        figures["ratio_kind"] = f"Serve's requests/s at concurrency {args.concurrency}, Encoder cpu_bfloat16 on / off"
        figures["ratio"] = round(rps["encoder bf16"] / rps["fp32"], 3)
    tmp.cleanup()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
