"""Speed and memory of data-free pruning against plain onnx.load + onnx.save of the same model.

    python tools/bench_core.py MODEL.onnx [--sparsity 0.9] [--repeat 3]

Each measurement runs in a fresh subprocess so peak RSS belongs to that job alone; it reports
wall time of the work (imports excluded), peak RSS, and the growth of RSS over the process
after its imports, all as ratios to the baseline / the file size. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
import numpy as np, onnx, onnxruntime, psutil, onnxprune
job, src, dst, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
base = psutil.Process().memory_info().rss
start = time.perf_counter()
if job == "load+save":
    onnx.save(onnx.load(src), dst)
else:
    onnxprune.prune(src, extra["sparsity"], method=job, output=dst, verify=extra["verify"])
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"wall": wall, "peak": peak, "base": base, "out": os.path.getsize(dst)}))
"""


def measure(job: str, model: Path, sparsity: float, verify: bool, repeat: int) -> dict:
    best = None
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.onnx"
            args = json.dumps({"sparsity": sparsity, "verify": verify})
            text = subprocess.run([sys.executable, "-c", CHILD, job, str(model), str(out), args],
                                  check=True, capture_output=True, text=True).stdout
            result = json.loads(text.strip().splitlines()[-1])
        if best is None or result["wall"] < best["wall"]:
            best = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()
    size = os.path.getsize(args.model)
    base = measure("load+save", args.model, args.sparsity, False, args.repeat)
    rows = [("onnx.load + onnx.save", base)]
    for method in ("global", "global-mt"):
        rows.append((f"onnxprune {method} {args.sparsity}, --no-verify",
                     measure(method, args.model, args.sparsity, False, args.repeat)))
        rows.append((f"onnxprune {method} {args.sparsity}, verified",
                     measure(method, args.model, args.sparsity, True, args.repeat)))
    print(f"model: {args.model.name}, {size / 1e6:.1f} MB; best of {args.repeat}; "
          f"{os.cpu_count()} CPU cores\n")
    print("| job | wall s | x load+save | peak RSS MB | peak / file | RSS growth / file | output MB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['wall']:.2f} | {r['wall'] / base['wall']:.2f} | {r['peak'] / 1e6:.0f} "
              f"| {r['peak'] / size:.2f} | {(r['peak'] - r['base']) / size:.2f} | {r['out'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
