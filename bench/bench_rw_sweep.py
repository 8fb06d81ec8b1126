"""Random-walk settings swept on training images: which radius / beta / log t / background power turn a CAM into
better labels. Tuning on train images keeps the val split of bench.bench_refine_quality for reporting.

    python -m bench.bench_rw_sweep --cam CKPT --affinity AFF --data DATA [--split train] [--images 80]
        [--radius 2,3,5] [--beta 4,8,16] [--logt 1,2,3,4,6] [--alpha 1,2,3,4,6]

CAMs and affinities are computed once per image (affinities once per radius); every setting then only re-runs the
walk. Prints the CAM mIoU (at the checkpoint's best val threshold, as bench_refine_quality) and, per radius, the best
settings; writes bench/results/rw_sweep.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from bench.common import write_table


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cam", required=True, help="CAM checkpoint folder")
    ap.add_argument("--affinity", required=True, help="AffinityNet checkpoint folder")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--radius", default="2,3,5")
    ap.add_argument("--beta", default="4,8,16")
    ap.add_argument("--logt", default="1,2,3,4,6")
    ap.add_argument("--alpha", default="1,2,3,4,6")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/rw_sweep.md"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from wsss import config
    from wsss.data import open_dataset
    from wsss.metrics import ConfusionMatrix, iou_from_confusion
    from wsss.pseudolabel import CamStage, RandomWalkStage, cam_scores, labels_from_scores
    from wsss.refine.random_walk import walk_cam

    ds = open_dataset(args.data, args.split)
    thr = float(json.loads((Path(args.cam) / "metrics.json").read_text()).get("val_best_threshold", 0.5))
    cfg = config.load(Path(args.cam) / "config.yaml")
    cam_stage = CamStage(args.cam)
    items = []
    for i in ds.ids[:args.images]:
        image = ds.load_image(i)
        cam, keys = cam_stage(image, ds.labels(i))
        items.append((image, np.asarray(cam, np.float32), np.asarray(keys), ds.load_mask(i)))

    def miou(labels_of) -> float:
        """mIoU % over the items of ``labels_of(k)`` (the label map of item k)."""
        conf = ConfusionMatrix(ds.num_classes)
        for k, it in enumerate(items):
            conf.update(it[3], labels_of(k))
        return 100 * iou_from_confusion(conf.matrix, ds.class_names)["miou"]

    cam_miou = miou(lambda k: labels_from_scores(*cam_scores(items[k][1], items[k][2], thr)))
    lines = [f"Random-walk sweep on {len(items)} `{args.split}` images of {args.data}: CAM {Path(args.cam).name} "
             f"(threshold {thr:.2f}) **{cam_miou:.2f}** mIoU; AffinityNet {Path(args.affinity).name}.", "",
             "| radius | rank | beta | log t | bg power | +RW mIoU % | vs CAM |", "|---|---|---|---|---|---|---|"]
    for radius in (int(r) for r in _floats(args.radius)):
        cfg.rw.radius = radius
        stage = RandomWalkStage(args.affinity, cfg)
        affs = [stage.affinities(it[0]) for it in items]
        results = []
        for beta, logt, alpha in itertools.product(_floats(args.beta), _floats(args.logt), _floats(args.alpha)):
            def walked(k: int) -> np.ndarray:
                with torch.no_grad():
                    p = walk_cam(torch.from_numpy(items[k][1]), affs[k], radius=radius, beta=beta, logt=int(logt),
                                 bg_alpha=alpha, stride=stage.stride)
                return labels_from_scores(p.numpy(), np.concatenate([[0], items[k][2]]))
            results.append((miou(walked), beta, int(logt), alpha))
        results.sort(key=lambda r: -r[0])
        for rank, (m, beta, logt, alpha) in enumerate(results[:args.top], 1):
            lines.append(f"| {radius} | {rank} | {beta:g} | {logt} | {alpha:g} | {m:.2f} | {m - cam_miou:+.2f} |")
        print(f"radius {radius}: best {results[0]}", flush=True)
    write_table(lines, args.out, "bench.bench_rw_sweep", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
