"""Ray Tune over Ray Train on the local stack: a 3-trial search (1 Train worker per trial, 2 epochs, ASHA on the
validation CAM mIoU, state and checkpoints on S3) is interrupted after epoch 1, re-running it restores the search
and every trial resumes from its checkpoint; it ends with a best config that ``wsss.config.load`` (and so
``wsss train --config``) accepts and a table of trials."""
from __future__ import annotations

import csv

import pytest

from tests.train_hooks import fail_after_epoch

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory, synth_root):
    from wsss.data import open_dataset
    from wsss.data.shards import write_shards

    base = tmp_path_factory.mktemp("tune-shards")
    write_shards(open_dataset(str(synth_root), "train"), str(base / "train"), shard_size=8, progress=False)
    write_shards(open_dataset(str(synth_root), "val"), str(base / "val"), shard_size=8, progress=False)
    return str(base / "train"), str(base / "val")


def test_three_trial_search_writes_loadable_best_config(ray_local, s3_server, local_shards, tmp_path):
    import ray.data
    from ray import tune

    from jobs.tune import SEARCH_KEYS, run_search
    from wsss import cli
    from wsss.config import from_dict, load

    ray.data.DataContext.get_current().enable_progress_bars = False
    train_uri, val_uri = local_shards
    cfg = from_dict({"model": {"backbone": "tiny", "width": 8}, "data": {"crop": 48, "resize_long": [48, 64]},
                     "method": {"name": "daen", "scale": 0.5}, "optim": {"batch_size": 4, "epochs": 2},
                     "seed": 3})
    # A small space over every searched key (keeps the tiny network valid: 64 channels / r >= 1).
    space = {
        "method.w_cla": tune.loguniform(0.5, 2.0),
        "method.w_eq": tune.loguniform(0.1, 10.0),
        "method.w_ce": tune.loguniform(0.1, 10.0),
        "model.attention": tune.choice(["none", "channel", "spatial", "csm"]),
        "model.reduction": tune.choice([4, 8]),
        "model.kernel": tune.choice([3, 5, 7]),
        "optim.lr": tune.loguniform(0.003, 0.03),
    }
    storage = s3_server.unique_uri("tune")  # experiment state and every trial's checkpoints on S3
    best_path = tmp_path / "best.yaml"
    kw = dict(val_uri=val_uri, grace_period=1, num_workers=1, space=space, dist_timeout_s=60, max_failures=0)

    # 1) An interrupted search: every trial's Train run dies right after its epoch-1 checkpoint (and Tune does not
    #    rerun it: trial_max_failures=0, as when the driver itself is gone).
    first = run_search(cfg, train_uri, storage, "search", num_samples=3, best_config=str(tmp_path / "b0.yaml"),
                       hooks={"on_epoch": fail_after_epoch(1)}, trial_max_failures=0, **kw)
    assert not first["restored"] and first["n_trials"] == 3
    status1 = {r["trial_id"]: r["status"] for r in first["rows"]}
    # ASHA (grace period 1) may stop a weak trial at epoch 1 before it fails; the others error out.
    assert set(status1.values()) <= {"error", "stopped early"} and "error" in status1.values(), first["rows"]
    assert all(r["epochs"] == 1 and r["val_cam_miou"] is not None for r in first["rows"])

    # 2) Re-running the same command restores the search from S3; the errored trials continue and each one's
    #    Train run resumes from its own epoch-1 checkpoint (epoch 2 only) instead of starting over.
    res = run_search(cfg, train_uri, storage, "search", num_samples=3, best_config=str(best_path), **kw)
    assert res["restored"] is True and res["metric"] == "val_cam_miou" and res["n_trials"] == 3
    assert 1 <= res["concurrent"] <= 3
    assert {r["trial_id"] for r in res["rows"]} == set(status1)
    for r in res["rows"]:
        if status1[r["trial_id"]] == "error":  # continued: epoch 2 only, from the trial's own checkpoint
            assert r["status"] == "completed" and r["epochs"] == 2 and r["resumed"] is True, res["rows"]
        else:  # stopped by ASHA: kept as it was
            assert r["status"] == "stopped early" and r["epochs"] == 1, res["rows"]
    assert all(r.get("val_cam_miou") is not None for r in res["rows"]), res["rows"]
    best_value = res["best"]["val_cam_miou"]
    assert best_value == max(r["val_cam_miou"] for r in res["rows"])

    # The best config is a full Config: the loader accepts it and it carries the best trial's values.
    best = load(str(best_path))
    params = res["best"]["params"]
    assert set(params) == set(SEARCH_KEYS)
    assert best.method.w_eq == pytest.approx(params["method.w_eq"])
    assert best.model.attention == params["model.attention"] and best.model.kernel == params["model.kernel"]
    assert best.optim.lr == pytest.approx(params["optim.lr"])
    assert best.model.width == 8 and best.seed == 3  # the rest comes from the base config
    ns = cli.build_parser().parse_args(["train", "--config", str(best_path)])
    assert ns.fn is cli.cmd_train and cli._load_cfg(ns).to_dict() == best.to_dict()

    with open(res["table_csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {"trial_id", "model.attention", "val_cam_miou", "status"} <= set(table[0])
    assert "| trial_id |" in (tmp_path / "best_trials.md").read_text()
    assert s3_server.secret_key not in (tmp_path / "best_trials.md").read_text() + best_path.read_text()
