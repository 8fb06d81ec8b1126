"""Segmentation network trained on our pseudo labels vs on the ground-truth masks (same budget), and training
throughput of the plain loop vs Ray Train: ``python -m bench.bench_seg [--work DIR] [--seeds N] ...``.

Chain (one work folder, each step skipped when its output is there): synthetic set -> plain-CAM network
(configs/synth_daen_tiny.yaml, method cam) -> its best CAM threshold on val -> pseudo labels of the train and val splits
(``--stages``, default cam,crf: no AffinityNet in this benchmark's budget) -> the segmentation net of
configs/synth_seg.yaml trained on the train pseudo labels and, with the same steps and seed, on the train masks ->
val mIoU single scale, multi-scale + flip, and each + CRF. Then images/s of ``wsss.seg.train.train_seg`` vs
``jobs.train_seg`` (Ray Train, ``--ray-workers`` workers on a private local cluster, steady-state rate).
The default budget is small (the development CPU is shared); the README figures name the command that made them.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write_table

ROOT = Path(__file__).resolve().parents[1]


def _pseudo_labels(work: Path, data: Path, cam_steps: int, stages: tuple[str, ...], seed: int) -> dict:
    from wsss import config
    from wsss.metrics import evaluate_folder
    from wsss.pseudolabel import pseudolabel
    from wsss.train import train

    ckpt = work / "cam"
    info_f = work / "pseudo.json"
    if info_f.exists():
        return json.loads(info_f.read_text())
    cfg = config.load(ROOT / "configs/synth_daen_tiny.yaml",
                      [f"data.root={data}", "method.name=cam", "model.attention=none", "optim.epochs=1000",
                       f"optim.max_steps={cam_steps}", f"seed={seed}"])
    res = train(cfg, str(ckpt), progress=False, eval_max_images=120)
    thr = float(res["val_best_threshold"])
    cfg.infer.bg_threshold = thr
    info = {"cam_val_miou": res["val_cam_miou"], "threshold": thr, "cam_seconds": res["train_seconds"]}
    for split in ("train", "val"):
        out = work / f"pseudo-{split}"
        pseudolabel(cfg, str(ckpt), str(data), str(out), stages=stages, split=split, progress=False)
        info[f"pseudo_{split}_miou"] = evaluate_folder(str(out), str(data), split=split)["miou"]
    info_f.write_text(json.dumps(info, indent=2))
    return info


def _train(data: Path, labels: str | None, steps: int, seed: int, out: Path, overrides: list[str]) -> dict:
    from wsss.seg.config import load_seg_config
    from wsss.seg.train import train_seg

    cfg = load_seg_config(ROOT / "configs/synth_seg.yaml",
                          [f"data.root={data}", f"optim.max_steps={steps}", f"seed={seed}"]
                          + ([f"data.labels={labels}"] if labels else []) + overrides)
    return train_seg(cfg, str(out), progress=False)


def _ray_throughput(data: Path, labels: str, steps: int, workers: int, batch: int, work: Path) -> dict:
    import ray

    from jobs.common import init_ray
    from jobs.train_seg import run_train_seg
    from wsss.data import open_dataset
    from wsss.data.shards import write_shards
    from wsss.seg.config import load_seg_config

    shards = work / "shards-train"
    if not (shards / "_manifest.json").exists() and not (shards / "manifest.json").exists():
        write_shards(open_dataset(str(data), "train"), str(shards), shard_size=128, progress=False)
    cfg = load_seg_config(ROOT / "configs/synth_seg.yaml",
                          [f"data.root={data}", f"optim.max_steps={steps}", f"optim.batch_size={batch}"])
    init_ray(address="local", num_cpus=max(4, workers + 2))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        res = run_train_seg(cfg, str(shards), str(work / "ray-runs"), f"tp-{time.time_ns()}", labels=labels,
                            num_workers=workers, max_failures=0, checkpoint_every=max(1, steps // 2), export=False)
    finally:
        ray.shutdown()
    return res["metrics"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_seg", description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="work folder (reused: finished steps are skipped)")
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--cam-steps", type=int, default=400)
    ap.add_argument("--stages", default="cam,crf")
    ap.add_argument("--seg-steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--ray-workers", type=int, default=2, help="0: skip the Ray Train throughput row")
    ap.add_argument("--ray-steps", type=int, default=40)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override of configs/synth_seg.yaml for both seg trainings")
    ap.add_argument("--out", default=str(ROOT / "bench/results/seg.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from wsss.data.synth import make_synthetic

    work = Path(args.work or tempfile.mkdtemp(prefix="wsss-bench-seg-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "synth"
    if not (data / "classes.txt").exists():
        make_synthetic(str(data), num_images=args.images, size=args.size, seed=0)
    stages = tuple(s for s in args.stages.split(",") if s)
    pl = _pseudo_labels(work, data, args.cam_steps, stages, seed=0)
    rows: dict[str, list[dict]] = {"pseudo labels": [], "ground truth": []}
    for seed in range(args.seeds):
        for name, labels in (("pseudo labels", str(work / "pseudo-train")), ("ground truth", None)):
            r = _train(data, labels, args.seg_steps, seed, work / f"seg-{name.replace(' ', '-')}-{seed}",
                       args.overrides)
            rows[name].append({**{p: r["val"][p]["miou"] for p in r["val"]["protocols"]},
                               "img_s": r["images_per_s"], "rejects": len(r["rejects"])})
    protocols = [p for p in ("single", "multi", "single+crf", "multi+crf") if p in rows["ground truth"][0]]

    def ms(vals):
        a = 100 * np.asarray(vals, float)
        return f"{a.mean():.2f} ± {a.std():.2f}" if len(a) > 1 else f"{a.mean():.2f}"

    lines = [f"Segmentation net (configs/synth_seg.yaml: light ASPP on the tiny backbone, from scratch) on the "
             f"synthetic set ({args.images} images, {args.size} px), {args.seg_steps} steps, {args.seeds} seed(s), "
             f"val mIoU %. Pseudo labels: plain CAM ({args.cam_steps} steps, val CAM mIoU "
             f"{100 * pl['cam_val_miou']:.2f} at threshold {pl['threshold']:.2f}) + {'+'.join(stages)}; their own "
             f"mIoU: train {100 * pl['pseudo_train_miou']:.2f}, val {100 * pl['pseudo_val_miou']:.2f}.", "",
             "| trained on | " + " | ".join(protocols) + " | plain-loop img/s | label rejects |",
             "|---|" + "---|" * (len(protocols) + 2)]
    for name, rs in rows.items():
        lines.append(f"| {name} | " + " | ".join(ms([r[p] for r in rs]) for p in protocols)
                     + f" | {np.mean([r['img_s'] for r in rs]):.1f} | {rs[0]['rejects']} |")
    lines.append(f"| (pseudo labels themselves, val) | {100 * pl['pseudo_val_miou']:.2f} |"
                 + " |" * (len(protocols) + 1))
    if args.ray_workers > 0:
        cfg_bs = 10
        per = max(1, cfg_bs // args.ray_workers)
        m = _ray_throughput(data, str(work / "pseudo-train"), args.ray_steps, args.ray_workers, per, work)
        lines += ["", f"Training throughput, images/s: plain loop (1 process, batch {cfg_bs}) "
                      f"{np.mean([r['img_s'] for r in rows['pseudo labels']]):.1f}; Ray Train {args.ray_workers} "
                      f"workers x batch {per} (gloo, CPU), {args.ray_steps} steps: last checkpoint window "
                      f"{m.get('images_per_s', float('nan')):.1f}, its steps after the warm-up "
                      f"{(m.get('steady_images_per_s') or float('nan')):.1f}; load average "
                      f"{os.getloadavg()[0]:.1f}."]
    write_table(lines, args.out, "bench.bench_seg", argv)
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
