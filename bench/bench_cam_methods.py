"""CAM quality of cam / seam / daen (attention none, channel, spatial, csm) on the synthetic set — the analogue of
the DAEN paper's Table 1 — with a fixed training budget and several seeds.

    python -m bench.bench_cam_methods [--seeds 3] [--steps 1000] [--images 1200] [--size 64] [--init scratch,cam]

Prints a markdown table (CAM mIoU mean ± std over seeds, best background threshold, seconds per training step)
and writes it to bench/results/cam_methods.md. ``--init``:
- ``scratch``: each variant trains from random init on the CPU with the `tiny` backbone (configs/synth_daen.yaml);
- ``cam``: the analogue of the papers' ImageNet initialisation: each variant starts from the backbone of the
  ``scratch`` plain-CAM run of the same seed and trains ``--steps`` more with the papers' optimisation (lr 0.01, new
  layers x10, no ER warm-up, no gradient clipping). ``cam`` therefore needs ``scratch`` with the ``cam`` variant.
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

from bench.common import write_table

VARIANTS = [  # (label, paper name, overrides)
    ("cam", "CAM", ["method.name=cam", "model.attention=none"]),
    ("seam", "SEAM", ["method.name=seam", "model.attention=none"]),
    ("daen-spatial", "SM", ["method.name=daen", "model.attention=spatial"]),
    ("daen-channel", "CM", ["method.name=daen", "model.attention=channel"]),
    ("daen-csm", "DAEN", ["method.name=daen", "model.attention=csm"]),
]


def cam_backbone(ckpt: Path) -> str:
    """Write the backbone of a CAM checkpoint as a state_dict for ``model.pretrained``; returns its path."""
    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    out = ckpt / "backbone.pt"
    torch.save({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, out)
    return str(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--size", type=int, default=64,
                    help="image size; crops and the resize range scale with it (the config's are for 64 px)")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/synth_daen.yaml"))
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--work", help="work folder for data and checkpoints (default: a new temporary folder)")
    ap.add_argument("--init", default="scratch,cam", help="scratch, cam or both (see the module docstring)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/cam_methods.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    wanted = set(args.variants.split(","))
    base = config.load(args.config)
    k = args.size / 64.0  # synth_daen.yaml's crop and resize range are set for 64 px images
    size_ov = [] if args.size == 64 else [f"data.crop={int(round(base.data.crop * k))}",
                                          f"data.resize_long=[{int(round(base.data.resize_long[0] * k))},"
                                          f"{int(round(base.data.resize_long[1] * k))}]"]
    inits = [i for i in ("scratch", "cam") if i in args.init.split(",")]
    if "cam" in inits and ("scratch" not in inits or "cam" not in wanted):
        ap.error("--init cam needs --init scratch and the cam variant (its checkpoints are the initialisation)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="wsss-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "synth"
    make_synthetic(str(data), num_images=args.images, size=args.size, seed=1234, val_fraction=0.1)
    val = open_dataset(str(data), "val")
    rows = []
    untrained = None
    for init, (name, paper, ov) in [(i, v) for i in inits for v in VARIANTS]:
        if name not in wanted:
            continue
        mious, thrs, spstep = [], [], []
        for seed in range(args.seeds):
            extra, run = [], work / f"{name}-{seed}"
            if init == "cam":
                extra = [f"model.pretrained={cam_backbone(work / f'cam-{seed}')}", "optim.lr=0.01",
                         "optim.new_lr_mult=10", "method.warmup_steps=0", "optim.clip_grad_norm=null"]
                run = work / f"{name}-{seed}-init-cam"
            cfg = config.load(args.config, ov + [f"seed={seed}", f"optim.max_steps={args.steps}",
                                                 f"data.root={data}", "optim.epochs=1000"] + size_ov + extra)
            res = train(cfg, str(run), progress=False, val_dataset=val, eval_max_images=10**6)
            mious.append(res["val_cam_miou"])
            thrs.append(res["val_best_threshold"])
            spstep.append(res["train_seconds"] / max(res["steps"], 1))
            print(f"{name} ({init}) seed {seed}: CAM mIoU {100 * res['val_cam_miou']:.2f}% "
                  f"thr {res['val_best_threshold']:.2f} "
                  f"loss {res['loss_first']:.3f}->{res['loss_last']:.3f} {spstep[-1]:.3f}s/step", flush=True)
            if untrained is None:
                from wsss.train import build_model

                torch.manual_seed(seed)
                net = build_model(cfg, val.num_classes).eval()
                untrained = evaluate_cams(net, cfg, val)["miou"]
        sd = statistics.stdev(mious) if len(mious) > 1 else 0.0
        rows.append((name, paper, init, statistics.mean(mious), sd, statistics.mean(thrs), statistics.mean(spstep),
                     mious))
    lines = [f"CAM mIoU on the synthetic val split ({len(val)} images, {args.size}px), {args.steps} steps, "
             f"batch from {Path(args.config).name}, {args.seeds} seeds, tiny backbone, CPU.",
             "", "| variant | paper row | init | CAM mIoU % (mean ± std) | per seed | best bg thr | s/step |",
             "|---|---|---|---|---|---|---|"]
    for name, paper, init, m, sd, thr, sps, per in rows:
        lines.append(f"| {name} | {paper} | {init} | {100 * m:.2f} ± {100 * sd:.2f} | "
                     f"{' / '.join(f'{100 * v:.1f}' for v in per)} | {thr:.2f} | {sps:.3f} |")
    lines.append(f"| untrained net | — | random | {100 * (untrained or 0):.2f} | | | |")
    write_table(lines, args.out, "bench.bench_cam_methods", argv)
    print(f"work folder (checkpoints for bench.bench_refine_quality --work): {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
