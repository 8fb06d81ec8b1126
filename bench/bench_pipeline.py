"""Pseudo-labelling throughput: the Ray Data pipeline (jobs/pseudolabel.py) against a plain sequential loop of the
same stages in one process (``wsss.pseudolabel.pseudolabel``), on the same data, in one run.

``python -m bench.bench_pipeline [--images 48] [--size 192] [--width 8]`` builds a synthetic set (VOC layout and
Parquet shards of the same images), an untrained tiny CAM network and AffinityNet (the work per image does not
depend on the weights), then times:

- the sequential loop with torch's default threads (the baseline) and with 1 torch thread (for reference);
- the pipeline (all stages cam, rw, crf) with 1 and 2 CRF workers, and with 2 CAM actors + 2 CRF workers.

Both paths run CAM inference batched (one forward per scale for a batch of same-size images with both flips
stacked: ``CamInferencer.infer_batch``; the sequential loop in chunks of ``--cam-batch`` images, the CAM actors per
``--batch-size`` batch). The row "CAM inference: batched vs per-pass" times that stage alone on the same images
(the per-pass loop: one forward per scale per image); ``--cam-only`` runs just that row (no Ray), e.g.
``python -m bench.bench_pipeline --cam-only --images 64 --size 192 [--device cuda]``.

Pipeline times include the actors' start-up (process, imports, model load) and the final compaction; the
sequential times include loading the models. Inference settings are the paper's (cfg defaults: 4 scales x flip,
random walk t = 2^8, CRF 10 iterations) unless overridden with ``--set``. Output: a markdown table printed and
saved to ``bench/results/pipeline.md`` (+ ``pipeline.json``), with per-stage rows/s from ``ds.stats()``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def build(work: Path, n: int, size: int, width: int, overrides: list[str], shards: bool = True) -> dict:
    import torch

    from wsss.checkpoint import save_checkpoint
    from wsss.config import from_dict
    from wsss.data import open_dataset
    from wsss.data.shards import write_shards
    from wsss.data.synth import make_synthetic
    from wsss.models.affinity_net import AffinityNet
    from wsss.train import build_model

    make_synthetic(str(work / "data"), num_images=n, size=size, seed=0, val_fraction=0.0)
    ds = open_dataset(str(work / "data"), "train")
    if shards:
        write_shards(ds, str(work / "shards"), shard_size=max(1, n // 4), progress=False)
    cfg = from_dict({"model": {"backbone": "tiny", "width": width}, "device": "cpu", "seed": 0}, overrides)
    torch.manual_seed(0)
    save_checkpoint(str(work / "cam"), build_model(cfg, ds.num_classes), cfg,
                    {"kind": "cam", "class_names": list(ds.class_names)})
    save_checkpoint(str(work / "aff"), AffinityNet(cfg.model, load_weights=False), cfg,
                    {"kind": "affinity", "class_names": list(ds.class_names)})
    return {"data": str(work / "data"), "shards": str(work / "shards"), "cam": str(work / "cam"),
            "aff": str(work / "aff"), "cfg": cfg, "ids": sorted(ds.ids)}


def bench_cam(m: dict, n: int, batch: int, device: str, repeats: int = 2) -> dict:
    """CAM inference alone: the per-pass loop (``CamStage.__call__`` per image) vs ``CamStage.batch`` in chunks of
    ``batch`` images, on the first ``n`` images of the set; best of ``repeats`` timed passes after a warm-up.
    Checks the two agree (max abs difference)."""
    import torch

    from wsss.data import open_dataset
    from wsss.pseudolabel import CamStage

    ds = open_dataset(m["data"], "train")
    items = [ds.load_item(i) for i in m["ids"][:n]]
    images, labels = [it["image"] for it in items], [it["labels"] for it in items]
    stage = CamStage(m["cam"], device=device)
    sync = torch.cuda.synchronize if stage.device.type == "cuda" else (lambda: None)

    def per_pass():
        return [stage(im, lab) for im, lab in zip(images, labels)]

    def batched():
        out = []
        for c0 in range(0, len(images), batch):
            out += stage.inferencer.infer_batch(images[c0:c0 + batch], labels[c0:c0 + batch], batch_size=batch)
        return out

    times = {}
    outs = {}
    stage(images[0], labels[0])  # warm-up (allocator, cudnn autotune) of both shapes of forward
    stage.batch(images[:batch], labels[:batch])
    for name, fn in (("per_pass", per_pass), ("batched", batched)):
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            outs[name] = fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    diff = max(float(np.abs(a[0] - b[0]).max()) if a[0].size else 0.0
               for a, b in zip(outs["per_pass"], outs["batched"]))
    return {"n": len(images), "batch": batch, "device": str(stage.device), "threads": torch.get_num_threads(),
            "per_pass_s": times["per_pass"], "batched_s": times["batched"],
            "speedup": times["per_pass"] / times["batched"] if times["batched"] > 0 else float("nan"),
            "max_abs_diff": diff, "scales": list(stage.inferencer.scales), "flip": stage.inferencer.flip}


def cam_table(r: dict, size: int, width: int) -> list[str]:
    return ["| run | device | images | batch | per-pass s | batched s | per-pass img/s | batched img/s | "
            "speed-up | max abs diff |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| CAM inference: batched vs per-pass ({size} px, tiny width {width}, scales "
            f"{'/'.join(str(s) for s in r['scales'])}{' x flip' if r['flip'] else ''}) | {r['device']} "
            f"({r['threads']} threads) | {r['n']} | {r['batch']} | {r['per_pass_s']:.2f} | {r['batched_s']:.2f} | "
            f"{r['n'] / r['per_pass_s']:.2f} | {r['n'] / r['batched_s']:.2f} | **{r['speedup']:.2f}x** | "
            f"{r['max_abs_diff']:.1e} |"]


def run_sequential(m: dict, out: str, threads: int | None, cam_batch: int = 8) -> dict:
    import torch

    from wsss.pseudolabel import pseudolabel

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        load = _load()
        t0, c0 = time.perf_counter(), time.process_time()
        r = pseudolabel(m["cfg"], m["cam"], m["data"], out, affinity=m["aff"], stages=("cam", "rw", "crf"),
                        split="train", progress=False, cam_batch=cam_batch)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(saved)
    return {"wall_s": wall, "cpu_s": cpu, "n": r["n_written"], "threads": used, "load": load,
            "mean_sec": {k: r.get(f"mean_sec_{k}") for k in ("cam", "rw", "crf")}}


def run_pipeline(m: dict, out: str, cam_actors: int, crf_tasks: int, batch_size: int, overrides: list[str]) -> dict:
    from jobs.pseudolabel import run_pseudolabel

    load = _load()
    t0 = time.perf_counter()
    r = run_pseudolabel(m["cam"], m["shards"], out, affinity=m["aff"], stages=("cam", "rw", "crf"),
                        cam_actors=cam_actors, rw_actors=1, crf_tasks=crf_tasks, batch_size=batch_size,
                        cfg_overrides=overrides, actor_threads=1, progress=False, verbose=False)
    wall = time.perf_counter() - t0
    cpu = sum(s.get("cpu_s") or 0.0 for s in r["stage_stats"])  # CPU seconds of all Ray tasks / actor calls
    import pyarrow.parquet as pq

    res = pq.read_table(out).to_pydict()  # the output prefix is a Parquet dataset of the result rows
    mean_sec = {k: float(np.mean([v for v in res[f"sec_{k}"] if v is not None])) for k in ("cam", "rw", "crf")}
    return {"wall_s": wall, "cpu_s": cpu, "load": load, "n": r["n_ok"], "pipeline_s": r["pipeline_seconds"],
            "stage_stats": r["stage_stats"], "mean_sec": mean_sec,
            "rejected": r["n_rejected"], "first_output_s": r["first_output_s"],
            "steady_images_per_s": r["steady_images_per_s"]}


def agreement(out_a: str, out_b: str, ids: list[str]) -> float:
    """Fraction of pixels with the same label in two output folders."""
    from wsss.data.io import decode_mask

    same = total = 0
    for i in ids:
        a = decode_mask(Path(out_a, "_labels", f"{i}.png").read_bytes(), i)
        b = decode_mask(Path(out_b, "_labels", f"{i}.png").read_bytes(), i)
        same += int((a == b).sum())
        total += a.size
    return same / total if total else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=192, help="synthetic image side (px)")
    p.add_argument("--width", type=int, default=8, help="tiny backbone width")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both paths (e.g. crf.iters=10)")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    p.add_argument("--no-seq-1thread", action="store_true", help="skip the 1-thread sequential reference")
    p.add_argument("--cam-batch", type=int, default=8, help="images per batched CAM forward (sequential loop and "
                   "the CAM row)")
    p.add_argument("--cam-only", action="store_true",
                   help="only the row 'CAM inference: batched vs per-pass' (no Ray, no RW/CRF)")
    p.add_argument("--cam-images", type=int, default=None, help="images for the CAM row (default: all)")
    p.add_argument("--device", default="cpu", help="device of the CAM row (cpu | cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the CAM row on CPU (default 1)")
    p.add_argument("--out", default=None, help="markdown table path (default bench/results/pipeline.md, or "
                   "bench/results/cam_batch.md with --cam-only)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(HERE / "results" / ("cam_batch.md" if args.cam_only else "pipeline.md"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import torch

    rows: list[dict] = []
    env = {"cpus": os.cpu_count(), "torch_default_threads": torch.get_num_threads(), "python": platform.python_version(),
           "torch": torch.__version__, "load_start": _load()}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        m = build(work, args.images, args.size, args.width, args.overrides, shards=not args.cam_only)
        n = len(m["ids"])
        print(f"data: {n} images {args.size}px, tiny width {args.width}; load {_load()}", file=sys.stderr)
        if args.device == "cpu" and args.threads:
            torch.set_num_threads(args.threads)
        cam_row = bench_cam(m, args.cam_images or n, args.cam_batch, args.device)
        torch.set_num_threads(env["torch_default_threads"])
        print(f"CAM inference: per-pass {cam_row['per_pass_s']:.2f}s, batched {cam_row['batched_s']:.2f}s "
              f"({cam_row['speedup']:.2f}x)", file=sys.stderr)
        if args.cam_only:
            env["load_end"] = _load()
            text = "\n".join([f"# CAM inference: batched vs per-pass", "",
                              f"{cam_row['n']} synthetic images of {args.size} px, untrained tiny backbone; best "
                              f"of 2 passes after a warm-up. Load average {env['load_start']} at start, "
                              f"{env['load_end']} at the end.", ""] + cam_table(cam_row, args.size, args.width)) + "\n"
            print(text)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            out.with_suffix(".json").write_text(json.dumps({"env": env, "args": vars(args), "cam": cam_row},
                                                           indent=2, default=float) + "\n")
            print(f"saved {out}", file=sys.stderr)
            return 0

        import ray
        import ray.data

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        time.sleep(3)  # let the prestarted workers settle

        def pipe(cam_actors: int, crf_tasks: int) -> None:
            out = str(work / f"pipe-{cam_actors}-{crf_tasks}")
            r = run_pipeline(m, out, cam_actors, crf_tasks, args.batch_size, args.overrides)
            r["agreement_with_seq"] = agreement(str(work / "seq"), out, m["ids"])
            rows.append({"run": f"pipeline: {cam_actors} CAM actor(s), 1 RW actor, {crf_tasks} CRF worker(s)",
                         "cam_actors": cam_actors, "crf_tasks": crf_tasks, **r})
            print(f"pipeline cam={cam_actors} crf={crf_tasks}: {r['wall_s']:.1f}s", file=sys.stderr)

        # Interleaved so that the other load of a shared machine drifts over all variants alike.
        try:
            seq = run_sequential(m, str(work / "seq"), None, args.cam_batch)
            rows.append({"run": f"sequential loop, torch default threads ({seq['threads']})", **seq})
            print(f"sequential ({seq['threads']} threads): {seq['wall_s']:.1f}s", file=sys.stderr)
            pipe(1, 1)
            if not args.no_seq_1thread:
                seq1 = run_sequential(m, str(work / "seq1"), 1, args.cam_batch)
                rows.append({"run": "sequential loop, 1 torch thread (reference)", **seq1})
                print(f"sequential (1 thread): {seq1['wall_s']:.1f}s", file=sys.stderr)
            pipe(1, 2)
            pipe(2, 2)
        finally:
            ray.shutdown()
    env["load_end"] = _load()

    base = rows[0]["wall_s"] / max(rows[0]["n"], 1)
    lines = [f"# Pseudo-labelling pipeline vs sequential loop", "",
             f"{n} synthetic images of {args.size} px, tiny backbone (width {args.width}), untrained; stages cam "
             f"(4 scales x flip), rw (t = 2^8), crf (10 iterations){' with ' + ', '.join(args.overrides) if args.overrides else ''}; "
             f"batch {args.batch_size}. Machine: {env['cpus']} CPUs, load average {env['load_start']} at start, "
             f"{env['load_end']} at the end (shared machine). Times include start-up (model load; for the pipeline "
             f"also the actor processes) and, for the pipeline, the results compaction.", "",
             "| run | images | wall s | images/s | vs sequential (default threads) | vs sequential (1 thread) "
             "| first output s | images/s after first output | CPU s / image (pipeline: Ray tasks only) | load avg at start "
             "| label agreement with sequential |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base1 = next((r["wall_s"] / max(r["n"], 1) for r in rows if r["run"].startswith("sequential loop, 1")), None)
    for r in rows:
        ips = r["n"] / r["wall_s"] if r["wall_s"] > 0 else 0.0
        per = r["wall_s"] / max(r["n"], 1)
        agree = f"{100 * r['agreement_with_seq']:.2f} %" if "agreement_with_seq" in r else "-"
        first = f"{r['first_output_s']:.1f}" if r.get("first_output_s") is not None else "-"
        steady = f"{r['steady_images_per_s']:.2f}" if r.get("steady_images_per_s") else "-"
        vs1 = f"{base1 / per:.2f}x" if base1 else "-"
        lines.append(f"| {r['run']} | {r['n']} | {r['wall_s']:.1f} | {ips:.2f} | {base / per:.2f}x | {vs1} | "
                     f"{first} | {steady} | {r['cpu_s'] / max(r['n'], 1):.3f} | {r['load'].split()[0]} | {agree} |")
    lines += ["", "CAM inference alone, same images (1 torch thread on CPU unless --threads):", ""]
    lines += cam_table(cam_row, args.size, args.width)
    lines += ["", "Per-image seconds inside each stage function (mean; the pipeline's stages run concurrently on the "
              "same 2 cores, so each is slower than alone):", "",
              "| run | cam | rw | crf |", "|---|---:|---:|---:|"]
    for r in rows:
        if "mean_sec" in r:
            ms = r["mean_sec"]
            lines.append(f"| {r['run']} | {ms['cam']:.3f} | {ms['rw']:.3f} | {ms['crf']:.3f} |")
    for r in rows:
        if "stage_stats" in r:
            lines += ["", f"Per-stage throughput from ds.stats(), {r['run']} (rows/s = rows / operator wall time; "
                          f"per task = rows / summed task time):", "",
                      "| stage | rows | rows/s | rows/s per task |", "|---|---:|---:|---:|"]
            for s in r["stage_stats"]:
                if s["rows"]:
                    lines.append(f"| {s['stage']} | {s['rows']} | {(s['rows_per_s'] or 0):.2f} | "
                                 f"{(s['single_task_rows_per_s'] or 0):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows, "cam": cam_row}, indent=2,
                                                   default=float) + "\n")
    print(f"saved {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
