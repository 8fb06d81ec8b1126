"""A real autoscaling cluster on this machine: Ray's fake multi-node provider (what ``ray.cluster_utils.
AutoscalingCluster`` starts, without its ``ray stop --force``, which would end every other Ray on a shared machine)
with a 0-CPU head holding the ``driver`` resource and worker types at ``min_workers: 0`` shaped like
``ray_cluster.yaml`` (gpu_worker, cpu_worker; CPU-sized for a 2-core machine, no GPUs). Nothing but the head is up
when ``ray job submit`` sends ``jobs.pseudolabel`` and a 1-trial ``jobs.tune``: both plan against the config
(``--cluster-config``), ask the autoscaler for their nodes and must finish. The head's processes (and the fake
worker nodes, which share its temp dir) are ended by pid (``infra.local_ray.LocalRay.stop``)."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 12
TINY = {"model": {"backbone": "tiny", "width": 8}, "data": {"crop": 48, "resize_long": [48, 64]},
        "method": {"name": "daen", "scale": 0.5}, "optim": {"batch_size": 2, "epochs": 1, "max_steps": 3},
        "infer": {"scales": [1.0], "flip": False}, "crf": {"iters": 3}, "device": "cpu", "seed": 0}


def fake_cluster_config(real: dict, head_driver: int = 2) -> dict:
    """The fake provider's config with ray_cluster.yaml's worker types (min_workers 0), each with 2 CPUs and at
    most 1-2 nodes (this machine has 2 cores), and its head (CPU 0 + driver)."""
    types = {"ray.head.default": {"resources": {"driver": head_driver}, "node_config": {}, "max_workers": 0}}
    for name, cap in (("gpu_worker", 1), ("cpu_worker", 2)):
        t = real["available_node_types"][name]
        assert t["min_workers"] == 0
        types[name] = {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
                       "max_workers": min(cap, t["max_workers"])}
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")
    return {"cluster_name": "wsss-fake", "max_workers": 3, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {}, "docker": {}, "available_node_types": types, "head_node_type": "ray.head.default",
            "file_mounts": {}, "file_mounts_sync_continuously": False, **{k: [] for k in empty}}


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory, s3_server):
    from infra.local_ray import LocalRay, free_port, head_env, ray_executable

    state = tmp_path_factory.mktemp("fake-cluster")
    head = LocalRay(state)  # only for its private temp dir and its stop-by-pid
    real = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    gcs, dport = free_port(), free_port()
    cfg = fake_cluster_config(real)
    cfg["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    cfg_path = state / "fake_cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [ray_executable(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=0",
           "--resources=" + json.dumps(cfg["available_node_types"]["ray.head.default"]["resources"]),
           f"--autoscaling-config={cfg_path}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dport}", "--disable-usage-stats", f"--temp-dir={head.temp_dir}"]
    env = head_env({**s3_server.env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
                   os.environ["RAY_AUTH_MODE"])
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
        yield {"dashboard": f"http://127.0.0.1:{dport}", "config": str(cfg_path), "cfg": cfg}
    finally:
        head.stop(remove_temp=True)
        assert head.pids() == []


def _nodes(dashboard: str) -> list[dict]:
    from ray.util.state import list_nodes

    return [n.__dict__ if hasattr(n, "__dict__") else dict(n) for n in list_nodes(address=dashboard)]


def _submit(dashboard: str, entry: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}")
    return subprocess.run(["ray", "job", "submit", "--address", dashboard, "--working-dir", str(REPO), "--", *entry],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_jobs_scale_a_cold_autoscaling_cluster(autoscaling_head, tmp_path, synth_root):
    import torch

    from jobs.pseudolabel import pipeline_plan
    from cluster import resources as cres
    from wsss.checkpoint import save_checkpoint
    from wsss.config import from_dict, load
    from wsss.data import open_dataset
    from wsss.data.shards import write_shards
    from wsss.train import build_model

    dash = autoscaling_head["dashboard"]
    alive = [n for n in _nodes(dash) if n.get("state") == "ALIVE"]
    assert len(alive) == 1  # the head only: min_workers 0, nothing up yet

    # The plan check the jobs do, against the same config: fits the maximum, not the (0-CPU) nodes up now.
    cap = cres.capacity_from_cluster_config(autoscaling_head["config"])
    plan = pipeline_plan(["cam", "crf"], 1, 0, 1, False)
    assert cres.check_plan(plan, cap)
    with pytest.raises(cres.PlanError):
        cres.check_plan(plan, cres.Capacity([cres.NodeType("head", {"driver": 2}, 1, is_head=True)], "now", False))

    ds = open_dataset(str(synth_root), "train")
    shards = str(tmp_path / "shards")
    write_shards(ds, shards, shard_size=6, progress=False)
    cfg = from_dict(TINY)
    torch.manual_seed(0)
    ckpt = str(tmp_path / "cam")
    save_checkpoint(ckpt, build_model(cfg, ds.num_classes), cfg, {"kind": "cam", "class_names": list(ds.class_names)})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))

    t0 = time.monotonic()
    summary = tmp_path / "pl.json"
    pl = _submit(dash, ["python", "-m", "jobs.pseudolabel", "--cluster", "--checkpoint", ckpt, "--data", shards,
                        "--out", str(tmp_path / "labels"), "--stages", "cam,crf", "--max-images", str(N_IMAGES),
                        "--crf-tasks", "1", "--cluster-config", autoscaling_head["config"], "--no-progress",
                        "--json", str(summary)])
    t_pl = time.monotonic() - t0
    assert pl.returncode == 0, (pl.stdout + pl.stderr)[-4000:]
    res = json.loads(summary.read_text())
    assert res["n_ok"] == N_IMAGES and res["duplicates_in_run"] == 0 and res["n_rejected"] == 0

    t0 = time.monotonic()
    tu = _submit(dash, ["python", "-m", "jobs.tune", "--cluster", "--config", str(tmp_path / "tiny.yaml"),
                        "--data", shards, "--storage", str(tmp_path / "tune"), "--name", "cold", "--num-samples", "1",
                        "--num-workers", "1", "--best-config", str(tmp_path / "best.yaml"),
                        "--cluster-config", autoscaling_head["config"]])
    t_tu = time.monotonic() - t0
    assert tu.returncode == 0, (tu.stdout + tu.stderr)[-4000:]
    assert load(str(tmp_path / "best.yaml")).model.width == 8
    assert '"n_trials": 1' in tu.stdout

    nodes = _nodes(dash)
    assert len(nodes) >= 2, nodes  # worker nodes were started by the autoscaler for the jobs
    print(f"autoscaling test: pseudolabel job {t_pl:.0f} s, tune job {t_tu:.0f} s, {len(nodes)} nodes seen")
