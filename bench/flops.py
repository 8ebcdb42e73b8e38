"""Distance to the limit: a model's useful FLOP/s as a share of this machine's own matmul rate.

Useful FLOPs are the decoders' matmuls, counted from the layer shapes (2*m*k*n each, as the
decoders run them: step by step); elementwise ops, softmax, top-k and the framework are what the
share leaves out. Training counts the backward matmuls too: the gradient of each trained weight,
and of each input that needs one (about 3x the forward; the image-side projections, whose input is
the features, about 2x). The reference rate is measured in the same process, with the same
threads: each of those matmul shapes timed alone with torch (the faster of the two layouts of the
right operand), combined as the rate at which the model's own mix of matmuls would run back to
back. share = that time / the time the model took; also per process CPU second, which neighbours
on a shared machine disturb far less (on CPU; it credits a model for threads left idle).

Used by bench/train.py, bench/beam_search.py and bench/serve.py; `--profile` there prints
`profile_table`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from raycap.models.decoders import DecoderConfig

Shape = tuple[int, int, int, int]  # (batch, m, k, n): (batch, m, k) @ (batch, k, n)


@dataclass(frozen=True)
class Matmul:
    """One matmul of a model pass, run `count` times: a (m, k) @ b (k, n), `batch` of them."""

    name: str
    m: int
    k: int
    n: int
    count: int = 1
    batch: int = 1
    grad_a: bool = True  # training: the left operand (activations) needs a gradient
    grad_b: bool = True  # training: the right operand (a weight) needs a gradient

    def passes(self, training: bool) -> list[tuple[str, Shape]]:
        """The forward matmul, then (training) the gradient ones: dA = dC @ b^T, dB = a^T @ dC."""
        out = [("", (self.batch, self.m, self.k, self.n))]
        if training and self.grad_a:
            out.append((" dA", (self.batch, self.m, self.n, self.k)))
        if training and self.grad_b:
            out.append((" dB", (self.batch, self.k, self.m, self.n)))
        return out


def shape_flops(shape: Shape) -> float:
    batch, m, k, n = shape
    return 2.0 * batch * m * k * n


def decoder_matmuls(
    cfg: DecoderConfig,
    vocab: int,
    pixels: int,
    channels: int,
    images: int,
    per_image: int,
    steps: int,
    search: bool = False,
) -> list[Matmul]:
    """The matmuls of one decoder pass over `images` images with `per_image` rows each (captions in
    training, beams in search) for `steps` words; `pixels` is the decoder's grid (P). In `search`
    the attention scores are L1 distances (`Attention.step`), not full_att matmuls."""
    rows, e, d, a = images * per_image, cfg.embed_dim, cfg.decoder_dim, cfg.attention_dim
    # Teacher forcing runs the output layer once over all words; search, word by word.
    fc = Matmul("fc (output)", rows, d, vocab, steps) if search else Matmul("fc (output)", rows * steps, d, vocab)
    if cfg.kind == "gru":
        return [
            Matmul("init_h", images, channels, d, grad_a=False),
            Matmul("gru input", rows, e, 3 * d, steps),
            Matmul("gru hidden", rows, d, 3 * d, steps),
            fc,
        ]
    return [
        Matmul("encoder_att (image side)", images * pixels, channels, a, grad_a=False),
        Matmul("init_h, init_c", images, channels, d, 2, grad_a=False),
        Matmul("decoder_att", rows, d, a, steps),
        *([] if search else [Matmul("full_att (B,k,P,A)->1", rows * pixels, a, 1, steps)]),
        Matmul("context bmm", per_image, pixels, channels, steps, batch=images, grad_b=False),
        Matmul("f_beta", rows, d, channels, steps),
        Matmul("lstm input", rows, e + channels, 4 * d, steps),
        Matmul("lstm hidden", rows, d, 4 * d, steps),
        fc,
    ]


def module_matmuls(module: torch.nn.Module, inputs: torch.Tensor) -> list[Matmul]:
    """The matmuls of `module(inputs)` (inference), one per convolution and linear layer, recorded by
    running it: a convolution as the matmul of its unfolded input, (N*H'*W', C/g*kh*kw) @ (C/g*kh*kw,
    C'/g), for each of its g groups."""
    found: list[Matmul] = []

    def record(layer: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(layer, torch.nn.Conv2d):
            kh, kw = layer.kernel_size
            g = layer.groups
            m = out.size(0) * out.size(2) * out.size(3)
            found.append(Matmul(f"conv {layer.in_channels}->{layer.out_channels} {kh}x{kw}", m,
                                layer.in_channels // g * kh * kw, layer.out_channels // g, batch=g))  # fmt: skip
        elif isinstance(layer, torch.nn.Linear):
            found.append(Matmul(f"linear {layer.in_features}->{layer.out_features}", args[0].numel() // layer.in_features,
                                layer.in_features, layer.out_features))  # fmt: skip

    hooks = [m.register_forward_hook(record) for m in module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    try:
        with torch.inference_mode():
            module(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def pass_flops(matmuls: Iterable[Matmul], training: bool) -> float:
    """FLOPs of one pass: forward, plus backward when `training`."""
    return sum(m.count * shape_flops(shape) for m in matmuls for _, shape in m.passes(training))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_shape(shape: Shape, device: torch.device, repeats: int = 3, min_s: float = 0.05) -> tuple[float, float]:
    """FLOP/s of torch's float32 matmul at `shape`, per wall second and per process CPU second: the
    medians of `repeats` timings of >= `min_s` each, for b stored (k, n) and (n, k) (nn.Linear's
    weight), whichever is faster."""
    batch, m, k, n = shape
    a = torch.rand(batch, m, k, device=device).squeeze(0)
    layouts = [torch.rand(batch, k, n, device=device), torch.rand(batch, n, k, device=device).transpose(1, 2)]
    best = (0.0, 0.0)
    for b in (layout.squeeze(0) for layout in layouts):
        torch.matmul(a, b)
        wall, cpu = [], []
        for _ in range(repeats):
            calls = 0
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            while calls < 2 or time.perf_counter() - start < min_s:
                torch.matmul(a, b)
                calls += 1
            _sync(device)
            wall.append(calls * shape_flops(shape) / (time.perf_counter() - start))
            cpu.append(calls * shape_flops(shape) / (time.process_time() - start_cpu))
        best = (max(best[0], statistics.median(wall)), max(best[1], statistics.median(cpu)))
    return best


@dataclass(frozen=True)
class Reference:
    """The machine's matmul rate for a model's mix of matmuls, and per shape. Rates per CPU second
    (all threads of this process) shift far less than wall-clock ones when neighbours load a shared
    machine."""

    flops: float  # of one pass
    rate: float  # FLOP/s if every matmul ran at its measured rate, back to back
    cpu_rate: float  # the same per process CPU second
    rows: list[tuple[str, Shape, float, float]]  # (name, shape, share of FLOPs, FLOP/s)

    def share(self, passes_per_s: float, per_cpu_s: bool = False) -> float:
        """Useful FLOP/s at `passes_per_s` (per CPU second if `per_cpu_s`) as a share of the matmul rate."""
        return passes_per_s * self.flops / (self.cpu_rate if per_cpu_s else self.rate)

    def table(self) -> str:
        lines = [f"  {'matmul':<27} {'(batch, m, k, n)':>23} {'FLOPs':>6} {'GFLOP/s':>8}"]
        for name, shape, part, rate in self.rows:
            lines.append(f"  {name:<27} {str(shape):>23} {part:>6.1%} {rate / 1e9:>8.1f}")
        mix = f"{self.rate / 1e9:>8.1f} ({self.cpu_rate / 1e9:.1f} per CPU second)"
        lines.append(f"  {'mix (time-weighted)':<27} {'':>23} {1:>6.0%} {mix}")
        return "\n".join(lines)


def reference(matmuls: list[Matmul], training: bool, device: torch.device) -> Reference:
    """Time every shape of one pass (forward, and backward when `training`) on `device`."""
    total, seconds, cpu_seconds, rows = pass_flops(matmuls, training), 0.0, 0.0, []
    rates: dict[Shape, tuple[float, float]] = {}
    for matmul in matmuls:
        for suffix, shape in matmul.passes(training):
            rates[shape] = rates.get(shape) or time_shape(shape, device)
            flops = matmul.count * shape_flops(shape)
            seconds += flops / rates[shape][0]
            cpu_seconds += flops / rates[shape][1]
            rows.append((matmul.name + suffix, shape, flops / total, rates[shape][0]))
    return Reference(total, total / seconds, total / cpu_seconds, rows)


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs torch itself counts for `fn()` (its matmuls and convolutions), to check a formula."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def profile_table(fn: Callable[[], object], device: torch.device, rows: int = 8) -> str:
    """torch.profiler's ops of `fn()`, the `rows` largest by self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)
