"""Build every reference model (or the ones named) with its data files.

    python models/build_all.py [--out DIR] [--quick] [--only NAME ...]

Without --out, small artefacts go into models/ and large ones (minilm) into the cache folder
($ONNXPRUNE_CACHE or ~/.cache/onnxprune/models), exactly as the single scripts do.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

MODELS = ["digits_cnn", "animal_mlp", "animal_cnn", "animal_resnet", "minilm"]


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=MODELS, default=MODELS)
    args = parser.parse_args(argv)
    forwarded = (["--out", str(args.out)] if args.out else []) + (["--quick"] if args.quick else [])
    records = {name: importlib.import_module(name).main(forwarded) for name in args.only}
    print(f"\n{'model':<14} {'params':>10} {'accuracy':>9} {'build s':>8}")
    for name, rec in records.items():
        acc = f"{rec['accuracy']:.4f}" if "accuracy" in rec else "-"
        print(f"{name:<14} {rec['params']:>10} {acc:>9} {rec['build_time_s']:>8}")
    return records


if __name__ == "__main__":
    main()
