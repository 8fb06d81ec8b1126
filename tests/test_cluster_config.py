"""Cluster configs (ray_cluster.yaml, IAM policy, KubeRay RayJob), sizing helpers, .rayignore, and the local
dev stack (real moto server + real `ray start --head`, job submitted through the dashboard)."""
from __future__ import annotations

import copy
import json
import os
import shlex
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster import resources as cres

REPO = Path(__file__).resolve().parents[1]


def _ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.exists(), path
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


# --- ray_cluster.yaml ---------------------------------------------------------------------------------------------

def test_cluster_yaml_validates_against_ray_schema(cluster_cfg):
    schema = _ray_schema()
    jsonschema.validate(cluster_cfg, schema)
    # the schema really bites: an unknown top-level key and a fractional resource are both rejected
    bad = copy.deepcopy(cluster_cfg)
    bad["worker_nodes_typo"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cluster_cfg)
    bad["available_node_types"]["cpu_worker"]["resources"] = {"CPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_cluster_yaml_passes_rays_own_validation_offline(cluster_cfg, monkeypatch):
    """Ray's prepare_config (defaults merge) + validate_config, with every network connection refused."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    def no_network(self, *a, **k):
        raise AssertionError("network access during config validation")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    prepared = prepare_config(copy.deepcopy(cluster_cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    # a min_workers sum above max_workers is caught by Ray's checks
    bad = copy.deepcopy(prepared)
    bad["available_node_types"]["cpu_worker"]["min_workers"] = bad["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(bad)


def test_cluster_yaml_content(cluster_cfg):
    c = cluster_cfg
    assert c["provider"]["type"] == "aws"
    types = c["available_node_types"]
    assert set(types) == {"head", "gpu_worker", "cpu_worker"}
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p3.", "p4", "p5"))
    assert types["cpu_worker"]["node_config"]["InstanceType"].startswith(("c6i.", "c7i.", "c5."))
    for name in ("gpu_worker", "cpu_worker"):
        t = types[name]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= c["max_workers"]
    for t in types.values():  # S3 through an instance profile, not keys
        assert "instance-profile/" in t["node_config"]["IamInstanceProfile"]["Arn"]
    setup = " ".join(c["setup_commands"])
    assert "pip install" in setup and "-e" in setup and "~/wsss" in setup
    assert "~/wsss" in c["file_mounts"]
    for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"]:
        assert "wsss_env" in cmd  # the venv on PATH + RAY_AUTH_MODE for every ray start
    text = (REPO / "ray_cluster.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" in text and "--disable-usage-stats" in text
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text


# --- IAM policy ---------------------------------------------------------------------------------------------------

def test_iam_policy_least_privilege():
    pol = json.loads((REPO / "infra" / "iam-policy.json").read_text())
    assert pol["Version"] == "2012-10-17"
    stmts = pol["Statement"]
    actions = {}
    for s in stmts:
        assert s["Effect"] == "Allow"
        acts = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
        res = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        assert all("*" not in a for a in acts), acts  # no wildcard actions
        assert all(r != "*" and r.startswith("arn:aws:s3:::") for r in res), res
        for a in acts:
            actions[a] = (res, s.get("Condition"))
    assert set(actions) == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                            "s3:AbortMultipartUpload"}
    list_res, list_cond = actions["s3:ListBucket"]
    assert list_res == ["arn:aws:s3:::YOUR-BUCKET"]  # the bucket itself, listing limited to the prefix
    assert list_cond["StringLike"]["s3:prefix"] == ["wsss", "wsss/*"]
    for a in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert actions[a][0] == ["arn:aws:s3:::YOUR-BUCKET/wsss/*"]


# --- KubeRay RayJob -----------------------------------------------------------------------------------------------

def test_kuberay_rayjob_manifest():
    doc = yaml.safe_load((REPO / "infra" / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("python -m jobs.pseudolabel")
    rc = spec["rayClusterSpec"]
    assert rc["rayVersion"].startswith("2.60")
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"]
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    # the entrypoint's flags are accepted by the pipeline's own argument parser (when that job exists)
    try:
        from jobs.pseudolabel import _parser
    except ImportError:
        return
    args = _parser().parse_args(shlex.split(entry)[3:])
    assert args.data.startswith("s3://") and args.out.startswith("s3://")


# --- .rayignore / runtime env -------------------------------------------------------------------------------------

def test_rayignore_and_runtime_env(s3_server):
    from cluster.submit import job_runtime_env, read_rayignore

    pats = read_rayignore(REPO)
    for needed in (".venv/", ".git/", "data/", "runs/", "bench/results/", "*.pt", "__pycache__/", ".wsss-stack/"):
        assert needed in pats
    rt = job_runtime_env(REPO, env={"X": "1"})
    assert rt["working_dir"] == str(REPO) and rt["excludes"] == pats
    assert rt["env_vars"]["X"] == "1" and rt["env_vars"]["WSSS_S3_ENDPOINT"] == s3_server.endpoint
    assert "AWS_SECRET_ACCESS_KEY" not in rt["env_vars"]  # not shipped unless asked
    assert job_runtime_env(REPO, ship_credentials=True)["env_vars"]["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key


# --- sizing helpers -----------------------------------------------------------------------------------------------

def test_sizing_helpers():
    cpu8 = {"CPU": 8.0, "GPU": 0.0}
    gpu4 = {"CPU": 64.0, "GPU": 4.0}
    assert not cres.use_gpu(cpu8) and cres.use_gpu(gpu4)
    assert cres.trial_resources(2, cpus_per_worker=1) == (3, 0)
    assert cres.trial_resources(0) == (1, 0)
    assert cres.max_concurrent_trials(3, 0, cpu8) == 2
    assert cres.max_concurrent_trials(3, 0, cpu8, reserve_cpus=2) == 2
    assert cres.max_concurrent_trials(3, 0, cpu8, reserve_cpus=3) == 1
    assert cres.max_concurrent_trials(20, 0, cpu8) == 1  # never 0
    assert cres.max_concurrent_trials(3, 2, gpu4) == 2  # GPUs bind first
    assert cres.max_concurrent_trials(1, 0, cpu8, cap=3) == 3
    assert cres.actor_pool_size(1, 1, gpu4) == 4
    assert cres.actor_pool_size(1, 0.5, gpu4) == 8
    assert cres.actor_pool_size(2, 0, cpu8, reserve_cpus=2) == 3
    assert cres.actor_pool_size(1, 0, cpu8, share=0.5, max_size=3) == 3
    assert cres.train_workers(gpu4) == (4, True)
    assert cres.train_workers(cpu8, max_workers=2) == (2, False)
    with pytest.raises(ValueError):
        cres.max_concurrent_trials(0, 0, cpu8)


def test_sizing_from_live_cluster(ray_local):
    res = cres.cluster_resources()
    assert res["CPU"] == ray_local.num_cpus and res["nodes"] == 1 and res["GPU"] == 0
    assert cres.use_gpu() is False
    assert cres.max_concurrent_trials(*cres.trial_resources(2)) == ray_local.num_cpus // 3
    assert 1 <= cres.actor_pool_size(1) <= ray_local.num_cpus


# --- local stack: S3 + Ray head + job submission ------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
def test_local_stack_up_submit_down(tmp_path, s3_server):
    """`infra.stack up` starts moto + a Ray head; a job submitted with cluster.submit reads and writes the stack's
    S3 through the head's environment; logs carry no secret; `down` leaves no process of ours behind."""
    from cluster.submit import submit_job
    from infra import stack
    from infra.local_ray import LocalRay
    from infra.local_s3 import LOCAL_SECRET_KEY, LocalS3

    state = tmp_path / "stack"
    try:
        env = stack.up(state, bucket="wsss-stack-test", num_cpus=2, dashboard_port=0)
        assert env["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
        assert env["RAY_ADDRESS"] == env["WSSS_RAY_GCS_ADDRESS"] and env["RAY_AUTH_MODE"] == "disabled"
        assert stack.load_env(state / "env") == env
        assert oct((state / "env").stat().st_mode & 0o777) == "0o600"
        st = stack.status(state)
        assert st["s3"]["running"] and st["ray"]["running"]
        assert "AWS_SECRET_ACCESS_KEY" not in stack.public_env(env)

        # the job runs on the head with the head's PATH (.venv python) and S3 settings; it prints the secret's
        # env var on purpose so that the redaction of the returned logs is tested. The submitting process uses
        # the stack's env (as `python -m infra.stack exec -- ...` would).
        code = ("import os, sys; from wsss.data import fs; "
                "fs.write_bytes('s3://wsss-stack-test/job/out.txt', sys.executable.encode()); "
                "print('SECRET', os.environ['AWS_SECRET_ACCESS_KEY'])")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            from wsss.data import fs

            status, logs = submit_job(f'python -c "{code}"', working_dir=REPO, timeout_s=180)
            written = fs.read_bytes("s3://wsss-stack-test/job/out.txt").decode() if status == "SUCCEEDED" else ""
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert status == "SUCCEEDED", logs[-2000:]
        assert "SECRET ***" in logs and LOCAL_SECRET_KEY not in logs
        assert Path(written).parent.name == "bin"  # the venv's interpreter, not a system python
        ray_head, s3 = LocalRay(state), LocalS3(state)
        assert ray_head.pids() and s3.pid
    finally:
        out = stack.down(state, remove_logs=True)
    assert out["s3_stopped"] and out["ray_processes_stopped"] >= 3
    assert LocalRay(state).pids() == [] and not (state / "env").exists()
    assert not Path(LocalRay(state).temp_dir).exists()
    assert not LocalS3(state).running()
