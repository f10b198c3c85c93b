"""Run onnxsim's unstructured pruning (`onnxsim.pruning`) as baselines to compare onnxprune with.

    python tools/onnxsim_baselines.py NAME MODEL SPARSITY OUT.onnx [--calib DATA]

(DATA: anything onnxprune.data.load_samples reads; prints the result as JSON.)

Each baseline runs in a child process: a native crash inside onnxsim then cannot take the caller
down, and the child's own peak RSS is exactly the memory the pruning needed. After the run the
pruned weights are compared with the original ones to report what onnxsim does silently: layers it
left untouched, Wanda layers whose mask is plain magnitude (its fallback when no usable calibration
activation was seen), fully zeroed layers, and the achieved sparsity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASELINES = ("onnxsim-layer", "onnxsim-global", "onnxsim-wanda", "onnxsim-sparsegpt")
CALIBRATION_BATCH = 32  # samples per batch handed to onnxsim (it takes a list of batch dicts)
_POLL_S = 0.05


def run_baseline(
    name: str,
    model_path: str | os.PathLike,
    sparsity: float,
    calib: dict[str, np.ndarray] | None,
    out_path: str | os.PathLike,
    *,
    timeout_s: float = 3600.0,
) -> dict:
    """Prune ``model_path`` with one onnxsim baseline into ``out_path``; never raises.

    Returns ``{name, ok, error, wall_s, process_s, peak_rss_mb, idle_rss_mb, imported_rss_mb, notes,
    achieved_sparsity, layers, model_mb, out_mb}``: ``wall_s`` is load + prune + save inside the
    child, ``process_s`` the whole child including importing onnxsim (about 5 s); ``peak_rss_mb``
    is the child's high-water RSS (``idle_rss_mb``/``imported_rss_mb``: its RSS before/after
    importing onnx and onnxsim, which alone takes about 280 MB);
    ``layers`` maps each prunable layer ('op:node name') to its sparsity after pruning.
    """
    result = {"name": name, "ok": False, "error": None, "wall_s": None, "process_s": None,
              "peak_rss_mb": None, "idle_rss_mb": None, "imported_rss_mb": None, "notes": [],
              "achieved_sparsity": None, "layers": {}}
    if name not in BASELINES:
        result["error"] = f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}"
        return result
    if Path(out_path).resolve() == Path(model_path).resolve():
        result["error"] = "the output path must differ from the model path"
        return result
    Path(out_path).unlink(missing_ok=True)  # so a stale file is never taken for this run's output
    with tempfile.TemporaryDirectory(prefix="onnxsim_baseline_") as tmp:
        calib_file = Path(tmp) / "calib.npz"
        report_file = Path(tmp) / "report.json"
        if name in ("onnxsim-wanda", "onnxsim-sparsegpt"):
            if not calib or not any(len(v) for k, v in calib.items() if k != "labels"):
                # onnxsim would not complain: no batches means SparseGPT returns the model
                # unchanged and Wanda silently prunes by plain magnitude.
                result["error"] = f"{name} needs calibration data"
                return result
            np.savez(calib_file, **{k: v for k, v in calib.items() if k != "labels"})
        child = _run_child(name, model_path, sparsity, calib_file, out_path, report_file,
                           timeout_s, result)
        result["process_s"] = child["process_s"]
        if report_file.exists():
            result.update(json.loads(report_file.read_text()))
        if result["error"] is None and child["returncode"] != 0:
            result["error"] = (f"child process died (exit code {child['returncode']})"
                               + (f": {child['stderr_tail']}" if child["stderr_tail"] else ""))
        if result["peak_rss_mb"] is None:
            result["peak_rss_mb"] = child["sampled_peak_mb"]
        if child["stderr_tail"] and result["error"] is None:
            result["notes"].append(f"onnxsim printed to stderr: {child['stderr_tail']}")
    if result["error"] is None and Path(out_path).exists():
        try:
            _inspect(name, Path(model_path), Path(out_path), sparsity, result)
            result["ok"] = True
        except Exception as exc:  # inspection must not crash the caller either
            result["error"] = f"could not inspect the pruned model: {type(exc).__name__}: {exc}"
    elif result["error"] is None:
        result["error"] = "onnxsim produced no model"
    return result


def _run_child(name, model_path, sparsity, calib_file, out_path, report_file, timeout_s, result):
    """Run this file as a child process, sampling its RSS as a fallback if it dies early."""
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), name, str(model_path), str(sparsity),
           str(out_path), "--calib", str(calib_file), "--child-report", str(report_file)]
    peak = 0
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        handle = psutil.Process(proc.pid)
        started = time.monotonic()
        while proc.poll() is None:
            try:
                peak = max(peak, handle.memory_info().rss)
            except psutil.Error:
                pass
            if time.monotonic() - started > timeout_s:
                proc.kill()
                proc.wait()
                result["error"] = f"timed out after {timeout_s:.0f} s"
                break
            time.sleep(_POLL_S)
        err.seek(0)
        lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
    return {"returncode": proc.returncode, "sampled_peak_mb": round(peak / 2**20, 1),
            "process_s": round(time.monotonic() - started, 3),
            "stderr_tail": " | ".join(lines[-5:])}


# ----------------------------------------------------------------------------- child process

def _child_main(name, model_path, sparsity, out_path, calib_file, report_file) -> int:
    import resource
    import warnings

    report: dict = {"notes": []}
    report["idle_rss_mb"] = _rss_mb()
    try:
        import onnx
        from onnxsim import pruning

        report["imported_rss_mb"] = _rss_mb()
        started = time.perf_counter()
        # Loaded here rather than passing the path: given a path, onnxsim loads it with
        # load_external_data=False and would never see weights stored outside the .onnx file.
        model = onnx.load(model_path)
        has_calib = calib_file and Path(calib_file).exists()
        batches = _calibration_batches(calib_file) if has_calib else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruned = _prune(pruning, name, model, sparsity, batches)
        onnx.save_model(pruned, str(out_path), **_save_options(pruned))
        report["wall_s"] = round(time.perf_counter() - started, 3)
        report["notes"] += [f"warning: {w.message}" for w in caught]
        report["error"] = None
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        report["error"] = f"{type(exc).__name__}: {first_line}"
    # ru_maxrss is in KiB on Linux: the true high-water mark of this process.
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(report_file).write_text(json.dumps(report))
    return 0


def _prune(pruning, name, model, sparsity, batches):
    if name == "onnxsim-layer":
        return pruning.apply_magnitude_pruning(model, sparsity=sparsity)
    if name == "onnxsim-global":
        return pruning.apply_magnitude_pruning(model, sparsity=sparsity, global_sparsity=True)
    if name == "onnxsim-wanda":
        return pruning.apply_wanda_pruning(model, calibration_data=batches, sparsity=sparsity)
    return pruning.apply_sparsegpt_pruning(model, calibration_data=batches, sparsity=sparsity)


def _calibration_batches(calib_file) -> list[dict[str, np.ndarray]]:
    with np.load(calib_file) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + CALIBRATION_BATCH] for k, v in arrays.items()}
            for i in range(0, n, CALIBRATION_BATCH)]


def _save_options(model) -> dict:
    # A protobuf cannot exceed 2 GiB: large models go out with external data.
    if model.ByteSize() < 2**31 - 2**26:
        return {}
    return {"save_as_external_data": True, "all_tensors_to_one_file": True}


def _rss_mb() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


# ------------------------------------------------------------------ inspecting the result

def _inspect(name: str, original: Path, pruned: Path, sparsity: float, result: dict) -> None:
    """Fill achieved sparsity, per-layer sparsity and notes on silent behaviour."""
    import onnx

    dense_model, pruned_model = onnx.load(str(original)), onnx.load(str(pruned))
    before, after = _prunable_weights(dense_model), _prunable_weights(pruned_model)
    ranks = _activation_ranks(dense_model)
    notes = result["notes"]
    total = zeros = 0
    untouched, emptied, off_target, fell_back, magnitude_like = [], [], [], [], []
    for key, (x_name, w0) in before.items():
        if key not in after:
            notes.append(f"{key}: layer missing from the pruned model")
            continue
        w1 = after[key][1]
        total += w1.size
        zeros += int(np.count_nonzero(w1 == 0))
        layer_sparsity = float(np.mean(w1 == 0))
        result["layers"][key] = round(layer_sparsity, 4)
        if np.array_equal(w0, w1):
            untouched.append(key)
            continue
        if not np.any(w1):
            emptied.append(key)
        if name != "onnxsim-global" and abs(layer_sparsity - sparsity) > 0.05:
            off_target.append(f"{key}={layer_sparsity:.3f}")
        if name == "onnxsim-wanda" and np.array_equal(w1 == 0, _row_magnitude_mask(w0, sparsity)):
            rank = ranks.get(x_name)
            if key.startswith("MatMul") and rank is not None and rank != 2:
                fell_back.append(f"{key} (input rank {rank})")
            else:
                magnitude_like.append(key)
    result["achieved_sparsity"] = round(zeros / total, 4) if total else 0.0
    if untouched:
        notes.append(f"{len(untouched)} of {len(before)} prunable layers left untouched: "
                     + ", ".join(untouched))
    if emptied:
        notes.append(f"{len(emptied)} layers pruned to all zeros: " + ", ".join(emptied))
    if fell_back:
        notes.append(f"Wanda silently fell back to plain per-row magnitude on {len(fell_back)} of "
                     f"{len(before)} layers (onnxsim only calibrates MatMul inputs of rank 2): "
                     + ", ".join(fell_back))
    if magnitude_like:
        notes.append(f"{len(magnitude_like)} layers got exactly the plain per-row magnitude mask "
                     "(a fallback, or activation norms too uniform to change it): "
                     + ", ".join(magnitude_like))
    if off_target:
        notes.append("layer sparsity more than 0.05 off the target: " + ", ".join(off_target))
    if total and abs(result["achieved_sparsity"] - sparsity) > 0.01:
        notes.append(f"achieved sparsity {result['achieved_sparsity']:.4f} over the prunable "
                     f"weights differs from the target {sparsity}")
    dead = _dead_initializer_bytes(pruned_model)
    if dead:
        notes.append(f"pruned model keeps {dead / 2**20:.2f} MiB of initializers no node uses "
                     "(onnxsim writes pruned weights as new initializers, keeping the dense ones)")
    result["model_mb"] = round(original.stat().st_size / 2**20, 3)
    result["out_mb"] = round(pruned.stat().st_size / 2**20, 3)


def _prunable_weights(model) -> dict[str, tuple[str, np.ndarray]]:
    """The weights onnxsim can prune, keyed 'op:node', as (input name, (out_channels, fan_in))."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    weights = {}
    for index, node in enumerate(model.graph.node):
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        key = f"{node.op_type}:{node.name or '#' + str(index)}"
        w = numpy_helper.to_array(inits[node.input[1]])
        if node.op_type in ("MatMul", "Gemm") and w.ndim == 2:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            weights[key] = (node.input[0], w if trans_b else w.T)
        elif node.op_type == "Conv" and w.ndim == 4:
            weights[key] = (node.input[0], w.reshape(w.shape[0], -1))
    return weights


def _activation_ranks(model) -> dict[str, int]:
    """Rank of every tensor whose shape onnx shape inference can tell."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    graph = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim)
            for v in list(graph.input) + list(graph.value_info) + list(graph.output)
            if v.type.tensor_type.HasField("shape")}


def _dead_initializer_bytes(model) -> int:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer
               if t.name not in used)


def _row_magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero pattern of per-output-row magnitude pruning (onnxsim keeps max(1, round(k*(1-s))))."""
    keep = max(1, int(round(w.shape[1] * (1 - sparsity))))
    order = np.argsort(-np.abs(w), axis=1, kind="stable")
    mask = np.ones_like(w, dtype=bool)
    np.put_along_axis(mask, order[:, :keep], False, axis=1)
    return mask


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Prune a model with one onnxsim baseline.")
    parser.add_argument("name", choices=BASELINES)
    parser.add_argument("model")
    parser.add_argument("sparsity", type=float)
    parser.add_argument("out")
    parser.add_argument("--calib", help="calibration data (Wanda, SparseGPT)")
    parser.add_argument("--child-report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_report:
        return _child_main(args.name, args.model, args.sparsity, args.out, args.calib,
                           args.child_report)
    calib = None
    if args.calib:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from onnxprune.data import load_samples

        calib = {k: np.asarray(v) for k, v in load_samples(args.calib).items()}
    print(json.dumps(run_baseline(args.name, args.model, args.sparsity, calib, args.out),
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
