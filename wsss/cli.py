"""The ``wsss`` command line. Thin: each verb parses its arguments and calls one function.

Library verbs (one process, no Ray): synth, train, cams, evaluate, report, train-affinity, pseudolabel.
Cluster verbs hand their arguments to the Ray entrypoints in ``jobs/`` (the same modules ``ray job submit`` runs):
``wsss shard|tune|demo ...`` and ``wsss train --cluster ...`` / ``wsss pseudolabel --cluster ...`` /
``wsss evaluate --cluster ...``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys


def _fail(msg: str) -> int:
    print(f"wsss: error: {msg}", file=sys.stderr)
    return 2


def _add_config(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.005 (repeatable)")


def _load_cfg(args):
    from wsss import config

    return config.load(args.config, args.overrides)


def cmd_synth(args) -> int:
    from wsss.data.synth import make_synthetic

    info = make_synthetic(args.out, num_images=args.num_images, size=args.size, seed=args.seed,
                          val_fraction=args.val_fraction)
    print(f"synth: wrote {args.num_images} images of {args.size}px to {args.out} "
          f"({', '.join(f'{k}={v}' for k, v in info.items() if isinstance(v, (int, float, str)))})")
    return 0


def cmd_train(args) -> int:
    from wsss.train import train

    cfg = _load_cfg(args)
    if args.data:
        cfg.data.root = args.data
    out = args.out or cfg.out
    res = train(cfg, out, progress=not args.quiet)
    miou = res.get("val_cam_miou")
    print(f"train: {res['steps']} steps in {res['train_seconds']:.1f}s, loss {res['loss_first']:.4f} -> "
          f"{res['loss_last']:.4f}" + (f", val CAM mIoU {100 * miou:.2f}% (bg thr {res['val_best_threshold']:.2f})"
                                       if miou is not None else "") + f"; checkpoint {res['checkpoint']}")
    return 0


def cmd_cams(args) -> int:
    from wsss.cam import infer_cams

    res = infer_cams(args.checkpoint, args.data, args.out, split=args.split, overrides=args.overrides,
                     labels_png=args.labels, progress=not args.quiet)
    print(f"cams: {res['written']} written, {res['skipped_existing']} already there, {len(res['rejects'])} rejected "
          f"({res['images_per_s']:.2f} img/s) -> {res['out']}")
    return 0


def cmd_evaluate(args) -> int:
    from wsss import metrics

    if args.cams:
        from wsss.cam import evaluate_cams_folder

        res = evaluate_cams_folder(args.cams, args.data, split=args.split, json_path=args.json)
    else:
        if not args.pred:
            return _fail("evaluate needs --pred DIR (label PNGs) or --cams DIR (CAM npz files)")
        res = metrics.evaluate_folder(args.pred, args.data, split=args.split, json_path=args.json)
    print(metrics.format_table(res))
    extra = f", best bg threshold {res['best_threshold']:.2f}" if "best_threshold" in res else ""
    print(f"evaluate: mIoU {100 * res['miou']:.2f}% over {res.get('n_images', '?')} images{extra}"
          + (f"; {len(res.get('missing', []))} predictions missing" if res.get("missing") else "")
          + (f"; JSON {args.json}" if args.json else ""))
    return 0


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"{what} {it!r}: expected NAME=PATH")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def cmd_report(args) -> int:
    from wsss.report import write_report

    results = {}
    for name, path in _pairs(args.result, "--result").items():
        with open(path) as f:
            results[name] = json.load(f)
    path = write_report(args.out, args.data, split=args.split, pred_dirs=_pairs(args.pred, "--pred") or None,
                        cams_dir=args.cams, results=results or None, max_images=args.max_images)
    print(f"report: open {path} in a browser")
    return 0


def cmd_train_affinity(args) -> int:
    from wsss.affinity_train import train_affinity

    cfg = _load_cfg(args)
    path = train_affinity(cfg, args.cams, args.data, args.out, split=args.split, progress=not args.quiet)
    print(f"train-affinity: checkpoint {path}")
    return 0


def cmd_pseudolabel(args) -> int:
    from wsss.pseudolabel import checkpoint_config, pseudolabel

    # without --config the CAM checkpoint's own config is used; --set applies to whichever config is used
    cfg = _load_cfg(args) if args.config else checkpoint_config(args.checkpoint, args.overrides)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    res = pseudolabel(cfg, args.checkpoint, args.data, args.out, affinity=args.affinity, stages=stages,
                      split=args.split)
    print("pseudolabel: " + ", ".join(f"{k}={v}" for k, v in res.items() if isinstance(v, (int, float, str))))
    return 0


def cmd_train_seg(args) -> int:
    from wsss.metrics import format_table
    from wsss.seg.config import load_seg_config
    from wsss.seg.train import train_seg

    cfg = load_seg_config(args.config, args.overrides)
    if args.data:
        cfg.data.root = args.data
    if args.labels:
        cfg.data.labels = args.labels
    res = train_seg(cfg, args.out or cfg.out, progress=not args.quiet)
    for r in res["rejects"][:20]:
        print(f"rejected {r[0]}: {r[1]}", file=sys.stderr)
    val = res.get("val") or {}
    for p in val.get("protocols", []):
        print(format_table(val[p], title=f"val mIoU, {p}"))
    print(f"train-seg: {res['steps']} steps in {res['train_seconds']:.1f}s ({res['images_per_s']:.1f} img/s) on "
          f"{res['n_train']} images, {len(res['rejects'])} rejected; "
          + "".join(f"{p} {100 * val[p]['miou']:.2f}%, " for p in val.get("protocols", []))
          + f"checkpoint {res['checkpoint']}")
    return 0


def cmd_predict_seg(args) -> int:
    from wsss.seg.predict import predict_folder

    res = predict_folder(args.checkpoint, args.data, args.out, split=args.split, multi_scale=args.multi_scale,
                         crf=args.crf, progress=not args.quiet, overrides=args.overrides)
    for i, r in res["rejects"][:20]:
        print(f"rejected {i}: {r}", file=sys.stderr)
    print(f"predict-seg: {res['n_written']} written, {res['n_skipped']} already there, {res['n_rejected']} rejected "
          f"({res['images_per_s']:.2f} img/s) -> {res['out']}")
    return 0


def _job(module: str, argv: list[str]) -> int:
    mod = importlib.import_module(f"jobs.{module}")
    rc = mod.main(argv)
    return int(rc or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss", description="Weakly supervised semantic segmentation: image-level "
                                "labels -> CAMs -> pseudo labels (DAEN / SEAM / SSENet / CAM), locally or on Ray.")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("synth", help="make the procedural synthetic dataset (VOC layout, with masks)")
    s.add_argument("out")
    s.add_argument("--num-images", type=int, default=200)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--val-fraction", type=float, default=0.25)
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("train", help="train a CAM network (add --cluster for Ray Train; see jobs/train.py)")
    _add_config(s, required=True)
    s.add_argument("--data", help="dataset root (overrides data.root)")
    s.add_argument("--out", help="checkpoint folder (overrides out)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("cams", help="CAM inference over a dataset: <out>/<id>.npz (float16, positive classes)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--split")
    s.add_argument("--labels", action="store_true", help="also write label PNGs at infer.bg_threshold to <out>/labels")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(fn=cmd_cams)

    s = sub.add_parser("evaluate", help="mIoU of label PNGs (--pred) or CAMs with a threshold sweep (--cams)")
    s.add_argument("--pred")
    s.add_argument("--cams")
    s.add_argument("--data", required=True)
    s.add_argument("--split")
    s.add_argument("--json")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("report", help="static HTML report: per-class IoU tables and an image grid")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True, help="path of the HTML file")
    s.add_argument("--split")
    s.add_argument("--pred", action="append", default=[], metavar="NAME=DIR")
    s.add_argument("--result", action="append", default=[], metavar="NAME=JSON")
    s.add_argument("--cams")
    s.add_argument("--max-images", type=int, default=16)
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("train-affinity", help="train AffinityNet from CAM files")
    _add_config(s, required=False)
    s.add_argument("--cams", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--split")
    s.set_defaults(fn=cmd_train_affinity)

    s = sub.add_parser("pseudolabel", help="CAM -> random walk -> CRF pseudo labels (add --cluster for Ray Data)")
    _add_config(s, required=False)
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--affinity")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--split")
    s.add_argument("--stages", default="cam,rw,crf")
    s.set_defaults(fn=cmd_pseudolabel)

    s = sub.add_parser("train-seg", help="train the segmentation network on pseudo labels (add --cluster for Ray "
                       "Train; see jobs/train_seg.py)")
    _add_config(s, required=True)
    s.add_argument("--data", help="dataset root or shard folder (overrides data.root)")
    s.add_argument("--labels", help="pseudo-label folder / s3:// prefix (overrides data.labels)")
    s.add_argument("--out", help="checkpoint folder (overrides out)")
    s.set_defaults(fn=cmd_train_seg)

    s = sub.add_parser("predict-seg", help="label PNGs from a segmentation checkpoint for an image folder, dataset "
                       "or shard set (add --cluster for Ray Data)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--split")
    s.add_argument("--multi-scale", action="store_true", help="eval.scales x flip of the checkpoint's config")
    s.add_argument("--crf", action="store_true", help="dense CRF after the network (the checkpoint's crf.*)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(fn=cmd_predict_seg)

    for verb, helptext in (("shard", "dataset -> Parquet shards (local or s3://)"),
                           ("tune", "Ray Tune search over loss weights and attention"),
                           ("demo", "the whole main job on the embedded local stack")):
        s = sub.add_parser(verb, help=helptext, add_help=False)
        s.set_defaults(job=verb)
    return p


CLUSTER_VERBS = {"train": "train", "pseudolabel": "pseudolabel", "evaluate": "evaluate",
                 "train-seg": "train_seg", "predict-seg": "predict_seg"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from wsss.config import ConfigError

    # Cluster forms are handed whole to the Ray entrypoint.
    verbs = [a for a in argv if not a.startswith("-")]
    if verbs and verbs[0] in CLUSTER_VERBS and "--cluster" in argv:
        # --cluster stays: the entrypoints then join the running cluster (RAY_ADDRESS or auto)
        return _job(CLUSTER_VERBS[verbs[0]], argv[argv.index(verbs[0]) + 1:])
    if verbs and verbs[0] in ("shard", "tune", "demo"):
        return _job(verbs[0], argv[argv.index(verbs[0]) + 1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
    raise SystemExit(main())
