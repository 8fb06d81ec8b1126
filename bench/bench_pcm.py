"""What the PCM has to work with: cosine similarity of its pixel features, and CAM mIoU with and without it.

    python -m bench.bench_pcm --work <bench_cam_methods work dir> [--methods seam,daen-csm] [--seeds 3] [--images 60]

For each SEAM/DAEN checkpoint of bench.bench_cam_methods (``<work>/<method>-<seed>`` and, where present,
``...-init-cam``): mean ± std of the cosine similarity between the PCM's (L2-normalised) features of every pixel pair
on the CAM grid, and the CAM mIoU of the raw CAM and of the PCM-refined CAM (same threshold sweep) on the val split.
A near-constant similarity means the PCM averages the CAM over almost the whole image. Writes
bench/results/pcm.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import write_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--methods", default="seam,daen-csm")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--images", type=int, default=60, help="val images for the similarity statistics")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results/pcm.md"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from wsss import config
    from wsss.data import open_dataset
    from wsss.data.transforms import normalize
    from wsss.train import build_model, evaluate_cams

    work = Path(args.work)
    val = open_dataset(str(work / "synth"), "val")
    lines = [f"PCM on the synthetic val split ({len(val)} images; similarity over the first {args.images}).", "",
             "| checkpoint | cosine similarity of PCM features (mean ± std over pixel pairs) | raw CAM mIoU % | "
             "PCM CAM mIoU % |", "|---|---|---|---|"]
    for method in args.methods.split(","):
        for seed in range(args.seeds):
            for suffix in ("", "-init-cam"):
                ckpt = work / f"{method}-{seed}{suffix}"
                if not (ckpt / "model.pt").exists():
                    continue
                row = []
                for use_pcm in (False, True):
                    cfg = config.load(ckpt / "config.yaml", [f"infer.use_pcm={str(use_pcm).lower()}"])
                    net = build_model(cfg, val.num_classes)
                    net.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True))
                    net.eval()
                    row.append(100 * evaluate_cams(net, cfg, val)["miou"])
                sims = []
                with torch.no_grad():
                    for i in val.ids[:args.images]:
                        x = normalize(np.asarray(val.load_image(i))).unsqueeze(0)
                        f4, f5, f6 = net.backbone(x)
                        f = net.pcm.features(x, f4, f5, tuple(f6.shape[-2:])).flatten(2)[0]
                        cos = f.T @ f
                        off = ~torch.eye(cos.shape[0], dtype=torch.bool)
                        sims.append(cos[off].numpy())
                s = np.concatenate(sims)
                lines.append(f"| {ckpt.name} | {s.mean():.2f} ± {s.std():.2f} | {row[0]:.2f} | {row[1]:.2f} |")
                print(lines[-1], flush=True)
    write_table(lines, args.out, "bench.bench_pcm", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
