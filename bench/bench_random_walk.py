"""Random walk: sparse production path vs the dense reference (AffinityNet's squared transition matrix).

    python -m bench.bench_random_walk [--sizes 256 512 1024] [--classes 3 5] [--device auto]

CPU threads: --threads (default 1, both paths).  Input image sizes map to a stride-8 feature grid (size/8)^2;
beta 8, logt 8 (t = 256), radius 5 (AffinityNet).
Random affinities and scores (timings do not depend on values).  Memory: peak resident-set growth during the call
on the CPU (Linux VmHWM, reset through /proc/self/clear_refs), peak allocated bytes on CUDA.  The dense reference is
skipped where its three n x n float32 matrices would exceed --dense-budget-gb; its time there is extrapolated from
the measured multiply-add rate of the largest dense run.  Prints a markdown table and saves it to
bench/results/random_walk.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from wsss.refine.random_walk import dense_bytes, expected_flops, neighbor_offsets, random_walk, random_walk_dense


def _status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(fn, device: torch.device) -> tuple[float, float | None, torch.Tensor]:
    """(seconds, peak extra bytes or None, result) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        return dt, float(torch.cuda.max_memory_allocated(device) - base), out
    ok = _reset_peak()
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    hwm = _status_kb("VmHWM")
    peak = (hwm - rss0) * 1024.0 if ok and hwm is not None and rss0 is not None else None
    return dt, peak, out


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    if b < 64e3:
        return "~0 (reused pages)"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b:.0f} B"


def _fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.1f} ms"


def sparse_bytes(h: int, w: int, channels: int, radius: int, itemsize: int = 4) -> int:
    """Analytic working set of the sparse path: weight planes + two padded score buffers."""
    k = 2 * len(neighbor_offsets(radius)) + 1
    r1 = radius - 1
    return (2 * k * h * w + 2 * channels * (h + 2 * r1) * (w + 2 * r1)) * itemsize


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--classes", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--logt", type=int, default=8)
    ap.add_argument("--beta", type=float, default=8.0)
    ap.add_argument("--radius", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="sparse runs per case (median reported)")
    ap.add_argument("--dense-budget-gb", type=float, default=2.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for both paths (1: stable timings on a shared machine; 0: torch default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "random_walk.md"))
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    budget = args.dense_budget_gb * 1e9
    P = len(neighbor_offsets(args.radius))
    rows = []
    dense_rate = None  # multiply-adds per second of the dense path (largest run)
    for size in args.sizes:
        h = w = size // 8
        for C in args.classes:
            g = torch.Generator().manual_seed(size + C)
            probs = torch.rand(C, h, w, generator=g).to(device)
            aff = torch.rand(P, h, w, generator=g).to(device)
            times, peaks = [], []
            sparse_out = None
            for _ in range(max(1, args.repeats)):
                dt, peak, sparse_out = measure(lambda: random_walk(probs, aff, args.radius, args.beta, args.logt),
                                               device)
                times.append(dt)
                peaks.append(peak)
            t_sparse = statistics.median(times)
            p_sparse = max((p for p in peaks if p is not None), default=None)
            fl = expected_flops(h, w, C, args.radius, args.logt)
            need = dense_bytes(h, w)
            row = {"size": size, "grid": f"{h}x{w}", "n": h * w, "C": C, "t_sparse": t_sparse, "p_sparse": p_sparse,
                   "a_sparse": sparse_bytes(h, w, C, args.radius), "need": need}
            if need <= budget:
                dt, peak, dense_out = measure(lambda: random_walk_dense(probs, aff, args.radius, args.beta,
                                                                        args.logt), device)
                row.update(t_dense=dt, p_dense=peak, diff=float((sparse_out - dense_out).abs().max()))
                dense_rate = fl["dense"] / dt
                del dense_out
            else:
                row.update(t_dense=None, p_dense=None, diff=None,
                           est=(fl["dense"] / dense_rate) if dense_rate else None)
            rows.append(row)
            print(f"  size {size} C {C}: sparse {_fmt_s(t_sparse)}"
                  + (f", dense {_fmt_s(row['t_dense'])}" if row.get("t_dense") else ", dense skipped"), flush=True)

    lines = [
        f"Random walk, beta {args.beta:g}, logt {args.logt} (t = {1 << args.logt}), radius {args.radius} "
        f"({2 * P + 1} neighbours incl. self), float32, device {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
           f"{os.cpu_count()} logical CPUs)") + ".",
        "Memory: peak extra resident memory during the call (measured; small values are hidden by the allocator "
        "reusing freed pages) and, in brackets, the analytic working set (sparse: weight planes + score buffers; "
        "dense: three n x n float32 matrices). The memory ratio is dense / sparse of the analytic working sets.",
        "",
        "| input | grid (n) | C | sparse time | dense time | speed-up | sparse peak mem | dense peak mem | "
        "mem ratio (analytic) | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = None
    for r in rows:
        if r["t_dense"] is not None:
            speed = r["t_dense"] / r["t_sparse"]
            mem_ratio = f"{r['need'] / r['a_sparse']:.0f}x"
            dense_t = _fmt_s(r["t_dense"])
            dense_p = f"{_fmt_bytes(r['p_dense'])} [{_fmt_bytes(r['need'])}]"
            diff = f"{r['diff']:.1e}"
            speed_s = f"{speed:.0f}x"
            if best is None or r["n"] >= best[0]:
                best = (r["n"], r["size"], speed if best is None or r["n"] > best[0] else min(best[2], speed))
        else:
            est = f", est. {_fmt_s(r['est'])}" if r.get("est") else ""
            dense_t = f"skipped (infeasible{est})"
            dense_p = f"needs {_fmt_bytes(r['need'])} > budget {_fmt_bytes(budget)} (OOM)"
            mem_ratio = f"{r['need'] / r['a_sparse']:.0f}x"
            diff = "-"
            speed_s = (f"~{r['est'] / r['t_sparse']:.0f}x (est.)" if r.get("est") else "-")
        lines.append(f"| {r['size']}² | {r['grid']} ({r['n']}) | {r['C']} | {_fmt_s(r['t_sparse'])} | {dense_t} | "
                     f"{speed_s} | {_fmt_bytes(r['p_sparse'])} [{_fmt_bytes(r['a_sparse'])}] | {dense_p} | "
                     f"{mem_ratio} | {diff} |")
    lines.append("")
    if best is not None:
        verdict = "meets" if best[2] >= 10 else "MISSES"
        lines.append(f"Largest size where both run: {best[1]}² input; smallest speed-up there {best[2]:.0f}x "
                     f"({verdict} the >= 10x target).")
    lines.append(f"Machine load average during the run (1/5/15 min): "
                 f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} logical CPUs "
                 "(timings on a shared machine are noisy).")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("Command: `python -m bench.bench_random_walk`\n\n" + table)
    return table


if __name__ == "__main__":
    main()
