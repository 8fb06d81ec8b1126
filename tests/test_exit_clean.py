"""The CLI verbs exit cleanly: each runs as a subprocess (local paths, and an s3:// target on the moto server where
the verb takes one) and its stderr has no ``terminate called`` (a native thread torn down at exit), no
``Fatal Python error`` and no ``Traceback``; the exit code is 0.

The abort this guards against came from Arrow: ``pq.read_table(BufferReader(bytes))`` decodes on Arrow's thread
pools and a pool worker could release the last reference to the Python-owned buffer while the interpreter was
exiting, so its GIL request ended it with ``pthread_exit`` inside a C++ destructor (std::terminate). It was
intermittent (about 1 run in 50 of a bare read_table script here), so each run below can catch it only by chance;
``test_parquet_bytes_are_decoded_without_arrow_threads`` checks the mechanism itself.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faulty_voc import make_faulty_voc

REPO = Path(__file__).resolve().parents[1]
BAD_MARKERS = ("terminate called", "Fatal Python error", "Traceback")


def _run(args: list[str], cwd, timeout: int = 300, module: str = "wsss.cli") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", module] + args
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    for marker in BAD_MARKERS:
        assert marker not in p.stderr, f"{' '.join(args[:2])}: {marker!r} in stderr:\n{p.stderr[-3000:]}"
    assert p.returncode == 0, f"{' '.join(args)} -> rc {p.returncode}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    import torch

    from wsss.checkpoint import save_checkpoint
    from wsss.config import from_dict
    from wsss.models.affinity_net import AffinityNet
    from wsss.train import build_model

    root = tmp_path_factory.mktemp("exit")
    f = make_faulty_voc(root / "voc")
    cfg = from_dict({"model": {"backbone": "tiny", "width": 8}, "infer": {"scales": [1.0], "flip": True},
                     "rw": {"logt": 3}, "crf": {"iters": 2}, "device": "cpu", "seed": 0})
    torch.manual_seed(0)
    save_checkpoint(str(root / "cam"), build_model(cfg, 4), cfg, {"kind": "cam", "class_names": f["class_names"]})
    save_checkpoint(str(root / "aff"), AffinityNet(cfg.model, load_weights=False), cfg,
                    {"kind": "affinity", "class_names": f["class_names"]})
    return {"root": root, "voc": f["root"], "cam": str(root / "cam"), "aff": str(root / "aff")}


def test_parquet_bytes_are_decoded_without_arrow_threads():
    """read_parquet_bytes / iter_parquet_bytes (every in-memory Parquet read of wsss) start no native thread."""
    code = ("import io, os\n"
            "import pyarrow as pa, pyarrow.parquet as pq\n"
            "from wsss.data.io import read_parquet_bytes, iter_parquet_bytes\n"
            "b = io.BytesIO(); pq.write_table(pa.table({'a': list(range(5000)), 'b': [str(i) for i in range(5000)]}),"
            " b, row_group_size=500)\n"
            "n0 = len(os.listdir('/proc/self/task'))\n"
            "t = read_parquet_bytes(b.getvalue()); n = sum(x.num_rows for x in iter_parquet_bytes(b.getvalue(), 100))\n"
            "n1 = len(os.listdir('/proc/self/task'))\n"
            "pq.read_table(pa.BufferReader(b.getvalue()))\n"
            "print(t.num_rows, n, n1 - n0, len(os.listdir('/proc/self/task')) - n1)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, p.stderr[-2000:]
    rows, batched, new_threads, read_table_threads = map(int, p.stdout.split())
    assert rows == batched == 5000 and new_threads == 0
    assert read_table_threads >= 1  # what the helpers avoid: pq.read_table starts Arrow pool threads


def test_local_verbs_exit_cleanly(material):
    root = material["root"]
    _run(["--quiet", "synth", str(root / "syn"), "--num-images", "6", "--size", "32"], root)
    _run(["shard", material["voc"], str(root / "shards"), "--split", "train", "--no-progress", "--verify"], root)
    _run(["--quiet", "cams", "--checkpoint", material["cam"], "--data", material["voc"], "--split", "train",
          "--out", str(root / "cams")], root)
    _run(["evaluate", "--cams", str(root / "cams"), "--data", material["voc"], "--split", "train"], root)
    _run(["--quiet", "pseudolabel", "--checkpoint", material["cam"], "--affinity", material["aff"], "--data",
          material["voc"], "--split", "train", "--out", str(root / "pl")], root)
    p = _run(["evaluate", "--pred", str(root / "pl"), "--data", material["voc"], "--split", "train"], root)
    assert "over 6 images" in p.stdout
    _run(["report", "--data", material["voc"], "--split", "train", "--out", str(root / "rep" / "r.html"),
          "--pred", f"pl={root / 'pl'}", "--cams", str(root / "cams")], root)
    assert (root / "rep" / "r.html").exists()


def test_s3_verbs_exit_cleanly(material, s3_server):
    root = material["root"]
    base = s3_server.unique_uri("exit")
    for _ in range(2):  # the original symptom: `wsss shard` to S3, printed at the end of a run
        _run(["shard", material["voc"], f"{base}/shards", "--split", "train", "--no-progress"], root)
    _run(["--quiet", "pseudolabel", "--checkpoint", material["cam"], "--data", material["voc"], "--split", "train",
          "--stages", "cam,crf", "--out", f"{base}/pl"], root)
    _run(["evaluate", "--pred", f"{base}/pl", "--data", material["voc"], "--split", "train"], root)
    _run(["--quiet", "cams", "--checkpoint", material["cam"], "--data", material["voc"], "--split", "train",
          "--out", f"{base}/cams"], root)


@pytest.mark.ray
def test_ray_jobs_exit_cleanly(material, ray_local, s3_server):
    """The Ray entrypoints as their own driver processes, joined to the test session's local cluster."""
    root = material["root"]
    shards = s3_server.unique_uri("exit-ray") + "/shards"
    _run(["shard", material["voc"], shards, "--split", "train", "--no-progress"], root)
    out = str(root / "ray-pl")
    _run(["--checkpoint", material["cam"], "--data", shards, "--out", out, "--stages", "cam", "--no-progress",
          "--address", ray_local.address], root, module="jobs.pseudolabel")
    _run(["--pred", out, "--data", shards, "--address", ray_local.address], root, module="jobs.evaluate")
