"""CAM quality of cam / seam / daen (attention none, channel, spatial, csm) on the synthetic set — the analogue of
the DAEN paper's Table 1 — with a fixed training budget and several seeds.

    python -m bench.bench_cam_methods [--seeds 3] [--steps 300] [--images 240] [--size 96]

Prints a markdown table (CAM mIoU mean ± std over seeds, best background threshold, seconds per training step)
and writes it to bench/results/cam_methods.md. Each variant trains from scratch on the CPU with the `tiny` backbone.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from wsss import config
from wsss.data import open_dataset
from wsss.data.synth import make_synthetic
from wsss.train import evaluate_cams, train

VARIANTS = [  # (label, paper name, overrides)
    ("cam", "CAM", ["method.name=cam", "model.attention=none"]),
    ("seam", "SEAM", ["method.name=seam", "model.attention=none"]),
    ("daen-spatial", "SM", ["method.name=daen", "model.attention=spatial"]),
    ("daen-channel", "CM", ["method.name=daen", "model.attention=channel"]),
    ("daen-csm", "DAEN", ["method.name=daen", "model.attention=csm"]),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/synth_daen.yaml"))
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/cam_methods.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    wanted = set(args.variants.split(","))
    work = Path(tempfile.mkdtemp(prefix="wsss-bench-"))
    data = work / "synth"
    make_synthetic(str(data), num_images=args.images, size=args.size, seed=1234, val_fraction=0.1)
    val = open_dataset(str(data), "val")
    rows = []
    untrained = None
    for name, paper, ov in VARIANTS:
        if name not in wanted:
            continue
        mious, thrs, spstep = [], [], []
        for seed in range(args.seeds):
            cfg = config.load(args.config, ov + [f"seed={seed}", f"optim.max_steps={args.steps}",
                                                 f"data.root={data}", "optim.epochs=1000"])
            res = train(cfg, str(work / f"{name}-{seed}"), progress=False, val_dataset=val, eval_max_images=10**6)
            mious.append(res["val_cam_miou"])
            thrs.append(res["val_best_threshold"])
            spstep.append(res["train_seconds"] / max(res["steps"], 1))
            print(f"{name} seed {seed}: CAM mIoU {100 * res['val_cam_miou']:.2f}% thr {res['val_best_threshold']:.2f} "
                  f"loss {res['loss_first']:.3f}->{res['loss_last']:.3f} {spstep[-1]:.3f}s/step", flush=True)
            if untrained is None:
                from wsss.train import build_model

                torch.manual_seed(seed)
                net = build_model(cfg, val.num_classes).eval()
                untrained = evaluate_cams(net, cfg, val)["miou"]
        sd = statistics.stdev(mious) if len(mious) > 1 else 0.0
        rows.append((name, paper, statistics.mean(mious), sd, statistics.mean(thrs), statistics.mean(spstep),
                     mious))
    lines = [f"CAM mIoU on the synthetic val split ({len(val)} images, {args.size}px), {args.steps} steps, "
             f"batch from {Path(args.config).name}, {args.seeds} seeds, tiny backbone, CPU.",
             "", "| variant | paper row | CAM mIoU % (mean ± std) | per seed | best bg thr | s/step |",
             "|---|---|---|---|---|---|"]
    for name, paper, m, sd, thr, sps, per in rows:
        lines.append(f"| {name} | {paper} | {100 * m:.2f} ± {100 * sd:.2f} | "
                     f"{' / '.join(f'{100 * v:.1f}' for v in per)} | {thr:.2f} | {sps:.3f} |")
    lines.append(f"| untrained net | — | {100 * (untrained or 0):.2f} | | | |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n\nCommand: `python -m bench.bench_cam_methods "
                              + " ".join(argv or []) + "`\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
