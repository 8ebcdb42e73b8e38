"""The user's path on a cluster, on loopback: a Ray cluster started with `ray start --head`, data in a
bucket on the real S3 server, and the three stages submitted as users submit them
(`ray job submit --working-dir . -- python jobs/<job>.py --s3-endpoint URL ...`): extract features,
train, caption a bucket (which deploys the Serve application), then caption over HTTP.

Neither the cluster nor the jobs see AWS_ENDPOINT_URL: each job's --s3-endpoint alone must reach
every process that touches S3 (the driver reading its s3:// --config, decode tasks, encoder actors
loading s3:// weights, shard writers, Ray Train workers, Serve replicas loading the s3:// checkpoint,
bulk read tasks)."""

from __future__ import annotations

import io
import os
import re
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
import torchvision
import yaml
from helpers import REPO, free_port, image, ray_head, submit_job

from raycap.bulk import read_results
from raycap.data.synthetic import generate
from raycap.storage import ENDPOINT_ENV

# Slow (about 4.5 minutes; `make test-slow`): it keeps `make test` under 20 minutes. The README's own
# block (tests/test_readme.py) runs the jobs end to end on one machine in `make test`.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _upload(client, bucket: str, root: Path, prefix: str) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())


@pytest.mark.timeout(900)
def test_jobs_given_only_s3_endpoint_on_a_cluster_extract_train_caption_a_bucket_then_serve_http(
    s3_server, tmp_path: Path
) -> None:
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    data = generate(tmp_path / "coco", n_train=24, n_val=8, seed=5)
    _upload(client, bucket, data.root, "coco")
    weights = io.BytesIO()  # every process must build the same encoder: weights from a file, not a random init
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    client.put_object(Bucket=bucket, Key="weights/resnet18.pt", Body=weights.getvalue())
    photos = {f"p{i}.jpg": image(400 + i) for i in range(6)} | {"readme.txt": b"not a photo"}
    for name, body in photos.items():
        client.put_object(Bucket=bucket, Key=f"photos/{name}", Body=body)
    s3 = f"s3://{bucket}"
    extract = {"coco_root": f"{s3}/coco", "out": f"{s3}/features", "min_freq": 1,
               "encoder": {"arch": "resnet18", "weights": f"{s3}/weights/resnet18.pt", "grid": 3, "image_size": 64}}  # fmt: skip
    client.put_object(Bucket=bucket, Key="configs/e2e.yaml", Body=yaml.safe_dump({"extract": extract}).encode())

    port = free_port()
    # The cluster gets credentials from its environment (as an instance role gives them on AWS), and
    # no endpoint: the jobs name it with --s3-endpoint only.
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", ENDPOINT_ENV)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    endpoint = ["--s3-endpoint", s3_server.endpoint_url]
    timings: dict[str, float] = {}
    with ray_head(tmp_path / "head.log", env) as address:

        def run(stage: str, *entrypoint: str) -> str:
            start = time.monotonic()
            done = submit_job(address, ["python", *entrypoint, *endpoint], env, REPO, extra=["--working-dir", "."])
            timings[stage] = round(time.monotonic() - start, 1)
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{stage} failed:\n{output[-4000:]}"
            return output

        output = run("extract", "jobs/extract_features.py", "--config", f"{s3}/configs/e2e.yaml")
        assert f"{s3}/features" in output  # every job says where its outputs went
        output = run("train", "jobs/train.py", "--features", f"{s3}/features", "--model", "attention",
                     "--epochs", "2", "--captions-per-step", "40", "--embed-dim", "16", "--decoder-dim", "16",
                     "--attention-dim", "16", "--num-workers", "2", "--storage-path", f"{s3}/runs", "--run-name", "e2e")  # fmt: skip
        found = re.search(r"best checkpoint (s3://\S+)", output)
        assert found, output[-3000:]
        output = run("caption_bucket", "jobs/caption_bucket.py", "--source", f"{s3}/photos", "--out", f"{s3}/captions",
                     "--checkpoint", found.group(1), "--http-port", str(port))  # fmt: skip
        assert f"{s3}/captions" in output

        rows = {r["key"].rsplit("/", 1)[-1]: r for r in read_results(f"{s3}/captions").to_pylist()}
        assert set(rows) == set(photos)
        assert rows["readme.txt"]["status"] == "error" and "not an image" in rows["readme.txt"]["error"]
        start = time.monotonic()
        for name, body in photos.items():
            if name == "readme.txt":
                continue
            answer = requests.post(f"http://127.0.0.1:{port}/caption", data=body, timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.json()["caption"] == rows[name]["caption"]  # online and bulk give the same caption
        timings["http"] = round(time.monotonic() - start, 1)
    print(f"stage timings (s): {timings}")
