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
    # token auth on every node, the token file shipped by file_mounts (never in the file), dashboard on loopback
    assert "'export RAY_AUTH_MODE=token'" in " ".join(c["setup_commands"]) and "RAY_AUTH_MODE=disabled" not in text
    assert c["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN=" not in text
    head_start = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "--disable-usage-stats" in text
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text
    # explicit resources for planning; the head runs no tasks but holds the Tune trial drivers
    assert types["head"]["resources"]["CPU"] == 0 and types["head"]["resources"]["driver"] >= 1
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and types["cpu_worker"]["resources"]["CPU"] >= 1
    assert "InstanceMarketOptions" not in types["head"]["node_config"]  # drivers never on spot


# --- IAM policy ---------------------------------------------------------------------------------------------------

def test_iam_policy_least_privilege():
    pol = json.loads((REPO / "infra" / "iam-policy.json").read_text())
    assert pol["Version"] == "2012-10-17"
    stmts = pol["Statement"]
    sids = [s["Sid"] for s in stmts]
    assert len(set(sids)) == len(sids) and all(len(sid) >= 12 for sid in sids)  # each says what it is for
    actions: dict[str, list] = {}
    for s in stmts:
        assert s["Effect"] == "Allow"
        acts = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
        res = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        assert all("*" not in a for a in acts), acts  # no wildcard actions
        assert all(r != "*" and r.startswith("arn:aws:s3:::") for r in res), res
        for a in acts:
            actions.setdefault(a, []).append((res, s.get("Condition")))
    assert set(actions) == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                            "s3:AbortMultipartUpload"}
    conds = {json.dumps(c, sort_keys=True): r for r, c in actions["s3:ListBucket"]}
    assert all(r == ["arn:aws:s3:::YOUR-BUCKET"] for r in conds.values())  # the bucket itself
    # listing keys is limited to the prefix ...
    assert json.dumps({"StringLike": {"s3:prefix": ["wsss", "wsss/*"]}}, sort_keys=True) in conds
    # ... and HeadBucket (pyarrow's create_dir under Ray Train storage; a request without a prefix, which the
    # prefix condition alone denies) is allowed by its own statement
    assert json.dumps({"Null": {"s3:prefix": "true"}}, sort_keys=True) in conds
    for a in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert actions[a] == [(["arn:aws:s3:::YOUR-BUCKET/wsss/*"], None)]


# --- KubeRay RayJob -----------------------------------------------------------------------------------------------

def _k8s_to_jsonschema(node):
    """A Kubernetes structural (openAPIV3) schema as JSON Schema, strict like `kubectl apply` (field validation
    Strict): objects with properties reject unknown fields unless x-kubernetes-preserve-unknown-fields;
    x-kubernetes-int-or-string accepts both."""
    if isinstance(node, list):
        return [_k8s_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _k8s_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    data = json.loads((REPO / "tests" / "data" / "kuberay_rayjob_v1_schema.json").read_text())
    assert "kuberay@v1.7.0" in data["_source"]
    schema = _k8s_to_jsonschema(data["schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((REPO / "infra" / "kuberay-rayjob.yaml").read_text())


def test_kuberay_rayjob_validates_against_the_crd_schema(rayjob, rayjob_schema):
    jsonschema.validate(rayjob, rayjob_schema)
    # the schema bites: a misspelt field, a bad auth mode, a string replica count are all rejected
    for path, value in ((("spec", "rayClusterSpec", "enableInTreeAutoscalng"), True),
                        (("spec", "rayClusterSpec", "authOptions", "mode"), "tokens"),
                        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas"), "4")):
        bad = copy.deepcopy(rayjob)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, rayjob_schema)


def test_kuberay_rayjob_manifest(rayjob):
    from jobs.pseudolabel import _parser, pipeline_plan

    doc = rayjob
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("python -m jobs.pseudolabel")
    rc = spec["rayClusterSpec"]
    assert rc["rayVersion"].startswith("2.60")
    # token auth by the operator (it sets RAY_AUTH_MODE / RAY_AUTH_TOKEN itself); no auth switch of our own
    assert rc["authOptions"] == {"mode": "token"}
    text = (REPO / "infra" / "kuberay-rayjob.yaml").read_text()
    assert "RAY_AUTH_MODE" not in text.split("apiVersion:", 1)[1] and "dashboard-host" not in text
    head = rc["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert json.loads(json.loads(head["rayStartParams"]["resources"]))["driver"] >= 1
    assert rc["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]

    # The actor plan fits the pods the autoscaler may start, and --max-resources says the same maximum.
    args = _parser().parse_args(shlex.split(entry)[3:])
    assert args.data.startswith("s3://") and args.out.startswith("s3://") and args.use_gpu
    plan = pipeline_plan(args.stages.split(","), args.cam_actors, args.rw_actors, args.crf_tasks, args.use_gpu,
                         args.gpus_per_cam_actor, args.gpus_per_rw_actor)
    nodes = [cres.NodeType("head", json.loads(json.loads(head["rayStartParams"]["resources"])), 1, is_head=True)]
    for name, g in groups.items():
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes.append(cres.NodeType(name, {"CPU": float(lim["cpu"]), "GPU": float(lim.get("nvidia.com/gpu", 0))},
                                   g["maxReplicas"]))
    pods = cres.Capacity(nodes, "the manifest's pods", autoscaling=True)
    used = cres.check_plan(plan, pods)
    assert used["gpu"] == 3  # 2 CAM actors on a GPU each + 2 random-walk actors sharing one
    assert cres.parse_resources(args.max_resources) == pods.total()
    # ... while the old plan (random-walk actors on a whole GPU each, 4 GPUs on 2 fixed pods) does not fit
    fixed = cres.Capacity([nodes[0], cres.NodeType("gpu", nodes[1].resources, 2), nodes[2]], "2 pods", True)
    with pytest.raises(cres.PlanError, match="GPU"):
        cres.check_plan(pipeline_plan(["cam", "rw", "crf"], 2, 2, None, True, 1.0, 1.0), fixed)


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


def test_plan_against_the_cluster_yaml(cluster_cfg):
    """Planning uses what ray_cluster.yaml can scale to (node types x max_workers), not the nodes up now."""
    from jobs.pseudolabel import DEFAULT_GPUS_PER_RW_ACTOR, pipeline_plan
    from jobs.train import training_plan
    from jobs.tune import plan_concurrency, trial_driver_bundle

    cap = cres.capacity_from_cluster_config(REPO / "ray_cluster.yaml")
    assert cap.autoscaling and cap.total() == {"CPU": 6 * 16 + 4 * 4, "GPU": 4, "driver": 4}
    assert 0.25 <= DEFAULT_GPUS_PER_RW_ACTOR <= 0.5
    # 2 CAM actors (1 GPU) + 2 walk actors (0.25 GPU): 3 GPU nodes; 16 CRF tasks go to a CPU node, not a GPU one
    used = cres.check_plan(pipeline_plan(["cam", "rw", "crf"], 2, 2, 16, True, 1.0, DEFAULT_GPUS_PER_RW_ACTOR), cap)
    assert used == {"gpu_worker": 3, "cpu_worker": 1}
    assert cres.check_plan(pipeline_plan(["cam", "rw", "crf"], 3, 4, 80, True, 1.0, 0.25), cap) == \
        {"gpu_worker": 4, "cpu_worker": 5}
    with pytest.raises(cres.PlanError, match="random-walk actor"):  # 4 + 4 x 0.25 GPUs > 4
        cres.check_plan(pipeline_plan(["cam", "rw", "crf"], 4, 4, 80, True, 1.0, 0.25), cap)
    # never fits: one line naming what and where
    with pytest.raises(cres.PlanError) as e:
        cres.check_plan(pipeline_plan(["cam"], 5, 0, None, True), cap)
    msg = str(e.value)
    assert "\n" not in msg and "CAM actor" in msg and "ray_cluster.yaml" in msg and "GPU=4" in msg
    with pytest.raises(cres.PlanError, match="no node"):
        cres.check_plan(training_plan(2, cpus_per_worker=8, use_gpu=True), cap)  # g5.xlarge has 4 vCPUs
    assert cres.check_plan(training_plan(4, cpus_per_worker=3, use_gpu=True), cap) == {"gpu_worker": 4}
    # Tune: trial drivers on the head's "driver" slots; concurrency from the maximum (4 driver slots, 4 GPUs)
    assert trial_driver_bundle(cap) == {"CPU": 0, "driver": 1}
    assert plan_concurrency(cap, num_samples=32, num_workers=1, use_gpu=True) == 4
    assert plan_concurrency(cap, num_samples=32, num_workers=2, use_gpu=True) == 2
    assert plan_concurrency(cap, num_samples=2, num_workers=1) == 2
    # a cold live cluster (head only, nothing up yet) would have said 1: the yaml's maximum is what counts
    cold = cres.Capacity([cres.NodeType("head", {"driver": 4}, 1, is_head=True)], "now", autoscaling=False)
    assert plan_concurrency(cold, num_samples=32, num_workers=1) == 1
    # without a driver resource, the trial function takes a CPU
    flat = cres.capacity_from_resources({"CPU": 8})
    assert trial_driver_bundle(flat) == {"CPU": 1} and plan_concurrency(flat, 8, num_workers=2) == 2
    # a worker type without resources cannot be planned against
    bad = copy.deepcopy(cluster_cfg)
    bad["available_node_types"]["cpu_worker"]["resources"] = {}
    with pytest.raises(ValueError, match="cpu_worker has no resources"):
        cres.capacity_from_cluster_config(bad)
    assert cres.parse_resources("CPU=8, GPU=1,driver=2") == {"CPU": 8.0, "GPU": 1.0, "driver": 2.0}
    with pytest.raises(ValueError, match="NAME=NUMBER"):
        cres.parse_resources("CPU:8")


def test_resolve_capacity_order(tmp_path, monkeypatch, cluster_cfg):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(cres.MAX_RESOURCES_ENV, raising=False)
    monkeypatch.delenv(cres.CLUSTER_CONFIG_ENV, raising=False)
    assert cres.resolve_capacity("CPU=3").total() == {"CPU": 3.0}
    monkeypatch.setenv(cres.MAX_RESOURCES_ENV, "CPU=5")
    assert cres.resolve_capacity().total() == {"CPU": 5.0}
    monkeypatch.delenv(cres.MAX_RESOURCES_ENV)
    # on a `ray up` head the launcher's bootstrap copy of the cluster yaml is found without a flag
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(cluster_cfg))
    cap = cres.resolve_capacity()
    assert cap.source.endswith("ray_bootstrap_config.yaml") and cap.total()["GPU"] == 4
    assert cres.resolve_capacity(cluster_config=str(REPO / "ray_cluster.yaml")).source.endswith("ray_cluster.yaml")


def test_no_ray_settings_in_runtime_envs():
    """RAY_AUTH_MODE is the cluster's (set on every node): never pushed into job / worker runtime envs; and no
    internal Ray variable is read."""
    from jobs import common

    assert not [k for k in common.s3_runtime_env_vars() if k.startswith("RAY_")]
    assert not [k for k in common.worker_runtime_env()["env_vars"] if k.startswith("RAY_")]
    for path in list((REPO / "jobs").glob("*.py")) + list((REPO / "cluster").glob("*.py")):
        assert "RAY_JOB_CONFIG_JSON_ENV_VAR" not in path.read_text(), path


def test_sizing_from_live_cluster(ray_local):
    res = cres.cluster_resources()
    assert res["CPU"] == ray_local.num_cpus and res["nodes"] == 1 and res["GPU"] == 0
    assert cres.use_gpu() is False
    assert cres.max_concurrent_trials(*cres.trial_resources(2)) == ray_local.num_cpus // 3
    assert 1 <= cres.actor_pool_size(1) <= ray_local.num_cpus
    live = cres.live_capacity()
    assert not live.autoscaling and live.total()["CPU"] == ray_local.num_cpus
    with pytest.raises(cres.PlanError, match="--max-resources"):  # a fixed cluster: the hint says how to plan
        cres.check_plan([("CAM actor", 1, {"CPU": 1, "GPU": 1})], live)
    # the autoscaler request is only a hint: accepted (and withdrawn) on a cluster without an autoscaler too
    assert cres.request_bundles([{"CPU": 1}, {"CPU": 1}]) is True
    cres.release_request()


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
