"""Dense CRF (pydensecrf): seconds per megapixel at 5 and 10 mean-field iterations.

    python -m bench.bench_crf [--iters 5 10] [--classes 3] [--repeats 2]

Images: the real PASCAL VOC val sample in ../shared/data/voc2012-val-sample (first --voc-images, ~0.19 MP each) when
present, plus synthetic 1024x1024 and 2048x1024 images (smooth colour regions with noise).  Scores: a smooth random
(C, H, W) probability map (C = background + foreground classes present, as the pipeline uses).  Parameters from
wsss.config.CRFConfig (AffinityNet/SEAM: Gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10).
pydensecrf runs on one CPU thread.  Prints a markdown table and saves it to bench/results/crf.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from wsss.config import CRFConfig
from wsss.refine.crf import crf_inference

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2012-val-sample"


def _smooth_probs(rng: np.random.Generator, C: int, H: int, W: int) -> np.ndarray:
    coarse = rng.random((C, max(2, H // 32), max(2, W // 32))).astype(np.float32)
    import torch
    import torch.nn.functional as F

    up = F.interpolate(torch.from_numpy(coarse)[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    p = torch.softmax(up * 6.0, 0).numpy()
    return np.ascontiguousarray(p, dtype=np.float32)


def _synthetic_image(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (max(2, H // 64), max(2, W // 64), 3)).astype(np.uint8)
    from PIL import Image

    img = np.asarray(Image.fromarray(coarse).resize((W, H), Image.NEAREST)).astype(np.int32)
    return np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)


def _images(n_voc: int, rng) -> list[tuple[str, np.ndarray]]:
    out = []
    jpg = SAMPLE / "JPEGImages"
    if jpg.is_dir() and n_voc > 0:
        from PIL import Image

        for p in sorted(jpg.glob("*.jpg"))[:n_voc]:
            out.append((f"VOC {p.stem}", np.asarray(Image.open(p).convert("RGB"))))
    out.append(("synthetic", _synthetic_image(rng, 1024, 1024)))
    out.append(("synthetic", _synthetic_image(rng, 1024, 2048)))
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--classes", type=int, nargs="+", default=[3])
    ap.add_argument("--voc-images", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "crf.md"))
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    cfg = CRFConfig()
    rows = []
    per_iters: dict[tuple[int, int], list[float]] = {}
    for name, image in _images(args.voc_images, rng):
        H, W = image.shape[:2]
        mp = H * W / 1e6
        for C in args.classes:
            probs = _smooth_probs(rng, C, H, W)
            row = {"name": name, "size": f"{W}x{H}", "mp": mp, "C": C}
            for it in args.iters:
                times = []
                for _ in range(max(1, args.repeats)):
                    t0 = time.perf_counter()
                    crf_inference(image, probs, cfg, iters=it)
                    times.append(time.perf_counter() - t0)
                t = statistics.median(times)
                row[it] = t
                per_iters.setdefault((it, C), []).append(t / mp)
            rows.append(row)
            print(f"  {name} {W}x{H} C={C}: " + ", ".join(f"{it} it {row[it]:.2f} s" for it in args.iters),
                  flush=True)

    head = ["image", "size (MP)", "C"] + [f"{it} iters: s (s/MP)" for it in args.iters]
    lines = [
        f"Dense CRF (pydensecrf2, 1 thread, {platform.processor() or platform.machine()}); Gaussian sxy "
        f"{cfg.gauss_sxy:g} compat {cfg.gauss_compat:g}, bilateral sxy {cfg.bi_sxy:g} srgb {cfg.bi_srgb:g} compat "
        f"{cfg.bi_compat:g}; median of {args.repeats}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["name"], f"{r['size']} ({r['mp']:.2f})", str(r["C"])]
        cells += [f"{r[it]:.2f} ({r[it] / r['mp']:.2f})" for it in args.iters]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Seconds per megapixel (median over images): " + "; ".join(
        f"{it} iters, C={C}: {statistics.median(v):.2f} s/MP" for (it, C), v in sorted(per_iters.items())) + ".")
    lines.append(f"Machine load average during the run (1/5/15 min): "
                 f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} logical CPUs "
                 "(timings on a shared machine are noisy).")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("Command: `python -m bench.bench_crf`\n\n" + table)
    return table


if __name__ == "__main__":
    main()
