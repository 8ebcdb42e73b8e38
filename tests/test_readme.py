"""The README's "On one machine" block, parsed from the README and run as written, top to bottom, in
a folder laid out like a fresh clone (the repository's files, linked), offline, with a fresh home
for ~/raycap_runs: each command must exit 0 and end with the lines that say where its outputs went.
The last command serves HTTP until Ctrl-C: it is run in the background, asked for a caption, then
interrupted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from helpers import REPO, image

from raycap.storage import ENDPOINT_ENV

pytestmark = pytest.mark.integration

# What each command prints last: where its outputs went (a regular expression per command's start).
OUTPUTS = {
    "make install": None,  # make's own output
    "python -m raycap.data.synthetic": r"^wrote 200 train and 50 val images under \S*data/coco2017",
    "python jobs/extract_features.py": r"^features, captions and errors under \S*features \(",
    "python jobs/train.py": r"^\[raycap\] gru: run \S+/raycap_runs/raycap-gru; best checkpoint \S+checkpoint_",
    "python jobs/evaluate.py --checkpoint ~/raycap_runs/raycap-attention --compare": r"^comparison sheet: \S+\.png",
    "python jobs/evaluate.py": r"^metrics: \S*eval_out/metrics_val-odd\.json",
    "python jobs/caption_bucket.py": r"^\[raycap\] bulk: results in \S*captions/results/, summary in",
    "python jobs/serve.py": r"^\[raycap\] serving \S+ at http://127\.0\.0\.1:8000/caption",
}
WORKER_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)*\([^)]*pid=\d+[^)]*\)(\x1b\[[0-9;]*m)* ?")
# Tracebacks of Ray's own processes that a user's single Ray on an idle laptop does not print, but
# this test's machine may: Train's placement group cleaner finds "its" Ray by looking for running
# ones (this test session runs a second), and the dashboard's modules time out under heavy load.
RAY_OWN = ("ray/train/v2/_internal/execution/controller/placement_group_cleaner.py", "ray/dashboard/")
# Files the repository's checkout has that the commands use (a clone has them too).
CHECKOUT = ("Makefile", "pyproject.toml", ".venv", "raycap", "jobs", "configs", "serve_config.yaml")


def readme_block(heading: str = "## On one machine") -> list[str]:
    """The first fenced block after `heading` in README.md, one command per line."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    block = re.search(r"^```\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert block, f"no command block under {heading!r}"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _expected(command: str) -> str | None:
    return next(pattern for start, pattern in OUTPUTS.items() if command.startswith(start))


def _tracebacks(output: str) -> list[str]:
    """The tracebacks in `output` that are not Ray's own (RAY_OWN); lines that Ray forwards from its
    workers lose their "(Name pid=N)" prefix first."""
    lines, found = [WORKER_PREFIX.sub("", line) for line in output.splitlines()], []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            block = [line]
            for more in lines[i + 1 :]:
                block.append(more)
                if more and not more.startswith(" "):  # the exception line ends it
                    break
            if not any(own in "\n".join(block) for own in RAY_OWN):
                found.append("\n".join(lines[max(0, i - 5) : i + len(block)]))
    return found


def _wait_for_status(rc_file: Path, shell: subprocess.Popen) -> str:
    """A command's exit status, once the shell has written it ("never ran" if the shell ended first)."""
    while True:
        if rc_file.exists() and (rc := rc_file.read_text().strip()):
            return rc
        if shell.poll() is not None:
            return "never ran"
        time.sleep(0.5)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.timeout(1500)
def test_readme_on_one_machine_block_runs_as_written(tmp_path: Path) -> None:
    commands = readme_block()
    *batch, serve_line = commands
    assert batch[0].startswith("make install") and serve_line.startswith("python jobs/serve.py")
    assert _port_free(8000), "port 8000 is taken: the README's serve command needs it"
    clone = tmp_path / "raycap"
    clone.mkdir()
    for name in CHECKOUT:
        (clone / name).symlink_to(REPO / name)
    home = tmp_path / "home"
    home.mkdir()
    drop = ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", ENDPOINT_ENV, "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"HOME": str(home)}

    # One shell, as a user's terminal: `. .venv/bin/activate` holds for the commands after it.
    script = ["set -u"]
    for i, command in enumerate(batch):
        script.append(f"{{ {command} ; }} > {i}.log 2>&1; echo $? > {i}.rc; [ \"$(cat {i}.rc)\" = 0 ] || exit 1")
    script.append(f"exec {serve_line} > serve.log 2>&1")
    server = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=clone, env=env, start_new_session=True)
    timings, started = {}, time.monotonic()
    try:
        for i, command in enumerate(batch):
            rc = _wait_for_status(clone / f"{i}.rc", server)
            output = (clone / f"{i}.log").read_text()
            timings[command.split(" --")[0]] = round(time.monotonic() - started)
            assert rc == "0", f"`{command}` exited {rc}:\n{output[-4000:]}"
            if (pattern := _expected(command)) is not None:
                last = [line for line in output.splitlines() if line.strip()][-8:]
                assert any(re.search(pattern, line) for line in last), f"`{command}` ended:\n" + "\n".join(last)
            assert not (found := _tracebacks(output)), f"`{command}` printed a traceback:\n{found[0]}"
        serving, deadline = re.compile(_expected(serve_line), re.MULTILINE), time.monotonic() + 300
        while server.poll() is None and time.monotonic() < deadline:  # until the job says where it serves
            if (clone / "serve.log").exists() and serving.search((clone / "serve.log").read_text()):
                break
            time.sleep(1)
        assert serving.search(output := (clone / "serve.log").read_text()), output[-4000:]
        answer = requests.post("http://127.0.0.1:8000/caption", data=image(7), timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["caption"].strip()
        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait(timeout=120) == 0
        output = (clone / "serve.log").read_text()
        assert "[raycap] stopped: application 'raycap' deleted" in output, output[-4000:]
        assert not (found := _tracebacks(output)), f"`{serve_line}` printed a traceback:\n{found[0]}"
        print(f"\nREADME block: seconds since start after each command: {timings}; caption: {answer.json()['caption']!r}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
