"""Pruning models larger than RAM allows to load: time against copying the files, peak RSS.

    python tools/bench_scale.py            # 3 GB fp32 / fp16 / bf16 timed, then the memory curves
    python tools/bench_scale.py --sizes 0.5 --dtypes fp32 --curve "" --widths ""   # a quick look

Generates synthetic transformer-shaped models with external data (token embedding, then blocks
of attention and MLP MatMuls, d_model x 4 d_model the largest, random values) into a cache folder,
never committed, removed at the end (one model on disk at a time). Every measurement runs in
its own subprocess, so its peak RSS (ru_maxrss) is its own: `cp` of the model's files, the CLI as
a user runs it (`onnxprune MODEL -s 0.9 -m global-mt --max-memory BUDGET`), `cp` again; both
jobs are timed until their output is fsynced. Checks: the output passes onnx.checker by path,
each pruned tensor holds its input values or zeros with exactly the target number of zeros and
the other tensors are unchanged (read in chunks), and on a small model of the same family the
streamed output equals, bit for bit, what the in-memory path computes. Prints a markdown table
and plots peak RSS against model size and against the largest tensor (docs/scale_memory.png).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}

# Runs one command, then fsyncs the files it wrote (so both jobs are timed to the disk, not to
# the page cache); prints the wall time and the command's peak RSS (this process only waits).
WRAPPER = r"""
import json, os, resource, subprocess, sys, time
from pathlib import Path
persist, cmd = json.loads(sys.argv[1]), sys.argv[2:]
start = time.perf_counter()
done = subprocess.run(cmd, capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stdout + done.stderr)
for p in persist:
    for f in (sorted(Path(p).iterdir()) if Path(p).is_dir() else [Path(p)]):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
wall = time.perf_counter() - start
print(json.dumps({"wall": wall, "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""

# Checks a pruned output against its input, chunk by chunk: kept values unchanged, zero count.
VERIFY = r"""
import json, sys
import numpy as np, onnx
from onnxprune.modelio import load_model, tensor_to_array
src, out, names, sparsity = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
onnx.checker.check_model(out)
a = {t.name: t for t in load_model(src).model.graph.initializer}
b = {t.name: t for t in load_model(out).model.graph.initializer}
zeros = total = 0
for name in names:
    x, y = tensor_to_array(a[name]).reshape(-1), tensor_to_array(b[name]).reshape(-1)
    for start in range(0, x.size, 1 << 22):
        xs, ys = x[start:start + (1 << 22)], y[start:start + (1 << 22)]
        kept = ys != 0
        assert np.array_equal(xs[kept].view(np.uint8), ys[kept].view(np.uint8)), name
        zeros += int(np.count_nonzero(~kept))
    total += x.size
assert zeros == round(sparsity * total), (zeros, total)
others = [n for n in a if n not in names]
for name in others:  # tensors that are not pruned are copied unchanged
    assert np.array_equal(np.asarray(tensor_to_array(a[name])).reshape(-1).view(np.uint8),
                          np.asarray(tensor_to_array(b[name])).reshape(-1).view(np.uint8)), name
print(json.dumps({"zeros": zeros, "total": total, "checked_unpruned": len(others)}))
"""


def make_model(folder: Path, gigabytes: float, dtype: str, d_model: int = 2048, vocab: int = 32000,
               seed: int = 0) -> tuple[Path, dict]:
    """A transformer-shaped model with as many parameters as `gigabytes` GB of fp32 (3: about
    770 M; fp16 / bf16 files are half that size), its weights in `model.onnx.data`."""
    elem = DTYPES[dtype]
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    itemsize = np.dtype(np_dtype).itemsize
    d, ffn = d_model, 4 * d_model
    n_blocks = max(1, round((gigabytes * 1e9 / 4 - vocab * d) / (12 * d * d)))
    folder.mkdir(parents=True, exist_ok=True)
    path, data_path = folder / "model.onnx", folder / "model.onnx.data"
    rng = np.random.default_rng(seed)
    inits, nodes, pruned, largest = [], [], [], 0

    def weight(name, shape, scale=0.02, value=None):
        nonlocal largest
        t = TensorProto(name=name, data_type=elem, dims=list(shape))
        size = int(np.prod(shape))
        if size * itemsize < 1024:  # small tensors inline, as onnx.save does
            t.raw_data = (np.full(shape, value, np_dtype) if value is not None else
                          (rng.standard_normal(shape) * scale).astype(np_dtype)).tobytes()
        else:
            pad = -data.tell() % 64
            data.write(b"\0" * pad)
            offset = data.tell()
            rows = max(1, (16 << 20) // (int(np.prod(shape[1:])) * 4))
            for r in range(0, shape[0], rows):  # 16 MB of float32 at a time
                block = (shape[0] - r if r + rows > shape[0] else rows,) + tuple(shape[1:])
                values = (np.full(block, value, np.float32) if value is not None
                          else rng.standard_normal(block, dtype=np.float32) * scale)
                data.write(values.astype(np_dtype).tobytes())
            t.data_location = TensorProto.EXTERNAL
            for key, val in (("location", data_path.name), ("offset", offset),
                             ("length", size * itemsize)):
                t.external_data.add(key=key, value=str(val))
            largest = max(largest, size * itemsize)
        inits.append(t)
        return name

    with open(data_path, "wb") as data:
        x = "h0"
        nodes.append(helper.make_node("Gather", [weight("embed", (vocab, d)), "ids"], [x]))
        scale = weight("scale", (), value=1 / np.sqrt(d))
        for i in range(n_blocks):
            p = f"b{i}."
            w = {k: weight(p + k, (d, d)) for k in ("wq", "wk", "wv", "wo")}
            w1, w2 = weight(p + "w1", (d, ffn)), weight(p + "w2", (ffn, d))
            pruned += list(w.values()) + [w1, w2]
            ln = [weight(p + f"ln{j}.{k}", (d,), value=v) for j in (1, 2) for k, v in (("s", 1), ("b", 0))]
            b1, b2 = weight(p + "b1", (ffn,)), weight(p + "b2", (d,))
            mm = lambda a, b, out: helper.make_node("MatMul", [a, b], [p + out])  # noqa: E731
            nodes += [mm(x, w["wq"], "q"), mm(x, w["wk"], "k"), mm(x, w["wv"], "v"),
                      helper.make_node("Transpose", [p + "k"], [p + "kt"], perm=[0, 2, 1]),
                      mm(p + "q", p + "kt", "s"),
                      helper.make_node("Mul", [p + "s", scale], [p + "ss"]),
                      helper.make_node("Softmax", [p + "ss"], [p + "p"], axis=-1),
                      mm(p + "p", p + "v", "a"), mm(p + "a", w["wo"], "o"),
                      helper.make_node("Add", [x, p + "o"], [p + "r1"]),
                      helper.make_node("LayerNormalization", [p + "r1", ln[0], ln[1]], [p + "n1"], axis=-1),
                      mm(p + "n1", w1, "f1"), helper.make_node("Add", [p + "f1", b1], [p + "f1b"]),
                      helper.make_node("Relu", [p + "f1b"], [p + "f1r"]),
                      mm(p + "f1r", w2, "f2"), helper.make_node("Add", [p + "f2", b2], [p + "f2b"]),
                      helper.make_node("Add", [p + "n1", p + "f2b"], [p + "r2"]),
                      helper.make_node("LayerNormalization", [p + "r2", ln[2], ln[3]], [f"h{i + 1}"], axis=-1)]
            x = f"h{i + 1}"
        nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, "synthetic_transformer",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", elem, ["batch", "seq", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    params = sum(int(np.prod(t.dims)) for t in inits)
    info = {"dtype": dtype, "blocks": n_blocks, "d_model": d, "params": params,
            "bytes": data_path.stat().st_size + path.stat().st_size, "largest_pruned": 4 * d * d * itemsize,
            "largest": largest, "pruned_names": pruned}
    return path, info


def timed(cmd: list[str], persist=()) -> dict:
    done = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps([str(p) for p in persist]), *cmd],
                          capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: Path, info: dict, work: Path, sparsity: float, budget: str, verify: bool) -> dict:
    files = [model, model.with_name(model.name + ".data")]
    out = work / "pruned.onnx"
    os.sync()  # earlier runs' dirty pages must not slow this one down
    copies = []
    for attempt in range(2):
        target = work / f"copy{attempt}"
        target.mkdir()
        copies.append(timed(["cp", *map(str, files), str(target)], [target]))
        shutil.rmtree(target)
        os.sync()
        if attempt == 0:
            report = work / "report.json"
            run = timed([sys.executable, "-m", "onnxprune.cli", str(model), "-s", str(sparsity),
                         "-m", "global-mt", "-o", str(out), "--max-memory", budget, "-q",
                         "--report", str(report)] + ([] if verify else ["--no-verify"]),
                        [out, out.with_name(out.name + ".data")])
            os.sync()
    rep = json.loads(report.read_text())
    check = subprocess.run([sys.executable, "-c", VERIFY, str(model), str(out),
                            json.dumps(info["pruned_names"]), str(sparsity)],
                           capture_output=True, text=True, cwd=ROOT)
    if check.returncode:
        raise RuntimeError(f"output check failed:\n{check.stderr}")
    for p in work.glob("pruned.onnx*"):
        p.unlink()
    copy_wall = min(c["wall"] for c in copies)
    return {"copy_s": [c["wall"] for c in copies], "prune_s": run["wall"], "ratio": run["wall"] / copy_wall,
            "rss": run["rss"], "timings": rep["timings"], "notes": rep["notes"],
            "sparsity": rep["sparsity"], "check": json.loads(check.stdout)}


def reference_check(folder: Path, dtype: str, sparsity: float) -> bool:
    """On a small model of the same family: the CLI's streamed output equals the in-memory path."""
    from onnx import numpy_helper

    from onnxprune import prune

    model_path, _ = make_model(folder, 0.03, dtype, d_model=256, vocab=512, seed=1)
    out = folder / "out.onnx"
    subprocess.run([sys.executable, "-m", "onnxprune.cli", str(model_path), "-s", str(sparsity),
                    "-m", "global-mt", "-o", str(out), "--no-verify", "-q"], check=True, cwd=ROOT)
    in_memory = onnx.load(model_path)  # every weight loaded: the path of ordinary models
    ref = prune(in_memory, sparsity, method="global-mt", verify=False).model
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    same = all(np.array_equal(numpy_helper.to_array(t).reshape(-1).view(np.uint8), got[t.name].reshape(-1).view(np.uint8))
               for t in ref.graph.initializer)
    shutil.rmtree(folder)
    return same


def plot(by_size: list[dict], by_width: list[dict], budget: str, base_rss: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [(axes[0], by_size, "bytes", "model size (GB), fp32, d_model 2048"),
              (axes[1], by_width, "largest_pruned", "largest pruned tensor (GB), ~1 GB fp32 models")]
    for ax, runs, key, label in panels:
        if not runs:
            ax.set_visible(False)
            continue
        x = [r[key] / 1e9 for r in runs]
        ax.plot(x, [r["rss"] / 1e9 for r in runs], "o-", label="onnxprune peak RSS")
        ax.plot(x, [r["bytes"] / 1e9 for r in runs], ":", color="gray", label="model size (loading it all)")
        ax.plot(x, [r["largest_pruned"] / 1e9 for r in runs], "--", color="tab:green",
                label="largest pruned tensor")
        ax.axhline(base_rss / 1e9, color="tab:red", lw=0.8, label="python + onnx + onnxruntime imported")
        ax.set_xlabel(label)
        ax.set_ylabel("GB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"onnxprune -m global-mt -s 0.9 --max-memory {budget} --no-verify: peak RSS")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3", help="models timed for each dtype, in GB of fp32 "
                        "(the same parameter count at fp16 / bf16)")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16")
    parser.add_argument("--curve", default="0.5,1,2,3", help="GB of the fp32 models of the memory curve")
    parser.add_argument("--widths", default="1024,2048,4096",
                        help="d_model of the ~1 GB fp32 models of the second curve (largest tensor)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--max-memory", default="1G")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "onnxprune-bench-scale")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale_memory.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the "
                        "results JSON the last run wrote beside it")
    args = parser.parse_args()
    results = args.plot.with_suffix(".json")
    if args.replot:
        saved = json.loads(results.read_text())
        return plot_runs(saved["runs"], saved["max_memory"], saved["base_rss"], args.plot)
    floats = lambda text: [float(x) for x in text.split(",") if x]  # noqa: E731
    dtypes = [d for d in args.dtypes.split(",") if d]
    jobs = [(dtype, gb, 2048, True) for dtype in dtypes for gb in floats(args.sizes)]
    jobs += [("fp32", gb, 2048, False) for gb in floats(args.curve)]
    jobs += [("fp32", 1.0, int(d), False) for d in floats(args.widths) if int(d) != 2048]
    base_rss = timed([sys.executable, "-c", "import onnxprune.cli, onnxruntime"])["rss"]
    print(f"{os.cpu_count()} CPU cores; free disk {shutil.disk_usage(args.cache.parent).free / 1e9:.0f} GB; "
          f"budget --max-memory {args.max_memory}; RSS after imports {base_rss / 1e9:.2f} GB\n")
    runs, same = [], {}
    try:
        for dtype in dtypes:
            same[dtype] = reference_check(args.cache / f"ref-{dtype}", dtype, args.sparsity)
            print(f"{dtype}: streamed output equals the in-memory path on a small model: {same[dtype]}")
        for dtype, gb, width, verify in jobs:
            folder = args.cache / f"{dtype}-{gb:g}-{width}"
            model, info = make_model(folder, gb, dtype, d_model=width)
            result = measure(model, info, folder, args.sparsity, args.max_memory, verify)
            result.update({k: v for k, v in info.items() if k != "pruned_names"}, same=same[dtype],
                          gb=gb, verify=verify)
            runs.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "notes"}), flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(args.cache, ignore_errors=True)
    print("\n| model | params | file GB | largest pruned MB | cp s | onnxprune s | x cp | peak RSS GB "
          "| select s | prune s | write s | equal to in-memory ref. |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        t = r["timings"]
        label = f"{r['dtype']} d{r['d_model']} x{r['blocks']}" + ("" if r["verify"] else ", --no-verify")
        print(f"| {label} | {r['params'] / 1e6:.0f} M | {r['bytes'] / 1e9:.2f} | {r['largest_pruned'] / 1e6:.0f} "
              f"| {min(r['copy_s']):.1f} | {r['prune_s']:.1f} | {r['ratio']:.2f} | {r['rss'] / 1e9:.2f} "
              f"| {t.get('select', 0):.1f} | {t.get('prune', 0):.1f} | {t.get('write_verify', 0):.1f} | {r['same']} |")
    for r in runs:
        for note in r["notes"] if r["verify"] else []:
            print(f"note ({r['dtype']}): {note}")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"max_memory": args.max_memory, "base_rss": base_rss, "runs": runs},
                                  indent=1) + "\n")
    plot_runs(runs, args.max_memory, base_rss, args.plot)


def plot_runs(runs: list[dict], budget: str, base_rss: int, path: Path) -> None:
    curve = [r for r in runs if not r["verify"]]
    by_size = sorted((r for r in curve if r["d_model"] == 2048), key=lambda r: r["bytes"])
    by_width = sorted((r for r in curve if r["gb"] == 1.0), key=lambda r: r["largest_pruned"])
    if curve:
        plot(by_size, by_width, budget, base_rss, path)
        print(f"\nwrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
