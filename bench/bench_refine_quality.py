"""Quality of each refinement stage on the synthetic set — the analogue of the DAEN paper's Table 3:
mIoU of CAM, +RW, +CRF, +RW+CRF for seam and daen, several seeds, mean ± std.

    python -m bench.bench_refine_quality --work /tmp/wsss-bench-XXXX [--methods seam,daen-csm] [--seeds 3]

Uses the CAM checkpoints that ``bench.bench_cam_methods`` leaves in its work folder (``<work>/<variant>-<seed>``,
and the synthetic data at ``<work>/synth``). Per checkpoint: CAMs on the train split -> AffinityNet -> on the val
split the four label maps of each image, scored with one confusion matrix per stage, plus a diagnostic column: the
same walk with oracle affinities from the ground-truth mask (what a perfect AffinityNet would give these CAMs). The CAM threshold is the
checkpoint's best threshold on val (from its metrics), the same for every stage that needs one.
Writes bench/results/refine_quality.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.common import write_table

STAGES = ("CAM", "+RW", "+CRF", "+RW+CRF", "+RW (GT affinities)")


def gt_affinities(mask, grid_hw: tuple[int, int], radius: int):
    """Oracle pair affinities on the walk's grid from the ground-truth mask (nearest cell centre): 1 for pairs of
    the same label, 0.001 otherwise. The walk with them shows what a perfect AffinityNet would give these CAMs."""
    import numpy as np
    import torch

    from wsss.refine.affinity_labels import grid_labels
    from wsss.refine.random_walk import neighbor_offsets

    h, w = grid_hw
    g = grid_labels(np.asarray(mask, np.int64), (h, w))
    pad = np.pad(g, ((0, radius - 1), (radius - 1, radius - 1)), constant_values=-1)
    aff = np.empty((len(neighbor_offsets(radius)), h, w), np.float32)
    for p, (dy, dx) in enumerate(neighbor_offsets(radius)):
        partner = pad[dy:dy + h, radius - 1 + dx:radius - 1 + dx + w]
        aff[p] = np.where(partner == g, 1.0, 0.001)
    return torch.from_numpy(aff)


def run_one(ckpt: Path, data: str, aff_steps: int, max_val: int, rw_overrides: list[str]) -> dict[str, float]:
    from wsss import config
    from wsss.affinity_train import train_affinity
    from wsss.cam import infer_cams
    from wsss.data import open_dataset
    from wsss.metrics import ConfusionMatrix, iou_from_confusion
    from wsss.pseudolabel import CamStage, RandomWalkStage, cam_scores, crf_stage, labels_from_scores
    from wsss.refine.random_walk import walk_cam

    import numpy as np
    import torch

    metrics = json.loads((ckpt / "metrics.json").read_text())
    thr = float(metrics.get("val_best_threshold", 0.5))
    cams = ckpt.parent / f"{ckpt.name}-cams-train"
    infer_cams(str(ckpt), data, str(cams), split="train", progress=False)
    # the walk's background power is matched to this threshold when rw.bg_alpha is null (0 and 1 cannot be matched)
    rw_overrides = [f"infer.bg_threshold={min(max(thr, 0.01), 0.99)}"] + rw_overrides
    cfg = config.load(ckpt / "config.yaml", [f"affinity.max_steps={aff_steps}", "affinity.epochs=1000"]
                      + rw_overrides)
    cfg.affinity.crop = cfg.data.crop * cfg.affinity.upscale  # the CAM crop, in AffinityNet input pixels
    aff = train_affinity(cfg, str(cams), data, str(ckpt.parent / f"{ckpt.name}-affinity"), split="train",
                         progress=False)
    val = open_dataset(data, "val")
    cam_stage = CamStage(str(ckpt))
    rw_stage = RandomWalkStage(aff, cfg)
    conf = {s: ConfusionMatrix(val.num_classes) for s in STAGES}
    for i in val.ids[:max_val]:
        image, labels, mask = val.load_image(i), val.labels(i), val.load_mask(i)
        cam, keys = cam_stage(image, labels)
        probs, k = cam_scores(cam, keys, thr)
        conf["CAM"].update(mask, labels_from_scores(probs, k))
        conf["+CRF"].update(mask, labels_from_scores(*crf_stage(image, probs, k, cfg.crf)))
        rprobs, rk = rw_stage(image, cam, keys)
        conf["+RW"].update(mask, labels_from_scores(rprobs, rk))
        conf["+RW+CRF"].update(mask, labels_from_scores(*crf_stage(image, rprobs, rk, cfg.crf)))
        grid = tuple(-(-s // rw_stage.stride) for s in mask.shape)
        oracle = walk_cam(torch.from_numpy(np.asarray(cam, np.float32)), gt_affinities(mask, grid, cfg.rw.radius),
                          radius=cfg.rw.radius, beta=cfg.rw.beta, logt=cfg.rw.logt, bg_alpha=rw_stage.bg_alpha,
                          stride=rw_stage.stride)
        conf["+RW (GT affinities)"].update(mask, labels_from_scores(oracle.numpy(), rk))
    return {s: iou_from_confusion(c.matrix, val.class_names)["miou"] for s, c in conf.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="work folder of bench.bench_cam_methods")
    ap.add_argument("--methods", default="seam,daen-csm")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--aff-steps", type=int, default=300)
    ap.add_argument("--max-val", type=int, default=120)
    ap.add_argument("--init", default="scratch", help="scratch or cam: which checkpoints of bench_cam_methods")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for the refinement (e.g. rw.logt=4), repeatable")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/refine_quality.md"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    data = str(work / "synth")
    rows = []
    for method in args.methods.split(","):
        per_seed = []
        for seed in range(args.seeds):
            ckpt = work / (f"{method}-{seed}" + ("-init-cam" if args.init == "cam" else ""))
            if not (ckpt / "model.pt").exists():
                print(f"skip {ckpt}: no checkpoint")
                continue
            r = run_one(ckpt, data, args.aff_steps, args.max_val, list(args.set))
            print(method, seed, {k: round(100 * v, 2) for k, v in r.items()}, flush=True)
            per_seed.append(r)
        if per_seed:
            rows.append((method, per_seed))
    lines = [f"mIoU % on the synthetic val split (first {args.max_val} images), CAM checkpoints of "
             f"bench.bench_cam_methods (init {args.init}), AffinityNet {args.aff_steps} steps, refinement settings "
             f"of configs/synth_daen.yaml{' with ' + ', '.join(args.set) if args.set else ''}, mean ± std over "
             "seeds.", "",
             "| method | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for method, per_seed in rows:
        cells = []
        for s in STAGES:
            vals = [100 * r[s] for r in per_seed]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.2f} ± {sd:.2f}")
        lines.append(f"| {method} ({len(per_seed)} seeds) | " + " | ".join(cells) + " |")
    write_table(lines, args.out, "bench.bench_refine_quality", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
