"""``ray job submit`` end to end on the local stack: a local Ray head (``infra.local_ray``, dashboard on 127.0.0.1,
RAY_AUTH_MODE as in the tests, set on the head only: not in the job's runtime_env) gets ``python -m jobs.train ...``
with the repository as working_dir (``cluster.submit.submit_job``, log streamed while it runs); the job reads shards
from the local moto S3 and leaves its checkpoints and the final folder there. The test secret key must appear nowhere: not in the job's logs, not in the head's session logs, not
in the files of the Train run."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    """A real ``ray start --head`` on 127.0.0.1 whose processes inherit the local S3 environment."""
    from infra.local_ray import LocalRay

    head = LocalRay(state_dir=tmp_path_factory.mktemp("ray-head"), num_cpus=8,
                    auth_mode=os.environ["RAY_AUTH_MODE"])
    head.start(env=s3_server.env())
    try:
        yield head
    finally:
        head.stop(remove_temp=True)


def _s3_objects(s3_server, uri: str) -> dict[str, bytes]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client = s3_server.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _grep_tree(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:
            continue
    return hits


def test_submitted_training_job_checkpoints_to_s3(ray_head, s3_server, synth_root, tmp_path):
    from cluster.submit import submit_job
    from wsss.checkpoint import load_cam_model
    from wsss.data import open_dataset
    from wsss.data.shards import write_shards

    base = s3_server.unique_uri("job")
    write_shards(open_dataset(str(synth_root), "train"), f"{base}/shards/train", shard_size=8, progress=False)
    write_shards(open_dataset(str(synth_root), "val"), f"{base}/shards/val", shard_size=8, progress=False)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text("model: {backbone: tiny, width: 8}\ndata: {crop: 48, resize_long: [48, 64]}\n"
                        "method: {name: daen, scale: 0.5}\noptim: {batch_size: 2, epochs: 1}\n")
    storage = f"{base}/runs"
    entry = (f"python -m jobs.train --config {cfg_path} --data {base}/shards/train --val {base}/shards/val "
             f"--storage {storage} --name jobrun --num-workers 2 --dist-timeout 60 --set seed=1")
    streamed: list[tuple[float, str]] = []  # (wall time ms, line) as the lines arrive
    res = submit_job(entry, address=ray_head.dashboard_url, working_dir=REPO, timeout_s=420,
                     stream=lambda line: streamed.append((time.time() * 1000, line)))
    status, logs = res
    assert status == "SUCCEEDED", logs[-3000:]
    # the log was streamed while the job ran (the first lines came before its end), redacted, line by line
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_head.dashboard_url).get_job_info(res.job_id)
    assert streamed and streamed[0][0] < info.end_time - 1000, (streamed[:3], info.end_time)
    assert all(line.endswith("\n") for _, line in streamed)
    assert any(line.startswith("{") and '"final"' in line for _, line in streamed)  # up to the last line

    summary = [json.loads(ln) for ln in logs.splitlines() if ln.startswith("{") and '"final"' in ln]
    assert summary, logs[-2000:]
    s = summary[-1]
    assert s["epoch"] == 1 and s["step"] == (18 // 2) // 2 and s["val_cam_miou"] is not None
    assert s["checkpoint"].startswith(f"{storage}/jobrun/checkpoint_")
    assert s["final"] == f"{storage}/jobrun/final"

    objs = _s3_objects(s3_server, f"{storage}/jobrun")
    assert any(k.endswith("/model.pt") and "/checkpoint_" in k for k in objs), sorted(objs)
    _, cfg, meta = load_cam_model(s["final"], device="cpu")
    assert meta["step"] == s["step"] and cfg.seed == 1 and cfg.model.width == 8

    secret = s3_server.secret_key
    assert secret not in logs
    assert not [k for k, v in objs.items() if secret.encode() in v]
    # Ray's own logs of this head (job driver logs, workers, raylet, GCS, dashboard): no secret either.
    session_logs = Path(ray_head.temp_dir) / "session_latest" / "logs"
    assert session_logs.is_dir()
    assert _grep_tree(session_logs, secret.encode()) == []
