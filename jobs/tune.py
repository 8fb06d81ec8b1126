"""Hyper-parameter search with Ray Tune over Ray Train runs:
``python -m jobs.tune --config CFG --data SHARDS [--val SHARDS] --storage URI --name NAME --num-samples N
[--max-concurrent M] [--grace-period G] --best-config OUT.yaml``.

Train V2 way: a FUNCTION trainable builds and fits one ``TorchTrainer`` per trial (``jobs.train.run_training``)
with ``RunConfig(name=<search>-<trial_id>, callbacks=[TuneReportCallback()])``; the callback forwards rank 0's
per-epoch metrics to Tune (``Tuner(TorchTrainer)`` is deprecated). Search space (DAEN's knobs): the loss weights
``method.w_cla``, ``method.w_eq``, ``method.w_ce`` (log-uniform), ``model.attention`` (none/channel/spatial/csm),
``model.reduction`` r, ``model.kernel`` k (3/5/7) and ``optim.lr`` (log-uniform). ASHA stops weak trials early on
the validation CAM mIoU (``val_cam_miou``, mode max) when a validation shard folder with masks is given, else on
``neg_loss`` (= -training loss, mode max), with the training epoch as ASHA's time (it keeps counting across a
resumed trial, unlike Tune's ``training_iteration``). The concurrency comes from what the cluster can scale to
(``cluster.resources.resolve_capacity``: ``--max-resources``, ``--cluster-config``, the launcher's bootstrap config on
the head, else the nodes up now), not from the nodes up at the start: each trial holds its driver slot plus its
Train workers, and Ray Data keeps a CPU reserve. When the cluster has a custom ``driver`` resource (the head in
``ray_cluster.yaml`` and the KubeRay manifest), each trial's function (and so the Train controller next to it)
takes one ``driver`` unit instead of a CPU, so that trial drivers live on the on-demand head, never on spot
workers (Ray's fault-tolerance guide). ``--trial-max-failures`` (default 1) lets Tune rerun a failed trial, which
resumes from its own last Train checkpoint.

Storage: the Tune experiment is ``<storage>/<name>/``; each trial's Train run (its checkpoints) is
``<storage>/<name>/train_runs/<name>-<trial_id>/``. Re-running the same command resumes an interrupted search
(``Tuner.can_restore`` -> ``Tuner.restore``): finished trials are kept, unfinished ones continue, and each
continued trial's Train run resumes from its own last checkpoint (same run name).

Output: ``--best-config`` gets the best trial's full resolved config (``wsss.config.Config.to_yaml``; loadable by
``wsss.config.load`` / ``wsss train --config``) and beside it ``<stem>_trials.csv`` and ``<stem>_trials.md`` (one
row per trial: parameters, epochs run, metrics, status).
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import logging
import math
import sys
import time
from typing import Any

from cluster import resources as cres
from jobs import common

log = logging.getLogger("wsss.jobs.tune")

SEARCH_KEYS = ("method.w_cla", "method.w_eq", "method.w_ce", "model.attention", "model.reduction", "model.kernel",
               "optim.lr")


def default_space(base_lr: float = 0.01) -> dict:
    """The search space (Tune domains keyed by dotted config keys)."""
    from ray import tune

    return {
        "method.w_cla": tune.loguniform(0.3, 3.0),
        "method.w_eq": tune.loguniform(0.1, 10.0),
        "method.w_ce": tune.loguniform(0.1, 10.0),
        "model.attention": tune.choice(["none", "channel", "spatial", "csm"]),
        "model.reduction": tune.choice([4, 8, 16]),
        "model.kernel": tune.choice([3, 5, 7]),
        "optim.lr": tune.loguniform(base_lr / 4, base_lr * 4),
    }


def apply_params(base: dict, params: dict):
    """A validated ``Config`` from a base config dict and dotted-key parameters (unknown keys are ignored)."""
    from wsss.config import from_dict

    data = copy.deepcopy(base)
    for key, value in params.items():
        if "." not in key or key.startswith("_"):
            continue
        section, _, field = key.partition(".")
        if not isinstance(data.get(section), dict):
            continue
        if hasattr(value, "item"):  # numpy scalar
            value = value.item()
        data[section][field] = value
    return from_dict(data)


def _trial_fn(config: dict, job: dict) -> None:
    """The Tune function trainable: one Ray Train run with this trial's parameters."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.train import run_training

    cfg = apply_params(job["base"], config)
    trial_id = tune.get_context().get_trial_id()
    run_training(cfg, job["shards_uri"], job["train_storage"], f"{job['name']}-{trial_id}",
                 num_workers=job["num_workers"], use_gpu=job["use_gpu"], cpus_per_worker=job["cpus_per_worker"],
                 max_failures=job["max_failures"], val_uri=job["val_uri"], export=False,
                 val_max_images=job["val_max_images"], dist_timeout_s=job["dist_timeout_s"],
                 callbacks=[TuneReportCallback()], hooks=job.get("hooks"))


DRIVER_RESOURCE = "driver"


def trial_driver_bundle(capacity) -> dict:
    """The resources of one trial's function: a ``driver`` unit (no CPU) when the cluster has that custom resource
    (trial drivers pinned to the head), else 1 CPU."""
    if capacity.total().get(DRIVER_RESOURCE, 0) >= 1:
        return {"CPU": 0, DRIVER_RESOURCE: 1}
    return {"CPU": 1}


def plan_concurrency(capacity, num_samples: int, num_workers: int, cpus_per_worker: float = 1,
                     use_gpu: bool = False, max_concurrent: int | None = None,
                     reserve_cpus: float | None = None) -> int:
    """Trials that fit at once on what the cluster can scale to: each trial = its driver bundle + ``num_workers``
    Train workers ({CPU: cpus_per_worker, GPU: 1 with use_gpu}), next to a CPU reserve for Ray Data (default 20 %
    of the CPUs, >= 1); capped by ``max_concurrent`` and ``num_samples``, at least 1."""
    worker = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    group = [trial_driver_bundle(capacity)] + [dict(worker) for _ in range(max(0, int(num_workers)))]
    if reserve_cpus is None:
        reserve_cpus = max(1.0, float(capacity.total().get("CPU", 0)) * 0.2)
    reserve = [{"CPU": 1.0} for _ in range(math.ceil(reserve_cpus - 1e-9))]
    limit = max(1, min(int(num_samples), int(max_concurrent) if max_concurrent else int(num_samples)))
    return cres.count_fitting(group, capacity, limit, reserve=reserve)


def _has_masks(val_uri: str | None) -> bool:
    if not val_uri:
        return False
    from wsss.data import shards

    try:
        m = shards.read_manifest(val_uri)
    except (FileNotFoundError, ValueError):
        return False
    return bool(m.get("has_masks", True)) and int(m.get("n_images", 0)) > 0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def trials_table(result_grid, metric: str, max_t: int | None = None) -> list[dict]:
    """One row per trial: trial_id, parameters, epochs, metric, loss, status."""
    rows = []
    for r in result_grid:
        m = r.metrics or {}
        cfg = r.config or {}
        row: dict[str, Any] = {"trial_id": m.get("trial_id") or cfg.get("trial_id") or _trial_id_from_path(r.path)}
        for k in SEARCH_KEYS:
            row[k] = cfg.get(k)
        row["epochs"] = m.get("epoch")
        row[metric] = m.get(metric)
        row["loss"] = m.get("loss")
        row["resumed"] = m.get("resumed")
        if metric != "val_cam_miou" and "val_cam_miou" in m:
            row["val_cam_miou"] = m.get("val_cam_miou")
        it = m.get("epoch") or 0
        row["status"] = "error" if r.error else ("completed" if max_t and it >= max_t else "stopped early")
        if r.error:
            row["error"] = common.redact(str(r.error).splitlines()[0][:160])
        rows.append(row)
    rows.sort(key=lambda x: (x.get(metric) is None, -(x.get(metric) or 0.0)))
    return rows


def _trial_id_from_path(path: str | None) -> str:
    if not path:
        return ""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    parts = base.split("_")
    return parts[2] if len(parts) > 2 else base


def _table_text(rows: list[dict]) -> tuple[str, str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in cols})
    md = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    md += ["| " + " | ".join(_fmt(r.get(k)).replace("|", "/") for k in cols) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md) + "\n"


def _sibling(uri: str, suffix: str) -> str:
    stem = uri[:-5] if uri.endswith(".yaml") else (uri[:-4] if uri.endswith(".yml") else uri)
    return stem + suffix


def run_search(cfg, shards_uri: str, storage_uri: str, name: str, num_samples: int, best_config: str,
               val_uri: str | None = None, max_concurrent: int | None = None, grace_period: int = 1,
               num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float = 1, max_failures: int = 1,
               space: dict | None = None, seed: int | None = None, val_max_images: int = 8,
               dist_timeout_s: int = 600, reserve_cpus: float | None = None, hooks: dict | None = None,
               trial_max_failures: int = 1, max_resources: str | dict | None = None,
               cluster_config: str | None = None) -> dict:
    """Run (or resume) a search; Ray must be initialised. Returns a dict: best (params, metric value, trial_id),
    metric, mode, best_config (path), table_csv, table_md, n_trials, restored, rows, seconds."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from wsss.data import fs as wfs

    from jobs.train import plan_steps
    from wsss.data import shards

    t0 = time.perf_counter()
    per_epoch, total = plan_steps(cfg, int(shards.read_manifest(shards_uri)["n_images"]), num_workers)
    if per_epoch < 1:
        raise ValueError(f"shards {shards_uri}: too few images for {num_workers} worker(s) x batch "
                         f"{cfg.optim.batch_size}")
    epochs = max(1, math.ceil(total / per_epoch))  # reports (ASHA time steps) per trial
    metric = "val_cam_miou" if _has_masks(val_uri) else "neg_loss"
    mode = "max"
    base = cfg.to_dict()
    job = {"base": base, "shards_uri": shards_uri, "val_uri": val_uri if metric == "val_cam_miou" else None,
           "train_storage": wfs.join(storage_uri, name, "train_runs"), "name": name,
           "num_workers": int(num_workers), "use_gpu": bool(use_gpu), "cpus_per_worker": float(cpus_per_worker),
           "max_failures": int(max_failures), "val_max_images": int(val_max_images),
           "dist_timeout_s": int(dist_timeout_s), "hooks": dict(hooks or {})}  # hooks: test fault injection
    capacity = cres.resolve_capacity(max_resources, cluster_config)
    driver = trial_driver_bundle(capacity)
    trainable = tune.with_resources(tune.with_parameters(_trial_fn, job=job), driver)
    concurrent = plan_concurrency(capacity, num_samples, num_workers, cpus_per_worker, use_gpu, max_concurrent,
                                  reserve_cpus)

    storage_path, storage_fs = common.storage_for_ray(storage_uri)
    exp_path = f"{storage_path.rstrip('/')}/{name}"
    restored = tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs)
    if restored:
        log.info("tune %s: resuming the interrupted search in %s", name, common.redact(storage_uri))
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_fs)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        scheduler = ASHAScheduler(time_attr="epoch", max_t=max(1, epochs),
                                  grace_period=max(1, min(int(grace_period), epochs)), reduction_factor=2)
        # The variant generator takes the concurrency cap itself (Tune ignores max_concurrent_trials with it).
        searcher = BasicVariantGenerator(random_state=cfg.seed if seed is None else seed, max_concurrent=concurrent)
        tuner = tune.Tuner(
            trainable,
            param_space=dict(space if space is not None else default_space(cfg.optim.lr)),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=int(num_samples),
                                        scheduler=scheduler,
                                        search_alg=searcher),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                      failure_config=tune.FailureConfig(max_failures=int(trial_max_failures)),
                                      verbose=0),
        )
    log.info("tune %s: %d samples, %d concurrent (%s), trial driver %s, metric %s (%s)", name, num_samples,
             concurrent, capacity.describe(), driver, metric, mode)
    grid = tuner.fit()

    rows = trials_table(grid, metric, max_t=epochs)
    scored = [r for r in rows if r.get(metric) is not None]
    if not scored:
        errs = [r.get("error") for r in rows if r.get("error")]
        raise RuntimeError(f"tune {name}: no trial reported {metric}" + (f" (first error: {errs[0]})" if errs else ""))
    best_result = grid.get_best_result(metric=metric, mode=mode)
    best_params = {k: best_result.config.get(k) for k in SEARCH_KEYS if k in best_result.config}
    best_cfg = apply_params(base, best_params)
    wfs.write_bytes(best_config, best_cfg.to_yaml().encode())
    csv_text, md_text = _table_text(rows)
    table_csv, table_md = _sibling(best_config, "_trials.csv"), _sibling(best_config, "_trials.md")
    wfs.write_bytes(table_csv, csv_text.encode())
    header = (f"# Tune search `{name}`\n\nmetric: `{metric}` ({mode}), {len(rows)} trials, ASHA grace period "
              f"{grace_period}, best config: `{best_config}`\n\n")
    wfs.write_bytes(table_md, (header + md_text).encode())
    best_value = (best_result.metrics or {}).get(metric)
    return {"best": {"params": best_params, metric: best_value,
                     "trial_id": (best_result.metrics or {}).get("trial_id")},
            "metric": metric, "mode": mode, "best_config": best_config, "table_csv": table_csv,
            "table_md": table_md, "n_trials": len(rows), "restored": restored, "concurrent": concurrent,
            "trial_driver": driver,
            "rows": rows, "experiment": wfs.join(storage_uri, name), "seconds": time.perf_counter() - t0}


# ---- CLI ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.splitlines()[0])
    common.add_config_args(p)
    p.add_argument("--data", required=True, help="train shard folder, local or s3://")
    p.add_argument("--val", default=None, help="validation shard folder with masks (metric val_cam_miou)")
    p.add_argument("--storage", required=True, help="Tune/Train storage: local path or s3://bucket/prefix")
    p.add_argument("--name", required=True, help="search name; re-running with the same name resumes it")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on concurrent trials (default: fit)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA grace period in epochs")
    p.add_argument("--best-config", required=True, help="where to write the best config YAML (local or s3://)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--max-failures", type=int, default=1, help="worker-group restarts per trial")
    p.add_argument("--trial-max-failures", type=int, default=1,
                   help="Tune reruns of a failed trial (it resumes from its last checkpoint; default 1)")
    p.add_argument("--val-images", type=int, default=8)
    common.add_cluster_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from wsss.config import ConfigError

    args = build_parser().parse_args(argv)
    cfg = common.start_job(args, "tune")
    if cfg is None:
        return 2
    try:
        res = run_search(cfg, args.data, args.storage, args.name, args.num_samples, args.best_config,
                         val_uri=args.val, max_concurrent=args.max_concurrent, grace_period=args.grace_period,
                         num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                         max_failures=args.max_failures, val_max_images=args.val_images,
                         trial_max_failures=args.trial_max_failures, max_resources=args.max_resources,
                         cluster_config=args.cluster_config)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as e:
        print(f"tune: error: {common.redact(str(e).splitlines()[0] if str(e) else type(e).__name__)}",
              file=sys.stderr)
        return 2
    print(open_md(res["table_md"]))
    print(common.dump_json_line({k: res[k] for k in ("best", "metric", "best_config", "table_csv", "n_trials",
                                                     "restored", "seconds")}))
    return 0


def open_md(uri: str) -> str:
    from wsss.data import fs as wfs

    return wfs.read_bytes(uri).decode()


if __name__ == "__main__":
    sys.exit(main())
