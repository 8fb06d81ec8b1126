"""The whole main job on the embedded default (``make demo``):

local S3 (moto server) + local Ray head -> synthetic data -> Parquet shards on S3 -> DAEN with Ray Train (2 workers,
checkpoints on S3) -> short Ray Tune search -> CAMs -> AffinityNet -> pseudo labels with Ray Data (CAM -> random walk
-> CRF) -> distributed evaluation -> HTML report -> stop the local stack.

    python -m jobs.demo [--quick] [--out demo-out] [--keep-stack] [--address ADDR --storage s3://...]

With ``--address``/``--storage`` it runs against an existing cluster and bucket instead of starting the local stack
(set WSSS_S3_ENDPOINT for an S3-compatible store). Prints where the report is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from jobs import common

log = common.setup_logging()

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # (images, px, train steps, tune samples, tune steps, affinity steps, rw logt)
    "quick": dict(images=160, size=64, steps=120, tune_samples=2, tune_steps=10, aff_steps=40, seg_steps=60),
    "full": dict(images=600, size=64, steps=1000, tune_samples=4, tune_steps=40, aff_steps=200, seg_steps=400),
}


def _stage(name: str, t0: float, timings: list) -> float:
    now = time.perf_counter()
    timings.append({"stage": name, "seconds": round(now - t0, 1)})
    print(f"[demo] {name}: {now - t0:.1f}s", flush=True)
    return now


def run_demo(out: str, quick: bool = False, address: str | None = None, storage: str | None = None,
             keep_stack: bool = False, seed: int = 0) -> dict:
    import ray

    from jobs.evaluate import run_evaluate
    from jobs.pseudolabel import run_pseudolabel
    from jobs.shard import shard_dataset
    from jobs.train import run_training
    from jobs.tune import run_search
    from wsss import config
    from wsss.affinity_train import train_affinity
    from wsss.cam import infer_cams
    from wsss.data.synth import make_synthetic
    from wsss.report import write_report

    p = SIZES["quick" if quick else "full"]
    out_dir = Path(out).resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    timings: list[dict] = []
    t = t_start = time.perf_counter()
    stack = None
    if address is None:
        from infra import stack as local_stack

        state = out_dir / "stack"
        env = local_stack.up(state_dir=state)
        os.environ.update(env)
        stack = (local_stack, state)
        address = env["RAY_ADDRESS"]
        storage = storage or f"{env['WSSS_STORAGE']}/demo"
        print(f"[demo] local stack up: S3 {env.get('WSSS_S3_ENDPOINT')} bucket {env['WSSS_BUCKET']}, "
              f"Ray {address}, dashboard {env.get('WSSS_RAY_DASHBOARD')}", flush=True)
        t = _stage("local stack", t, timings)
    storage = storage or str(out_dir / "storage")
    try:
        common.init_ray(address=address)
        data = out_dir / "synth"
        make_synthetic(str(data), num_images=p["images"], size=p["size"], seed=seed)
        t = _stage("synthetic data", t, timings)
        shards = f"{storage}/shards"
        shard_dataset(str(data), f"{shards}/train", shard_size=64, split="train", progress=False)
        shard_dataset(str(data), f"{shards}/val", shard_size=64, split="val", progress=False)
        t = _stage("shard to storage", t, timings)

        ov = [f"data.root={data}", f"seed={seed}", "optim.epochs=1000"]
        cfg = config.load(ROOT / "configs/synth_daen_tiny.yaml",
                          ov + [f"optim.max_steps={p['steps']}", f"method.warmup_steps={p['steps'] // 2}"])
        tr = run_training(cfg, f"{shards}/train", f"{storage}/runs", "daen", num_workers=2,
                          val_uri=f"{shards}/val", max_failures=1)
        ckpt = tr["final"]
        print(f"[demo] Ray Train: {tr['metrics']}", flush=True)
        t = _stage("train DAEN (Ray Train, 2 workers)", t, timings)

        tune_cfg = config.load(ROOT / "configs/synth_daen_tiny.yaml",
                               ov + [f"optim.max_steps={p['tune_steps']}", f"method.warmup_steps={p['tune_steps'] // 2}"])
        best_yaml = out_dir / "best_config.yaml"
        ts = run_search(tune_cfg, f"{shards}/train", f"{storage}/tune", "demo-search", p["tune_samples"],
                        str(best_yaml), val_uri=f"{shards}/val", num_workers=1, grace_period=1)
        config.load(best_yaml)  # the best config is a valid `wsss train --config` input
        t = _stage(f"tune ({ts.get('n_trials')} trials)", t, timings)

        # the CAM threshold of everything downstream (CAM labels, affinity labels, the walk's background power):
        # the trained model's best on val, as the refinement benchmark does
        thr = min(0.95, max(0.05, float(tr["metrics"].get("val_best_threshold", cfg.infer.bg_threshold))))
        thr_ov = [f"infer.bg_threshold={thr:.2f}"]
        print(f"[demo] CAM threshold for CAM labels, affinity labels and the walk: {thr:.2f}", flush=True)
        cams = out_dir / "cams-train"
        infer_cams(ckpt, str(data), str(cams), split="train", progress=False)
        aff_cfg = config.load(ROOT / "configs/synth_daen_tiny.yaml",
                              ov + [f"optim.max_steps={p['steps']}", f"affinity.max_steps={p['aff_steps']}",
                                    "affinity.epochs=1000",
                                    f"affinity.crop={cfg.data.crop * cfg.affinity.upscale}"] + thr_ov)
        aff = train_affinity(aff_cfg, str(cams), str(data), str(out_dir / "affinity"), split="train", progress=False)
        t = _stage("CAMs + AffinityNet", t, timings)

        results, preds, throughput = {}, {}, []
        for label, stages in (("CAM", ("cam",)), ("+RW+CRF", ("cam", "rw", "crf"))):
            dst = f"{storage}/pseudo/{'-'.join(stages)}"
            pl = run_pseudolabel(ckpt, f"{shards}/val", dst, affinity=aff, stages=stages, progress=False,
                                 verbose=False, cfg_overrides=thr_ov)
            for row in pl.get("stage_stats", []):
                throughput.append({"run": label, **row})
            results[label] = run_evaluate(dst, f"{shards}/val")
            local = out_dir / "pseudo" / "-".join(stages)
            _download(dst, local)
            preds[label] = str(local)
        t = _stage("pseudolabel (Ray Data) + evaluate", t, timings)
        t = _seg_stage(ckpt, aff, shards, storage, data, out_dir, p, seed, thr_ov, results, preds, throughput,
                       timings, t)
        stage_miou = [{"stage": k, "val mIoU %": round(100 * v["miou"], 2)} for k, v in results.items()]
        html = write_report(str(out_dir / "report.html"), str(data), split="val", pred_dirs=preds,
                            results=results, throughput=throughput, max_images=12, title="wsss demo report",
                            stage_miou=stage_miou)
        _stage("report", t, timings)
        summary = {"report": html, "checkpoint": ckpt, "affinity": aff, "best_config": str(best_yaml),
                   "miou": {k: v["miou"] for k, v in results.items()}, "timings": timings,
                   "seconds": round(time.perf_counter() - t_start, 1)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
    finally:
        try:
            ray.shutdown()
        finally:
            if stack is not None and not keep_stack:
                stack[0].down(state_dir=stack[1])


def _seg_stage(ckpt, aff, shards, storage, data, out_dir, p, seed, thr_ov, results, preds, throughput, timings, t):
    """Pseudo labels of the train split (+RW+CRF, Ray Data) -> the segmentation network on them (Ray Train, 2
    workers x batch 5 = the config's batch 10) -> its val predictions (Ray Data) -> mIoU, single scale and
    multi-scale + flip + CRF."""
    from jobs.evaluate import run_evaluate
    from jobs.predict_seg import run_predict_seg
    from jobs.pseudolabel import run_pseudolabel
    from jobs.train_seg import run_train_seg
    from wsss.seg.config import load_seg_config

    labels = f"{storage}/pseudo/train-cam-rw-crf"
    run_pseudolabel(ckpt, f"{shards}/train", labels, affinity=aff, stages=("cam", "rw", "crf"), progress=False,
                    verbose=False, cfg_overrides=thr_ov)
    t = _stage("pseudolabel the train split (Ray Data)", t, timings)
    seg_cfg = load_seg_config(ROOT / "configs/synth_seg.yaml",
                              [f"data.root={data}", f"seed={seed}", f"optim.max_steps={p['seg_steps']}",
                               "optim.batch_size=5"])
    sr = run_train_seg(seg_cfg, f"{shards}/train", f"{storage}/seg-runs", "seg", labels=labels, num_workers=2,
                       val_uri=f"{shards}/val", max_failures=1)
    print(f"[demo] seg net (Ray Train): {sr['metrics']}; {len(sr['rejects'])} labels rejected", flush=True)
    t = _stage("train the segmentation net on the pseudo labels (Ray Train, 2 workers)", t, timings)
    for label, kw in (("seg net", {}), ("seg net +MS+CRF", {"multi_scale": True, "crf": True})):
        dst = f"{storage}/seg-pred/{'ms-crf' if kw else 'ss'}"
        pr = run_predict_seg(sr["final"], f"{shards}/val", dst, **kw)
        for row in pr.get("stage_stats", []):
            throughput.append({"run": label, **row})
        results[label] = run_evaluate(dst, f"{shards}/val")
        local = out_dir / "seg-pred" / ("ms-crf" if kw else "ss")
        _download(dst, local)
        preds[label] = str(local)
    return _stage("segmentation predictions (Ray Data) + evaluate", t, timings)


def _download(uri: str, local: Path) -> None:
    from wsss.data import fs

    from wsss.data.layout import label_dir

    local.mkdir(parents=True, exist_ok=True)
    labels = label_dir(uri)  # <uri>/_labels of a pseudo-label output prefix
    for name in fs.listdir(labels):
        if name.endswith(".png"):
            (local / name).write_bytes(fs.read_bytes(fs.join(labels, name)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller data and budgets (~3 minutes)")
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--address", help="an existing Ray cluster instead of the local stack")
    ap.add_argument("--storage", help="storage prefix (s3://bucket/prefix or a path) for shards and checkpoints")
    ap.add_argument("--keep-stack", action="store_true", help="leave the local S3 and Ray head running")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    s = run_demo(args.out, quick=args.quick, address=args.address, storage=args.storage,
                 keep_stack=args.keep_stack, seed=args.seed)
    print("\n[demo] stage timings: " + ", ".join(f"{r['stage']} {r['seconds']}s" for r in s["timings"]))
    print("[demo] mIoU on the val split: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["miou"].items()))
    print(f"[demo] done in {s['seconds']}s. Open the report: {s['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
