"""Regenerate tests/data/kuberay_rayjob_v1_schema.json from KubeRay's RayJob CRD.

Source: github.com/ray-project/kuberay, tag v1.7.0 (commit 59d663aeec13760646da3db9c1cf8cfe883e30b7),
file ray-operator/config/crd/bases/ray.io_rayjobs.yaml (1.4 MB, almost all of it the Kubernetes PodTemplateSpec
schema repeated for the head, every worker group and the submitter pod).

    python tests/data/make_rayjob_crd_schema.py path/to/ray.io_rayjobs.yaml > tests/data/kuberay_rayjob_v1_schema.json

What is kept: the ``v1`` ``openAPIV3Schema`` of RayJob as KubeRay publishes it (``spec`` and everything in
``rayClusterSpec``: authOptions, enableInTreeAutoscaling, autoscalerOptions, head/worker group fields), except
inside pod templates, where every PodSpec / Container field name is kept (so an unknown or misspelt key still fails)
but only these fields keep their full schema: containers[].{name, image, env, resources, ports, command, args},
serviceAccountName, tolerations, nodeSelector; the other fields' schemas are replaced by ``{}`` (anything).
``status`` is dropped (the operator writes it, manifests do not).
"""
from __future__ import annotations

import json
import sys

import yaml

KEEP_POD = {"serviceAccountName", "tolerations", "nodeSelector", "containers"}
KEEP_CONTAINER = {"name", "image", "env", "resources", "ports", "command", "args"}


def prune_container(s: dict) -> dict:
    s = dict(s)
    s["properties"] = {k: (v if k in KEEP_CONTAINER else {}) for k, v in s["properties"].items()}
    return s


def prune_pod_template(t: dict) -> dict:
    t = json.loads(json.dumps(t))
    spec = t["properties"]["spec"]
    props = {}
    for k, v in spec["properties"].items():
        if k == "containers":
            v = dict(v, items=prune_container(v["items"]))
        elif k not in KEEP_POD:
            v = {}
        props[k] = v
    spec["properties"] = props
    return t


def walk(node):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "properties" and isinstance(v, dict):
                out[k] = {pk: (prune_pod_template(pv) if pk in ("template", "submitterPodTemplate")
                               and isinstance(pv, dict) and "spec" in pv.get("properties", {})
                               and "containers" in pv["properties"]["spec"].get("properties", {})
                               else walk(pv)) for pk, pv in v.items()}
            else:
                out[k] = walk(v)
        return out
    if isinstance(node, list):
        return [walk(x) for x in node]
    return node


def main(path: str) -> None:
    crd = yaml.safe_load(open(path))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    schema["properties"].pop("status", None)
    out = {"_source": "github.com/ray-project/kuberay@v1.7.0 (59d663aeec13760646da3db9c1cf8cfe883e30b7) "
                      "ray-operator/config/crd/bases/ray.io_rayjobs.yaml, v1 openAPIV3Schema, pod templates pruned "
                      "by tests/data/make_rayjob_crd_schema.py",
           "schema": walk(schema)}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
