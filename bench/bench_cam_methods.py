"""CAM quality of the SEAM/DAEN family on the synthetic set — the analogue of the DAEN paper's Table 1 — and the
ablation of SEAM's components, with a fixed training budget and several seeds.

    python -m bench.bench_cam_methods [--seeds 3] [--steps 1000] [--images 1200] [--size 64]
        [--inits imagenet,scratch] [--variants cam,er,seam-norvmin,seam,daen-spatial,daen-channel,daen-csm,sse]
        [--jobs 2] [--work DIR]

Prints a markdown table (CAM mIoU mean ± std over seeds — of the raw CAM and, for the PCM methods, of the PCM
output — best background threshold, seconds per training step) and writes it to bench/results/cam_methods.md.
``--inits``:
- ``imagenet``: EfficientNet-Lite0 with the packaged ImageNet weights (configs/synth_daen.yaml), the papers' regime
  (pretrained backbone, frozen BatchNorm, new layers x10);
- ``scratch``: the `tiny` backbone from random init (configs/synth_daen_tiny.yaml);
- ``cam``: tiny, started from the backbone of the ``scratch`` plain-CAM run of the same seed, then the papers'
  optimisation (lr 0.01, new layers x10, no ER warm-up, no clipping); needs ``scratch`` with the ``cam`` variant.
Each run's result is kept in ``<work>/<run>/bench.json``: a re-run with the same ``--work`` skips finished runs.
Checkpoints: ``<work>/<variant>-<seed>`` (scratch), ``-imagenet`` and ``-init-cam`` suffixes for the other inits
(bench.bench_refine_quality ``--init`` reads them).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, row of the ablation / paper, overrides)
VARIANTS = [
    ("cam", "CAM", ["method.name=cam", "model.attention=none"]),
    ("er", "CAM + ER (no PCM)", ["method.name=er", "model.attention=none"]),
    ("seam-norvmin", "+ PCM/ECR (SEAM w/o rvmin)", ["method.name=seam", "model.attention=none", "method.w_rvmin=0"]),
    ("seam", "SEAM", ["method.name=seam", "model.attention=none"]),
    ("daen-spatial", "SEAM + SM", ["method.name=daen", "model.attention=spatial"]),
    ("daen-channel", "SEAM + CM", ["method.name=daen", "model.attention=channel"]),
    ("daen-csm", "DAEN (SEAM + CSM)", ["method.name=daen", "model.attention=csm"]),
    ("sse", "SSENet", ["method.name=sse", "model.attention=none"]),
]
INITS = {  # init -> (config, run-folder suffix, backbone label)
    "imagenet": (ROOT / "configs/synth_daen.yaml", "-imagenet", "EfficientNet-Lite0 (ImageNet)"),
    "scratch": (ROOT / "configs/synth_daen_tiny.yaml", "", "tiny (scratch)"),
    "cam": (ROOT / "configs/synth_daen_tiny.yaml", "-init-cam", "tiny (CAM-trained init)"),
}


def cam_backbone(ckpt: Path) -> str:
    """Write the backbone of a CAM checkpoint as a state_dict for ``model.pretrained``; returns its path."""
    import torch

    state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    out = ckpt / "backbone.pt"
    torch.save({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, out)
    return str(out)


def run_one(job: dict) -> dict:
    """Train one (variant, init, seed) and score its CAMs on val (raw, and the PCM output where there is one)."""
    import torch

    torch.set_num_threads(job["threads"])
    from wsss import config
    from wsss.data import open_dataset
    from wsss.train import evaluate_cams, train

    run = Path(job["run"])
    done = run / "bench.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = config.load(job["config"], job["overrides"])
    val = open_dataset(cfg.data.root, "val")
    # train() scores what the config scores (infer.use_pcm) on all of val and records it in metrics.json, which
    # bench.bench_refine_quality reads for the CAM threshold
    res = train(cfg, str(run), progress=False, val_dataset=val, eval_max_images=10**6)
    scored = "pcm" if (cfg.uses_pcm and cfg.infer.use_pcm) else "raw"
    rec = {"name": job["name"], "init": job["init"], "seed": job["seed"], "steps": res["steps"],
           "s_per_step": res["train_seconds"] / max(res["steps"], 1), "scored": scored,
           "loss_first": res["loss_first"], "loss_last": res["loss_last"],
           f"miou_{scored}": res["val_cam_miou"], f"thr_{scored}": res["val_best_threshold"]}
    if cfg.uses_pcm:  # the other of raw CAM / PCM output, for the ablation
        from wsss.checkpoint import load_checkpoint
        from wsss.train import build_model

        state, ccfg, meta, _ = load_checkpoint(str(run))
        net = build_model(ccfg, val.num_classes)
        net.load_state_dict(state)
        net.eval()
        other = "raw" if scored == "pcm" else "pcm"
        ccfg.infer.use_pcm = other == "pcm"
        ev = evaluate_cams(net, ccfg, val)
        rec[f"miou_{other}"], rec[f"thr_{other}"] = ev["miou"], ev["best_threshold"]
    done.write_text(json.dumps(rec, indent=1))
    return rec


def _fmt(vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * statistics.mean(vals):.2f} ± {100 * sd:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--size", type=int, default=64,
                    help="image size; crops and the resize range scale with it (the configs' are for 64 px)")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--inits", "--init", dest="inits", default="imagenet,scratch",
                    help="imagenet, scratch, cam (comma list; see the module docstring)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--jobs", type=int, default=2, help="training processes at once (threads split among them)")
    ap.add_argument("--work", help="work folder for data and checkpoints (default: a new temporary folder)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/cam_methods.md"))
    args = ap.parse_args(argv)
    from wsss import config
    from wsss.data import open_dataset
    from wsss.data.synth import make_synthetic

    from bench.common import write_table

    wanted = [v for v in VARIANTS if v[0] in set(args.variants.split(","))]
    inits = [i for i in INITS if i in args.inits.split(",")]
    if "cam" in inits and ("scratch" not in inits or "cam" not in {v[0] for v in wanted}):
        ap.error("--inits cam needs scratch and the cam variant (its checkpoints are the initialisation)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="wsss-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "synth"
    if not (data / "classes.txt").exists():
        make_synthetic(str(data), num_images=args.images, size=args.size, seed=1234, val_fraction=0.1)
    n_val = len(open_dataset(str(data), "val"))
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))

    def jobs_for(init: str) -> list[dict]:
        cfg_path, suffix, _ = INITS[init]
        base = config.load(cfg_path)
        k = args.size / 64.0
        size_ov = [] if args.size == 64 else [
            f"data.crop={int(round(base.data.crop * k))}",
            f"data.resize_long=[{int(round(base.data.resize_long[0] * k))},{int(round(base.data.resize_long[1] * k))}]"]
        out = []
        for name, _, ov in wanted:
            for seed in range(args.seeds):
                extra = []
                if init == "cam":
                    extra = [f"model.pretrained={cam_backbone(work / f'cam-{seed}')}", "optim.lr=0.01",
                             "optim.new_lr_mult=10", "method.warmup_steps=0", "optim.clip_grad_norm=null"]
                out.append({"name": name, "init": init, "seed": seed, "config": str(cfg_path), "threads": threads,
                            "run": str(work / f"{name}-{seed}{suffix}"),
                            "overrides": ov + [f"seed={seed}", f"optim.max_steps={args.steps}", f"data.root={data}",
                                               "optim.epochs=1000"] + size_ov + extra + list(args.set)})
        return out

    records: list[dict] = []
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
        for init in inits:  # the cam init needs the scratch runs first
            for rec in pool.map(run_one, jobs_for(init)):
                extra = (f" / PCM {100 * rec['miou_pcm']:.2f}% thr {rec['thr_pcm']:.2f}" if "miou_pcm" in rec else "")
                print(f"{rec['name']} ({rec['init']}) seed {rec['seed']}: raw CAM {100 * rec['miou_raw']:.2f}% thr "
                      f"{rec['thr_raw']:.2f}{extra} loss {rec['loss_first']:.3f}->{rec['loss_last']:.3f} "
                      f"{rec['s_per_step']:.3f}s/step", flush=True)
                records.append(rec)
    lines = [f"CAM mIoU on the synthetic val split ({n_val} images, {args.size}px), {args.steps} steps, "
             f"{args.seeds} seeds, CPU ({args.jobs} runs at a time, {threads} thread(s) each). `scored` is what the "
             "method's config scores (SEAM/DAEN: the PCM output, as official SEAM's inference); raw = the "
             "classifier's CAM.", "",
             "| backbone | variant | row | scored CAM mIoU % (mean ± std) | per seed | raw CAM | PCM output | "
             "best bg thr | s/step |", "|---|---|---|---|---|---|---|---|---|"]
    for init in inits:
        for name, row, _ in wanted:
            rs = [r for r in records if r["init"] == init and r["name"] == name]
            if not rs:
                continue
            scored = [r[f"miou_{r['scored']}"] for r in rs]
            pcm = _fmt([r["miou_pcm"] for r in rs]) if "miou_pcm" in rs[0] else "—"
            lines.append(f"| {INITS[init][2]} | {name} | {row} | **{_fmt(scored)}** | "
                         f"{' / '.join(f'{100 * v:.1f}' for v in scored)} | {_fmt([r['miou_raw'] for r in rs])} | "
                         f"{pcm} | {statistics.mean(r['thr_' + r['scored']] for r in rs):.2f} | "
                         f"{statistics.mean(r['s_per_step'] for r in rs):.3f} |")
    write_table(lines, args.out, "bench.bench_cam_methods", argv)
    print(f"work folder (checkpoints for bench.bench_refine_quality --work): {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
