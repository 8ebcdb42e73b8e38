"""A new user's mistakes, table-driven: each must end the job with exit status 1 and exactly one
`error:` line that names the problem and the way out, and no traceback, before any work is done.
Each runs through the job's own entry point in this process (`run_job(main)`, as the script does);
the slowest also run as commands in a new process, as a user runs them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, job_module, make_checkpoint

from raycap.config import run_job
from raycap.data import synthetic
from raycap.storage import ENDPOINT_ENV

HANG_GUARD_S = 120  # not a speed goal: a mistake that reaches Ray or training would take minutes
DROPPED_ENV = ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", ENDPOINT_ENV)
# Run as commands too: one per job whose checks come after its heaviest imports.
AS_COMMANDS = ("resnet101 weights offline", "train epochs 0", "bulk checkpoint missing", "demo epochs -1")


@dataclass(frozen=True)
class Mistake:
    name: str
    argv: tuple[str, ...]  # after `python`; {ck}, {runs}, {feat}, {tmp}, {port} are filled in
    says: tuple[str, ...]  # the error line holds each: the problem and the way out
    env: tuple[tuple[str, str], ...] = ()


def _extract(*flags: str) -> tuple[str, ...]:
    return ("jobs/extract_features.py", *flags)


OFFLINE = (("https_proxy", "http://127.0.0.1:9"), ("http_proxy", "http://127.0.0.1:9"), ("TORCH_HOME", "{tmp}/torch"))
MISTAKES = [
    Mistake("resnet101 weights offline", _extract("--coco-root", "{tmp}/coco", "--out", "{tmp}/f"),
            ("no ImageNet weights for resnet101", "--weights FILE", "--arch efficientnet_lite0 --image-size 224 --grid 7"),
            OFFLINE),
    Mistake("weights file missing", _extract("--coco-root", "{tmp}/coco", "--out", "{tmp}/f", "--weights", "{tmp}/w.pt"),
            ("encoder weights file", "w.pt not found", "--weights")),
    Mistake("coco root missing", _extract("--coco-root", "{tmp}/nope", "--out", "{tmp}/f", "--arch", "efficientnet_lite0"),
            ("nope",)),
    Mistake("no input", _extract("--out", "{tmp}/f"), ("one of the arguments --coco-root --images is required",)),
    Mistake("batch size 0", _extract("--images", "{tmp}", "--out", "{tmp}/f", "--batch-size", "0"),
            ("--batch-size", "must be >= 1, got 0")),
    Mistake("bad arch", _extract("--images", "{tmp}", "--out", "{tmp}/f", "--arch", "vit"), ("invalid choice: 'vit'",)),
    Mistake("train workers 0", ("jobs/train.py", "--features", "{feat}", "--num-workers", "0"),
            ("--num-workers", "must be >= 1, got 0")),
    Mistake("train epochs 0", ("jobs/train.py", "--features", "{feat}", "--epochs", "0"), ("--epochs", ">= 1, got 0")),
    Mistake("train lr -1", ("jobs/train.py", "--features", "{feat}", "--lr", "-1"), ("--lr", "must be > 0, got -1.0")),
    Mistake("train dropout 1.5", ("jobs/train.py", "--features", "{feat}", "--dropout", "1.5"),
            ("--dropout", "must be <= 0.99")),
    Mistake("abbreviated flag", ("jobs/train.py", "--features", "{feat}", "--epoch", "1"),
            ("unrecognized arguments: --epoch 1", "--help")),
    Mistake("typo'd flag", ("jobs/train.py", "--features", "{feat}", "--num-worker", "2"),
            ("unrecognized arguments: --num-worker", "--help")),
    Mistake("epochs not a number", ("jobs/train.py", "--features", "{feat}", "--epochs", "two"),
            ("--epochs", "invalid int value: 'two'")),
    Mistake("features missing", ("jobs/train.py", "--features", "{tmp}/nope"),
            ("nope is not an extraction output", "jobs/extract_features.py --out")),
    Mistake("features' inner folder", ("jobs/train.py", "--features", "{feat}/features"),
            ("feat/features is not an extraction output", "{feat} is: give that")),
    Mistake("unknown model", ("jobs/train.py", "--features", "{feat}", "--model", "transformer"),
            ("invalid choice: 'transformer'",)),
    Mistake("config missing", ("jobs/train.py", "--config", "{tmp}/nope.yaml"), ("config file", "nope.yaml not found")),
    Mistake("config key typo", ("jobs/train.py", "--config", "{tmp}/typo.yaml"),
            ("unknown key 'num_worker'", "did you mean 'num_workers'")),
    Mistake("demo epochs -1", ("jobs/demo.py", "--epochs", "-1"), ("--epochs", "must be >= 1, got -1")),
    Mistake("evaluate checkpoint missing", ("jobs/evaluate.py", "--checkpoint", "{tmp}/nope"),
            ("checkpoint", "nope does not exist", "a run folder", "<run>/best")),
    Mistake("evaluate the runs folder", ("jobs/evaluate.py", "--checkpoint", "{runs}"),
            ("its runs: r1", "a run folder")),
    Mistake("evaluate beam 0", ("jobs/evaluate.py", "--checkpoint", "{ck}", "--beam-size", "0"),
            ("--beam-size", "must be >= 1, got 0")),
    Mistake("evaluate without features", ("jobs/evaluate.py", "--checkpoint", "{ck}"),
            ("records no feature root or report split", "give --features and --split")),
    Mistake("bulk checkpoint missing", ("jobs/caption_bucket.py", "--source", "{tmp}", "--out", "{tmp}/c",
                                        "--checkpoint", "{tmp}/nope"), ("nope does not exist", "a run folder")),
    Mistake("bulk source missing", ("jobs/caption_bucket.py", "--source", "{tmp}/nope", "--out", "{tmp}/c",
                                    "--checkpoint", "{ck}"), ("source", "nope does not exist")),
    Mistake("bulk beam 0", ("jobs/caption_bucket.py", "--source", "{tmp}", "--out", "{tmp}/c", "--beam-size", "0"),
            ("--beam-size (bulk.beam_size) must be >= 1, got 0",)),
    Mistake("bulk format csv", ("jobs/caption_bucket.py", "--source", "{tmp}", "--out", "{tmp}/c", "--format", "csv"),
            ("invalid choice: 'csv'",)),
    Mistake("serve checkpoint missing", ("jobs/serve.py", "--checkpoint", "{tmp}/nope"), ("nope does not exist",)),
    Mistake("serve port out of range", ("jobs/serve.py", "--checkpoint", "{ck}", "--port", "99999"),
            ("out of range", "1 to 65535")),
    Mistake("serve port busy", ("jobs/serve.py", "--checkpoint", "{ck}", "--port", "{port}"),
            ("port {port} on 127.0.0.1 is in use", "--port N")),
    Mistake("synthetic count not a number", ("-m", "raycap.data.synthetic", "--out", "{tmp}/s", "--train", "many"),
            ("--train", "invalid int value: 'many'")),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A checkpoint, a runs folder with one run, a features root (its manifest alone) and configs."""
    tmp = tmp_path_factory.mktemp("mistakes")
    ck = make_checkpoint(tmp, "ck", grid=3, seed=0)
    run = tmp / "runs" / "r1"
    run.mkdir(parents=True)
    shutil.copytree(ck, run / "checkpoint_2026-01-01_00-00-00.000000")
    feat = tmp / "feat"
    (feat / "features").mkdir(parents=True)
    (feat / "manifest.json").write_text("{}")
    (tmp / "typo.yaml").write_text("train:\n  features: x\n  num_worker: 2\n")
    synthetic.generate(tmp / "coco", n_train=4, n_val=2)  # a good COCO root, for the mistakes that come after it
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield {"tmp": str(tmp), "ck": str(ck), "runs": str(tmp / "runs"), "feat": str(feat),
               "port": str(busy.getsockname()[1])}  # fmt: skip


def _check(mistake: Mistake, places: dict[str, str], returncode: object, output: str) -> list[str]:
    """What is wrong with how a job ended on `mistake` (nothing: [])."""
    errors = [line for line in output.splitlines() if "error:" in line]
    problems = [
        f"exit {returncode}" if returncode != 1 else "",
        f"{len(errors)} error lines" if len(errors) != 1 else "",
        "a traceback" if "Traceback" in output else "",
        *(f"no {s!r}" for s in (s.format(**places) for s in mistake.says) if not errors or s not in errors[0]),
    ]
    return [p for p in problems if p]


def _main(argv: tuple[str, ...]) -> tuple[Callable[[list[str]], object], list[str]]:
    """The entry point a command line runs, and its arguments."""
    if argv[:2] == ("-m", "raycap.data.synthetic"):
        return synthetic.main, list(argv[2:])
    return job_module(Path(argv[0]).stem).main, list(argv[1:])


def test_there_are_at_least_25_mistakes() -> None:
    assert len(MISTAKES) >= 25 and len({m.name for m in MISTAKES}) == len(MISTAKES)


@pytest.mark.timeout(HANG_GUARD_S)
@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_mistake_exits_1_with_one_error_line_naming_the_problem_and_the_way_out(
    mistake: Mistake, places: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in DROPPED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in mistake.env:
        monkeypatch.setenv(name, value.format(**places))
    main, args = _main(tuple(a.format(**places) for a in mistake.argv))
    with pytest.raises(SystemExit) as ended:
        run_job(lambda: main(args))
    captured = capsys.readouterr()
    output = captured.out + captured.err
    print(output.splitlines()[-1:])
    problems = _check(mistake, places, ended.value.code, output)
    assert not problems, f"{', '.join(problems)}\n{output[-2000:]}"


@pytest.mark.timeout(600)
def test_as_commands_the_slowest_mistakes_end_before_any_work(places: dict[str, str]) -> None:
    """As a user runs them, in a new process: the time includes importing torch and Ray, not starting Ray."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    failures = []
    for mistake in [m for m in MISTAKES if m.name in AS_COMMANDS]:
        argv = [sys.executable, *(a.format(**places) for a in mistake.argv)]
        start = time.monotonic()
        done = subprocess.run(argv, cwd=REPO, env=env | {k: v.format(**places) for k, v in mistake.env},
                              capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
        output = done.stdout + done.stderr
        print(f"\n{mistake.name}: exit {done.returncode} after {time.monotonic() - start:.1f} s")
        if problems := _check(mistake, places, done.returncode, output):
            failures.append(f"{mistake.name}: {', '.join(problems)}\n{output[-1500:]}")
    assert not failures, "\n\n".join(failures)
