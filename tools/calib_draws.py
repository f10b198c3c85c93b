"""How much a benchmark cell depends on which calibration samples were drawn.

    python tools/calib_draws.py [--models animal_mlp,animal_cnn,animal_resnet]
        [--sparsities 0.9,0.95] [--draws 5] [--calib-samples 512]

The benchmark calibrates on the first 512 images of each calibration split; a difference of a
few test images between two methods may then be the luck of that draw. This prunes each model
with each method (one trail per method and draw) on draw 0 (those first images) and on `--draws`
seeded random subsets of the same size, evaluates every level on the test split, and prints the
mean, range and per-draw accuracies, and how many draws each method won against the first
(`ltp --refit`). Runs in-process from the checkout; about 6 minutes with the defaults.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package, when run from a checkout without installing

from onnxprune import prune  # noqa: E402
from onnxprune.budget import keep_freed_memory  # noqa: E402
from onnxprune.evaluate import evaluate  # noqa: E402

METHODS = {"ltp --refit": dict(method="ltp", refit=True),
           "global-mt --refit": dict(method="global-mt", refit=True),
           "dc": dict(method="dc")}


def draws(calib: dict, n: int, count: int) -> list[dict]:
    """Draw 0: the first n samples (the benchmark's); draw d: n of them chosen with seed d."""
    total = len(calib["input"])
    picks = [np.arange(n)] + [np.sort(np.random.default_rng(d).choice(total, n, replace=False))
                              for d in range(1, count + 1)]
    return [{k: v[i] for k, v in calib.items() if k != "labels"} for i in picks]


def accuracies(model: str, calib: dict, levels: list[float], options: dict, test: Path) -> list[float]:
    results = prune(ROOT / "models" / f"{model}.onnx", levels, calib=calib, calib_samples=None,
                    verify=False, **options)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for level, result in zip(levels, results):
            path = Path(tmp) / f"s{level}.onnx"
            onnx.save(result.model, path)
            out.append(100 * evaluate(path, test, progress=False)["accuracy"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="animal_mlp,animal_cnn,animal_resnet")
    parser.add_argument("--sparsities", default="0.9,0.95")
    parser.add_argument("--draws", type=int, default=5, help="random draws besides draw 0")
    parser.add_argument("--calib-samples", type=int, default=512)
    args = parser.parse_args()
    keep_freed_memory()
    levels = [float(s) for s in args.sparsities.split(",")]
    for model in args.models.split(","):
        prefix = model.split("_")[0]
        with np.load(ROOT / "models" / f"{prefix}_calib.npz") as f:
            calib = {k: f[k] for k in f.files}
        test = ROOT / "models" / f"{prefix}_test.npz"
        acc = {name: np.array([accuracies(model, c, levels, options, test)
                               for c in draws(calib, args.calib_samples, args.draws)])
               for name, options in METHODS.items()}  # (draws, levels) per method
        first = next(iter(acc))
        print(f"\n{model}, {args.draws + 1} calibration draws of {args.calib_samples} samples: "
              "test accuracy %, mean (min-max); wins: draws where the method is at least as "
              f"accurate as {first}")
        print("| level | " + " | ".join(acc) + " |\n|---|" + "---|" * len(acc))
        for j, level in enumerate(levels):
            cells = []
            for name, a in acc.items():
                col = a[:, j]
                cell = f"{col.mean():.2f} ({col.min():.2f}-{col.max():.2f})"
                if name != first:
                    cell += f", wins {int(np.sum(col >= acc[first][:, j]))}"
                cells.append(cell)
            print(f"| {level} | " + " | ".join(cells) + " |")
        for name, a in acc.items():
            print(f"per draw, {name}: " + "; ".join(
                f"{level}: " + " ".join(f"{x:.2f}" for x in a[:, j]) for j, level in enumerate(levels)))


if __name__ == "__main__":
    main()
