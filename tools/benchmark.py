"""Side-by-side benchmark: every onnxprune method and onnxsim.pruning on the reference models.

    python tools/benchmark.py [--models animal_mlp,animal_cnn,animal_resnet,minilm]
        [--sparsities 0.5,0.7,0.8,0.9,0.95] [--methods all] [--baselines all]
        [--calib-samples 512] [--out docs] [--update-readme] [--quick]

Writes OUT/benchmark.json (every measured row), OUT/benchmark.md (tables and findings computed
from the rows) and OUT/benchmark.png (accuracy, or fidelity for MiniLM, against sparsity).
--update-readme puts the tables into README.md between the benchmark markers.

What is measured:
- onnxprune: one subprocess per (model, method) prunes all sparsity levels in ONE call (a trail:
  one load, one calibration pass); its wall time is divided by the number of levels. Peak memory
  is that subprocess's ru_maxrss (imports included; the RSS after imports is kept too).
- onnxsim: tools/onnxsim_baselines.run_baseline, one subprocess per level (its API takes one
  sparsity); wall time is its load + prune + save, peak memory its ru_maxrss.
- Neither tool verifies in the timed part; every pruned model is then run in onnxruntime on the
  test split by onnxprune.evaluate (accuracy and top-1 agreement with the dense model; MiniLM:
  mean cosine similarity and nearest-neighbour retrieval agreement with the dense model).
- Both tools get the same calibration samples: the first --calib-samples of the calib split.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package, when run from a checkout without installing
sys.path.insert(0, str(ROOT / "tools"))

DEFAULT_MODELS = ("animal_mlp", "animal_cnn", "animal_resnet", "minilm")
DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
REFIT_VARIANT = "global-mt+refit"
DEFAULT_SKIP = ("minilm:onnxsim-sparsegpt",)
SKIP_REASON = ("left out by default: each level takes tens of minutes on a 2-core machine; "
               "`--skip none` runs them")
# Pairs run at fewer levels by default, to keep the whole run under about half an hour.
DEFAULT_ONLY_AT = ("animal_cnn:onnxsim-sparsegpt@0.9", "minilm:dc@0.5/0.7", "minilm:dc+ltp@0.5/0.7",
                   "minilm:ltp@0.5/0.7", "minilm:ltp+refit@0.5/0.7")
ONLY_AT_REASON = ("by default only at these levels: each level takes minutes (see its s / level); "
                  "`--only-at none` runs every level")
LAYER_STUDY = ("animal_resnet", 0.95)  # the model whose layers are pruned one at a time
QUICK = dict(models=("digits_cnn",), sparsities=(0.5, 0.9), calib_samples=64,
             methods=("layer", "global", "global-mt"), baselines=("onnxsim-wanda",),
             layer_study=("digits_cnn", 0.9), skip=(), only_at=())


@dataclass
class ModelFiles:
    name: str
    model: Path
    calib: Path
    test: Path
    labelled: bool  # classifier with labels in the test split; else judged by fidelity


def cache_dir() -> Path:
    """Where models/ scripts put artefacts too large to commit (as models/_common.cache_dir)."""
    env = os.environ.get("ONNXPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnxprune" / "models"


def model_files(name: str) -> ModelFiles:
    """Files of a reference model, from its record models/<name>.json."""
    record_path = ROOT / "models" / f"{name}.json"
    if not record_path.exists():
        raise SystemExit(f"unknown model '{name}': there is no models/{name}.json")
    record = json.loads(record_path.read_text())
    found = {}
    for key in ("model", "calib", "test"):
        candidates = [ROOT / "models" / record[key], cache_dir() / record[key]]
        hit = next((p for p in candidates if p.exists()), None)
        if hit is None:
            raise SystemExit(f"{name}: {record[key]} not found in models/ or {cache_dir()}; "
                             f"build it with: python models/{name}.py")
        found[key] = hit
    with np.load(found["test"]) as z:
        labelled = "labels" in z.files
    return ModelFiles(name, found["model"], found["calib"], found["test"], labelled)


def onnxprune_methods() -> list[str]:
    """Every method of onnxprune as installed now, plus the refit variant where it exists."""
    import importlib

    api = importlib.import_module("onnxprune.prune")  # the module: the package exports the function
    options = importlib.import_module("onnxprune.options")
    methods = list(options.METHODS)
    if "refit" in inspect.signature(api.prune).parameters:
        methods.append(REFIT_VARIANT)
        if "ltp" in methods:  # LTP learns the allocation; its acceptance is with the refit
            methods.append("ltp+refit")
    if "ltp" in options.ALLOCATIONS:
        methods.append("dc+ltp")  # DC's per-layer solve within LTP's learned allocation
    return methods


def split_method(method: str) -> tuple[str, dict]:
    """'global-mt+refit' -> ('global-mt', {'refit': True}); 'dc+ltp' -> ('dc', {'allocation': 'ltp'})."""
    base, _, variant = method.partition("+")
    return base, ({"refit": True} if variant == "refit" else
                  {"allocation": variant} if variant else {})


def calib_subset(files: ModelFiles, n: int) -> dict[str, np.ndarray]:
    with np.load(files.calib) as z:
        return {k: z[k][:n] for k in z.files if k != "labels"}


# ------------------------------------------------------------------- onnxprune, in a child

def run_trail(files: ModelFiles, method: str, levels: list[float], calib_file: Path,
              calib_samples: int, workdir: Path) -> dict:
    """Prune all levels with one prune() call in a subprocess; returns the child's record."""
    spec = {"model": str(files.model), "method": method, "levels": levels,
            "calib": str(calib_file), "calib_samples": calib_samples,
            "output": str(workdir / f"{files.name}.{method.replace('+', '_')}.onnx")}
    spec_file = workdir / "trail_spec.json"
    spec_file.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_file)],
                          capture_output=True, text=True)
    result_file = spec_file.with_suffix(".result.json")
    if done.returncode != 0 or not result_file.exists():
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"child process failed (exit code {done.returncode}): {tail}"}
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return result


def _child(spec_file: str) -> int:
    import resource

    import psutil

    from onnxprune.budget import keep_freed_memory
    from onnxprune.prune import prune

    keep_freed_memory()  # as the command line does
    spec = json.loads(Path(spec_file).read_text())
    method, extra = split_method(spec["method"])
    record = {"imported_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
    started = time.perf_counter()
    try:
        results = prune(spec["model"], spec["levels"], method=method, output=spec["output"],
                        calib=spec["calib"], calib_samples=spec["calib_samples"], verify=False,
                        force=True, seed=0, **extra)
        record["levels"] = [_compact(r.report) for r in results]
        record["error"] = None
    except Exception as exc:  # the parent records the failure in the table
        record["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    record["trail_wall_s"] = round(time.perf_counter() - started, 3)
    # ru_maxrss is in KiB on Linux: this process's high-water mark, imports included
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(spec_file).with_suffix(".result.json").write_text(json.dumps(record))
    return 0


def _compact(report) -> dict:
    return {"target_sparsity": report.target_sparsity, "achieved_sparsity": report.sparsity,
            "zeros": report.zeros, "params": report.params, "output_bytes": report.output_bytes,
            "sparse_output_bytes": report.sparse_output_bytes, "timings": report.timings,
            "calib_samples": (report.calibration or {}).get("samples"), "notes": report.notes,
            "output_files": report.output_files,
            "layers": [{"name": r.name, "op": r.op, "params": r.params, "zeros": r.zeros_after}
                       for r in report.layers]}


# --------------------------------------------------------------------------- measurement

def measure(model: str, levels: list[float], methods: list[str], baselines: list[str],
            calib_samples: int, workdir: Path, keep: bool, log, skip=(),
            only_at: dict | None = None) -> list[dict]:
    from onnxprune.evaluate import evaluate
    from onnxsim_baselines import run_baseline

    files = model_files(model)
    calib = calib_subset(files, calib_samples)
    n_calib = len(next(iter(calib.values())))
    calib_file = workdir / f"{model}.calib{n_calib}.npz"
    np.savez(calib_file, **calib)

    def metrics(path: Path) -> dict:
        m = evaluate(path, files.test, reference=files.model, progress=False)
        return {k: m[k] for k in ("accuracy", "top1_agreement", "mean_cosine",
                                  "retrieval_agreement", "max_abs_diff", "samples") if k in m}

    base = {"model": model, "labelled": files.labelled}
    rows = [dict(base, tool="dense", method="dense", target_sparsity=0.0, achieved_sparsity=0.0,
                 ok=True, error=None, notes=[], metrics=metrics(files.model),
                 output_bytes=files.model.stat().st_size)]
    log(f"{model}: dense {_headline(rows[0])}")
    only_at = only_at or {}

    def levels_of(method: str) -> list[float]:
        return [s for s in levels if s in only_at.get(f"{model}:{method}", levels)]

    for method in [m for m in methods if f"{model}:{m}" not in skip and levels_of(m)]:
        trail_levels = levels_of(method)
        trail = run_trail(files, method, trail_levels, calib_file, n_calib, workdir)
        per_level = trail.get("trail_wall_s", 0) / len(trail_levels)
        common = dict(base, tool="onnxprune", method=method, trail_levels=len(trail_levels),
                      trail_wall_s=trail.get("trail_wall_s"), wall_s=round(per_level, 3),
                      wall_basis=f"one call for {len(trail_levels)} levels, divided by {len(trail_levels)}",
                      peak_rss_mb=trail.get("peak_rss_mb"),
                      imported_rss_mb=trail.get("imported_rss_mb"))
        if trail.get("error"):
            rows += [dict(common, target_sparsity=s, ok=False, error=trail["error"], notes=[],
                          metrics={}) for s in trail_levels]
            log(f"{model}: {method} FAILED: {trail['error']}")
            continue
        for level in trail["levels"]:
            out = Path(level["output_files"][0])
            row = dict(common, ok=True, error=None, metrics=metrics(out),
                       **{k: v for k, v in level.items() if k != "output_files"})
            emptied = [layer["name"] for layer in level["layers"] if layer["zeros"] == layer["params"]]
            if emptied:  # the same words onnxsim_baselines uses for its rows
                row["notes"] = row["notes"] + [f"{len(emptied)} layers pruned to all zeros: "
                                               + ", ".join(emptied)]
            rows.append(row)
            _remove(level["output_files"], keep)
        log(f"{model}: {method}: {len(trail_levels)} levels in {trail['trail_wall_s']:.1f} s, "
            f"peak {trail['peak_rss_mb']:.0f} MB; " +
            ", ".join(f"{r['target_sparsity']:g}: {_headline(r)}" for r in rows[-len(trail_levels):]))
    for name in [b for b in baselines if f"{model}:{b}" not in skip]:
        for s in levels_of(name):
            out = workdir / f"{model}.{name}.s{s:g}.onnx"
            r = run_baseline(name, files.model, s, calib, out)
            row = dict(base, tool="onnxsim", method=name, target_sparsity=s,
                       achieved_sparsity=r.get("achieved_sparsity"), ok=r["ok"], error=r["error"],
                       notes=r["notes"], wall_s=r["wall_s"], wall_basis="one call per level",
                       process_s=r["process_s"], peak_rss_mb=r["peak_rss_mb"],
                       imported_rss_mb=r["imported_rss_mb"], calib_samples=n_calib
                       if name in ("onnxsim-wanda", "onnxsim-sparsegpt") else None,
                       onnxsim_layers=r.get("layers", {}), metrics={})
            if r["ok"]:
                row["output_bytes"] = out.stat().st_size
                try:
                    row["metrics"] = metrics(out)
                except Exception as exc:  # a model onnxsim wrote that onnxruntime cannot run
                    row.update(ok=False, error=f"pruned model does not run: {exc}")
            _remove([out], keep)
            rows.append(row)
            log(f"{model}: {name} {s:g}: " + (_headline(row) if row["ok"] else f"FAILED: {row['error']}"))
    return rows


def _headline(row: dict) -> str:
    m = row["metrics"]
    if "accuracy" in m:
        return f"accuracy {m['accuracy']:.4f}"
    return f"cosine {m.get('mean_cosine', float('nan')):.4f}, retrieval {m.get('retrieval_agreement', float('nan')):.3f}"


def _remove(paths, keep: bool) -> None:
    if keep:
        return
    for p in paths:
        for f in (Path(p), Path(str(p) + ".data")):
            f.unlink(missing_ok=True)


# -------------------------------------------------------- finding 3: one layer at a time

def layer_study(model: str, sparsity: float, workdir: Path, log) -> dict:
    """Prune only layer i (per-layer hard thresholding) for each i; accuracy per i."""
    import onnx

    from onnxprune import graph
    from onnxprune.evaluate import evaluate
    from onnxprune.prune import prune

    files = model_files(model)
    proto = onnx.load(files.model)
    layers, _ = graph.find_layers(proto)
    names = [layer.name for layer in layers]
    after = weight_layers_after(proto, names)
    dense = evaluate(files.model, files.test, progress=False)["accuracy"]
    rows = []
    for i, layer in enumerate(layers):
        others = [re.escape(n) for n in names if n != layer.name]
        exclude = "^(" + "|".join(others) + ")$" if others else None
        out = workdir / f"{model}.only{i}.onnx"
        result = prune(files.model, sparsity, method="layer", exclude=exclude, output=out,
                       verify=False, force=True)
        pruned = [r.name for r in result.report.layers]
        assert pruned == [layer.name], pruned  # the exclude regex must leave exactly this layer
        acc = evaluate(out, files.test, progress=False)["accuracy"]
        out.unlink()
        rows.append({"index": i, "name": layer.name, "op": layer.op, "params": layer.size,
                     "layers_after": after[layer.name], "accuracy": acc, "drop": dense - acc})
    depth = np.array([r["layers_after"] for r in rows], dtype=float)
    drop = np.array([r["drop"] for r in rows], dtype=float)
    rho = spearman(depth, drop)
    p = permutation_p(depth, drop) if np.isfinite(rho) else float("nan")
    size = np.array([r["params"] for r in rows], dtype=float)
    log(f"{model}: one layer at {sparsity:g}: Spearman(layers after, drop) = {rho:.3f}, p = {p:.3f}")
    return {"model": model, "sparsity": sparsity, "dense_accuracy": dense, "layers": rows,
            "spearman": rho, "p_value": p, "spearman_size": spearman(size, drop),
            "spearman_depth_size": spearman(depth, size)}


def weight_layers_after(model, names: list[str]) -> dict[str, int]:
    """For each weight: the most prunable layers on any path from its node to a graph output."""
    nodes = list(model.graph.node)  # ONNX stores nodes in topological order
    consumers: dict[str, list[int]] = {}
    for j, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(j)
    weighted = {j for j, node in enumerate(nodes) if any(n in names for n in node.input)}
    depth = [0] * len(nodes)  # weight layers strictly after node j, longest path
    for j in reversed(range(len(nodes))):
        nxt = [c for out in nodes[j].output for c in consumers.get(out, [])]
        depth[j] = max((depth[c] + (c in weighted) for c in nxt), default=0)
    return {name: max(depth[j] for j in consumers[name]) for name in names}


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    if len(x) < 3 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def permutation_p(x: np.ndarray, y: np.ndarray, n: int = 20000, seed: int = 0) -> float:
    """One-sided p-value of a Spearman correlation this large, by shuffling y (seeded)."""
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    observed = spearman(x, y)
    rng = np.random.default_rng(seed)
    shuffled = ry[np.argsort(rng.random((n, len(ry))), axis=1)]  # each row a permutation of ry
    a = (rx - rx.mean()) / rx.std()
    b = (shuffled - ry.mean()) / ry.std()
    hits = int(np.sum((b @ a) / len(a) >= observed - 1e-12))
    return (hits + 1) / (n + 1)


# ----------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--sparsities", help="comma-separated (default: 0.5,0.7,0.8,0.9,0.95)")
    p.add_argument("--methods", help="onnxprune methods, comma-separated (default: all, read "
                   f"from onnxprune.options.METHODS, plus {REFIT_VARIANT})")
    p.add_argument("--baselines", help="onnxsim baselines, comma-separated, or 'none' (default: all)")
    p.add_argument("--calib-samples", type=int, help="first N samples of each calib split (default 512)")
    p.add_argument("--skip", help="MODEL:METHOD pairs not to run, comma-separated, or 'none' "
                   f"(default: {','.join(DEFAULT_SKIP)})")
    p.add_argument("--only-at", help="MODEL:METHOD@S1/S2 pairs to run at these levels only, "
                   f"comma-separated, or 'none' (default: {','.join(DEFAULT_ONLY_AT)})")
    p.add_argument("--layer-study", help="MODEL:SPARSITY, or 'none' (default animal_resnet:0.95)")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rewrite the tables and plot (and README) from OUT/benchmark.json")
    p.add_argument("--keep-models", action="store_true", help="keep the pruned models in OUT/models")
    p.add_argument("--merge", action="store_true",
                   help="replace only the (model, method) rows measured now in OUT/benchmark.json, "
                        "keep the others; the update is recorded in the report")
    p.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in QUICK.items()))
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _list(text: str | None, default, cast=str) -> list:
    if text is None:
        return list(default)
    return [] if text == "none" else [cast(x.strip()) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return _child(args.child)
    from onnxsim_baselines import BASELINES

    import benchmark_report

    if args.render_only:
        result = json.loads((args.out / "benchmark.json").read_text())
        benchmark_report.write_all(result, args.out, update_readme=ROOT / "README.md"
                                   if args.update_readme else None)
        return 0

    q = QUICK if args.quick else {}
    models = _list(args.models, q.get("models", DEFAULT_MODELS))
    levels = sorted(_list(args.sparsities, q.get("sparsities", DEFAULT_SPARSITIES), float))
    available = onnxprune_methods()
    methods = _list(args.methods, [m for m in q.get("methods", available) if m in available])
    baselines = _list(args.baselines, q.get("baselines", BASELINES))
    calib_samples = args.calib_samples or q.get("calib_samples", 512)
    skip = _list(args.skip, q.get("skip", DEFAULT_SKIP))
    only_at = {}
    for entry in _list(args.only_at, q.get("only_at", DEFAULT_ONLY_AT)):
        pair, _, at = entry.partition("@")
        only_at[pair] = [float(x) for x in at.split("/") if x]
    study = q.get("layer_study", LAYER_STUDY)
    if args.layer_study:
        study = None if args.layer_study == "none" else (
            args.layer_study.split(":")[0], float(args.layer_study.split(":")[1]))
    for m in methods:
        if m not in available:
            raise SystemExit(f"unknown method '{m}' (this onnxprune has: {', '.join(available)})")
    for b in baselines:
        if b not in BASELINES:
            raise SystemExit(f"unknown baseline '{b}' (choose from {', '.join(BASELINES)})")
    for m in models:
        model_files(m)  # fail now, not after an hour, when a model is not built

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    rows, study_result = [], None
    with tempfile.TemporaryDirectory(prefix="onnxprune_bench_") as tmp:
        workdir = args.out / "models" if args.keep_models else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for model in models:
            rows += measure(model, levels, methods, baselines, calib_samples, workdir,
                            args.keep_models, log, skip, only_at)
        if study is not None:
            study_result = layer_study(study[0], study[1], Path(tmp), log)
    command = _command(args)
    result = {"command": command, "environment": _environment(),
              "settings": {"models": models, "sparsities": levels, "methods": methods,
                           "baselines": baselines, "calib_samples": calib_samples,
                           "skipped": [p for p in skip if p.split(":")[0] in models],
                           "skip_reason": SKIP_REASON if args.skip is None and skip else None,
                           "only_at": {p: v for p, v in only_at.items() if p.split(":")[0] in models},
                           "only_at_reason": ONLY_AT_REASON if args.only_at is None and only_at
                           else None,
                           "layer_study": list(study) if study else None},
              "wall_s": round(time.perf_counter() - started, 1), "rows": rows,
              "layer_study": study_result}
    if args.merge:
        result = merged(json.loads((args.out / "benchmark.json").read_text()), result)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=1))
    benchmark_report.write_all(result, args.out, update_readme=ROOT / "README.md"
                               if args.update_readme else None)
    log(f"wrote {args.out / 'benchmark.md'}, benchmark.json, benchmark.png"
        + (", README.md" if args.update_readme else ""))
    return 0


def merged(old: dict, new: dict) -> dict:
    """`old` with the (model, method) rows that `new` measured replaced (its other rows, models
    and settings kept), and the update recorded under "updates" (replacing earlier updates
    whose rows it all measured again)."""
    measured = {(r["model"], r["method"]) for r in new["rows"] if r["method"] != "dense"}
    rows = [r for r in old["rows"] if (r["model"], r["method"]) not in measured]
    for r in new["rows"]:
        if r["method"] != "dense" or not any(o["model"] == r["model"] and o["method"] == "dense"
                                             for o in rows):
            rows.append(r)
    # a replaced row goes where the old one was: the tables keep their order of methods
    place = {}
    for i, r in enumerate(old["rows"]):
        place.setdefault((r["model"], r["method"]), i)
        place[(r["model"], None)] = i + 0.5  # rows new to a model go after its last one
    rows.sort(key=lambda r: place.get((r["model"], r["method"]), place.get((r["model"], None), 1e9)))
    result = dict(old, rows=rows)
    only_at = {p: v for p, v in old["settings"].get("only_at", {}).items()
               if tuple(p.split(":", 1)) not in measured}
    only_at.update({p: v for p, v in new["settings"].get("only_at", {}).items()
                    if tuple(p.split(":", 1)) in measured})
    result["settings"] = dict(old["settings"], only_at=only_at)
    # an earlier update whose rows were all measured again says nothing about the tables now
    earlier = [u for u in old.get("updates", [])
               if not {tuple(r.split(":", 1)) for r in u["rows"]} <= measured]
    result["updates"] = earlier + [{
        "command": new["command"], "date": new["environment"]["date"], "wall_s": new["wall_s"],
        "rows": sorted(f"{m}:{meth}" for m, meth in measured)}]
    return result


def _command(args: argparse.Namespace) -> str:
    """The command line that regenerates this run (output folder relative to the repo)."""
    parts = ["python tools/benchmark.py"]
    for flag in ("models", "sparsities", "methods", "baselines", "calib_samples", "skip",
                 "only_at", "layer_study"):
        value = getattr(args, flag)
        if value is not None:
            parts.append(f"--{flag.replace('_', '-')} {value}")
    if args.quick:
        parts.append("--quick")
    out = args.out.resolve()
    parts.append(f"--out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if args.update_readme:
        parts.append("--update-readme")
    if args.merge:
        parts.append("--merge")
    return " ".join(parts)


def _environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": platform.python_version(), "cpu_cores": os.cpu_count(),
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    for pkg in ("onnxprune", "onnx", "onnxruntime", "onnxsim", "numpy"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    return env


if __name__ == "__main__":
    sys.exit(main())
