"""Builders shared by test modules: images, hostile files, random-weight checkpoints, ports, a
separate Ray cluster for `ray job submit`.

Importable as `helpers` from any test module (tests/conftest.py's folder is on sys.path).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torchvision
from PIL import Image

from raycap.data.vocab import Vocab
from raycap.models.checkpoint import CaptionModel, save_checkpoint
from raycap.models.decoders import DecoderConfig, build_decoder
from raycap.models.encoder_config import EncoderConfig

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve_config.yaml"
PINNED = {"num_replicas": 1, "autoscaling_config": None}

WORDS = ["a", "an", "the", "red", "green", "blue", "dog", "cat", "man", "woman", "on", "in", "with", "sitting",
         "standing", "near", "grass", "table", "ball"]  # fmt: skip


def job_module(name: str) -> ModuleType:
    """jobs/<name>.py as a module (jobs/ is not a package), to call its parse_args or main in-process."""
    spec = importlib.util.spec_from_file_location(f"raycap_job_{name}", REPO / "jobs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def image(seed: int, size: tuple[int, int] = (80, 60), fmt: str = "JPEG") -> bytes:
    """A coloured rectangle on a coloured background: images that differ in what a CNN sees."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)  # (H, W, 3)
    x, y = rng.integers(0, width // 2), rng.integers(0, height // 2)
    pixels[y : y + height // 2, x : x + width // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height, like a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_checkpoint(root: Path, name: str, grid: int, seed: int, trunk: str | None = None) -> Path:
    """A random-weight attention captioner on a seeded resnet18 whose weights are saved to a file,
    so every process builds the same encoder. Checkpoints given the same `trunk` name share one
    weights file (the first one's), as models trained on one encoder do."""
    torch.manual_seed(seed)
    weights = root / f"{trunk or name}-resnet18.pt"
    state = torchvision.models.resnet18(weights=None).state_dict()  # drawn always: the decoder's seed stays put
    if not weights.exists():
        torch.save(state, weights)
    encoder_cfg = EncoderConfig("resnet18", str(weights), grid=grid, image_size=64)
    decoder_cfg = DecoderConfig("attention", embed_dim=32, decoder_dim=32, attention_dim=32, dropout=0.0)
    vocab = Vocab(WORDS)
    decoder = build_decoder(decoder_cfg, len(vocab), encoder_cfg.feature_dim)
    # Random weights barely look at the image and spread words evenly: amplify the image's paths
    # and the output layer, so captions differ per image and beams are far from ties.
    for weight, gain in ((decoder.init_h.weight, 20), (decoder.init_c.weight, 20), (decoder.f_beta.weight, 3),
                         (decoder.lstm.weight_ih, 3), (decoder.fc.weight, 10)):  # fmt: skip
        weight.data.mul_(gain)
    decoder.fc.bias.data[vocab.end_id] = -4.0  # fewer empty captions
    return Path(save_checkpoint(root / name, CaptionModel(decoder, vocab, encoder_cfg, decoder_cfg)))


def tiny_features(root: Path) -> str:
    """Features of a 32/8-image synthetic COCO set (resnet18, 3x3 grid) extracted under `root` on
    the running Ray; returns the features root."""
    from raycap.data.synthetic import generate
    from raycap.features import ExtractConfig, extract_features

    data = generate(root / "coco", n_train=32, n_val=8, seed=3)
    out = str(root / "features")
    encoder = EncoderConfig("resnet18", "none", grid=3, image_size=64)
    extract_features(ExtractConfig(out=out, coco_root=str(data.root), encoder=encoder, min_freq=1))
    return out


def cmdline(pid: int) -> bytes:
    """A process's command line as /proc has it (its title for Ray workers); b"" once it is gone."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def descendants(roots: list[int]) -> list[int]:
    """`roots` and every process below them, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_pinned(checkpoint: str, max_decode_len: int, args: dict | None = None, env: dict | None = None) -> str:
    """The repo's serve_config.yaml on the session's Ray with one Encoder and one Decoder replica,
    captions of at most `max_decode_len` words, the application `args` (limits) and the replicas'
    `env` (e.g. a test's API token) changed and a free port; returns the base URL."""
    from raycap.serve_deploy import deploy, load_config

    overrides = {
        "args": args or {},
        "runtime_env": {"env_vars": env} if env else None,  # None: as in the file
        "deployments": {"Encoder": PINNED, "Decoder": {**PINNED, "user_config": {"max_decode_len": max_decode_len}}},
        "logging_config": {"enable_access_log": False},
    }
    return deploy(load_config(SERVE_CONFIG, checkpoint=checkpoint, port=free_port(), overrides=overrides))


@contextmanager
def ray_head(log: Path, env: dict[str, str], num_cpus: int = 4, timeout_s: float = 180) -> Iterator[str]:
    """A separate local Ray cluster (`ray start --head --block`) for `ray job submit`; yields its
    dashboard address. Stopping its process group stops this cluster only, where `ray stop` would
    also stop the test session's own Ray."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = [
        ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={num_cpus}",
        "--object-store-memory=500000000", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    with log.open("w") as out:
        cluster = subprocess.Popen(head, env={**env, "RAY_ADDRESS": ""}, start_new_session=True, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.time() + timeout_s
        while True:
            if cluster.poll() is not None:
                raise RuntimeError(f"ray start exited with {cluster.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError(f"Ray dashboard at {address} not up after {timeout_s}s") from None
                time.sleep(1)
        yield address
    finally:
        os.killpg(cluster.pid, signal.SIGTERM)
        try:
            cluster.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # what ignored SIGTERM
            os.killpg(cluster.pid, signal.SIGKILL)
        cluster.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(address: str, entrypoint: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 600,
               extra: Sequence[str] = ()) -> subprocess.CompletedProcess:  # fmt: skip
    """`ray job submit --address ... [extra] -- entrypoint`, as a user runs it from `cwd`; retried
    while the job agent is still starting (it comes up some seconds after the dashboard)."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    command = [ray_cli, "job", "submit", f"--address={address}", *extra, "--", *entrypoint]
    deadline = time.time() + 120
    while True:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)
        if done.returncode == 0 or "No available agent" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(3)


def swap_under_load(
    requests: Sequence[Callable[[], object]], swap: Callable[[], object], swapped: Callable[[], bool], what: str
) -> None:
    """Send each of `requests` in a loop, one at a time on its own thread (a bounded load), while
    `swap()` is applied and until `swapped()` holds (at most 120 s; else fail saying the Decoder
    never did `what`), then 2 s more, so the load runs across the switch."""
    stop = threading.Event()

    def loop(request: Callable[[], object]) -> None:
        while not stop.is_set():
            request()

    threads = [threading.Thread(target=loop, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    try:
        swap()
        deadline = time.monotonic() + 120
        while not swapped():
            assert time.monotonic() < deadline, f"the Decoder never {what}"
            time.sleep(0.5)
        time.sleep(2)  # keep the load on across the switch
    finally:
        stop.set()
        for thread in threads:
            thread.join()
