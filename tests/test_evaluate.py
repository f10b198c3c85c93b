"""evaluate(): accuracy and fidelity metrics on tiny Gemm models whose numbers are known by hand."""

import json
import os
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import OnnxPruneError
from onnxprune.evaluate import evaluate, format_metrics

# Four 2-D samples; a Gemm with weight W maps x to x @ W.T.
X = np.array([[1, 0], [0, 1], [2, 1], [3, 1]], np.float32)
IDENTITY = np.eye(2, dtype=np.float32)
FLIP = np.diag([1.0, -1.0]).astype(np.float32)  # mirror the second coordinate


def save_gemm(path, weight, batch="N", unsqueeze_output=False, external=False, ir_version=10):
    """Save y = x @ weight.T (optionally reshaped to (N, d, 1)) as an IR 10 / opset 17 model."""
    d_out, d_in = weight.shape
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y" if not unsqueeze_output else "g"],
                              transB=1)]
    initializers = [numpy_helper.from_array(weight, "W")]
    out_shape = [batch, d_out]
    if unsqueeze_output:
        nodes.append(helper.make_node("Unsqueeze", ["g", "axes"], ["y"]))
        initializers.append(numpy_helper.from_array(np.array([2], np.int64), "axes"))
        out_shape = [batch, d_out, 1]
    graph = helper.make_graph(
        nodes, "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=external,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return str(path)


def test_accuracy_and_fidelity_to_a_mirrored_reference(tmp_path):
    model = save_gemm(tmp_path / "identity.onnx", IDENTITY)
    reference = save_gemm(tmp_path / "flip.onnx", FLIP)
    data = {"x": X, "labels": np.array([0, 1, 1, 0])}

    result = evaluate(model, data, reference=reference, batch_size=3, progress=False)

    # Model argmax 0,1,0,0 vs labels 0,1,1,0; reference outputs (x1, -x2) always pick class 0.
    assert result["accuracy"] == 0.75
    assert result["reference_accuracy"] == 0.5
    # cos(x, (x1, -x2)) = (x1^2 - x2^2) / |x|^2 = 1, -1, 3/5, 8/10.
    assert result["mean_cosine"] == pytest.approx((1 - 1 + 0.6 + 0.8) / 4, abs=1e-7)
    assert result["top1_agreement"] == 0.75  # only sample (0, 1) changes its argmax
    assert result["max_abs_diff"] == 2.0  # |x2 - (-x2)| with x2 = 1
    assert "retrieval_agreement" not in result  # labelled data: a classifier, not embeddings
    assert result["samples"] == 4 and result["provider"] == "CPU"
    json.dumps(result)


def test_retrieval_agreement_counts_changed_nearest_neighbours(tmp_path):
    model = save_gemm(tmp_path / "identity.onnx", IDENTITY)
    reference = save_gemm(tmp_path / "squash.onnx", np.diag([1.0, 0.25]).astype(np.float32))
    x = np.array([[4, 0], [3, 4], [0, 4], [1, 5]], np.float32)

    result = evaluate(model, {"x": x}, reference=reference, batch_size=2, progress=False)

    # Angles under the model: 0, 53.1, 90, 78.7 deg -> nearest: s2, s4, s4, s3.
    # Under the reference (x1, x2/4): 0, 18.4, 90, 51.3 deg -> nearest: s2, s1, s4, s2.
    assert result["retrieval_agreement"] == 0.5
    # Reference argmax: 0, 0, 1, 1 against the model's 0, 1, 1, 1.
    assert result["top1_agreement"] == 0.75
    cos_s2 = (9 + 4) / (5 * np.sqrt(10))  # (3,4) vs (3,1)
    cos_s4 = (1 + 6.25) / np.sqrt(26 * 2.5625)  # (1,5) vs (1,1.25)
    assert result["mean_cosine"] == pytest.approx((2 + cos_s2 + cos_s4) / 4, abs=1e-7)
    assert result["max_abs_diff"] == 3.75  # 0.75 * x2 with x2 = 5
    assert "accuracy" not in result


def test_identical_reference_gives_perfect_fidelity(tmp_path):
    model = save_gemm(tmp_path / "a.onnx", FLIP)
    reference = save_gemm(tmp_path / "b.onnx", FLIP)
    result = evaluate(model, {"x": X}, reference=reference, progress=False)
    assert result["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert result["top1_agreement"] == 1.0
    assert result["retrieval_agreement"] == 1.0
    assert result["max_abs_diff"] == 0.0


def test_fixed_batch_dimension_pads_the_last_batch(tmp_path):
    model = save_gemm(tmp_path / "fixed.onnx", IDENTITY, batch=3)
    result = evaluate(model, {"x": X, "labels": np.array([0, 1, 1, 0])}, batch_size=64,
                      progress=False)
    assert result["accuracy"] == 0.75 and result["samples"] == 4


def test_model_with_external_data_and_data_from_a_file(tmp_path):
    model = save_gemm(tmp_path / "ext.onnx", IDENTITY, external=True)
    assert (tmp_path / "weights.bin").exists()
    np.savez(tmp_path / "data.npz", x=X.astype(np.float64), labels=np.array([1, 1, 0, 1]))
    result = evaluate(model, tmp_path / "data.npz", progress=False)  # argmax 0,1,0,0
    assert result["accuracy"] == 0.5


def test_no_labels_and_no_reference_is_an_error(tmp_path):
    model = save_gemm(tmp_path / "m.onnx", IDENTITY)
    with pytest.raises(OnnxPruneError, match="give a reference model"):
        evaluate(model, {"x": X}, progress=False)


def test_labels_with_a_non_classifier_output(tmp_path):
    model = save_gemm(tmp_path / "m.onnx", IDENTITY, unsqueeze_output=True)
    data = {"x": X, "labels": np.array([0, 1, 1, 0])}
    with pytest.raises(OnnxPruneError, match=r"\(samples, classes\) output"):
        evaluate(model, data, progress=False)
    reference = save_gemm(tmp_path / "r.onnx", FLIP, unsqueeze_output=True)
    result = evaluate(model, data, reference=reference, progress=False)
    assert "accuracy" not in result and "top1_agreement" not in result
    assert result["mean_cosine"] == pytest.approx(0.35, abs=1e-7)


def test_data_not_matching_the_model_is_an_error(tmp_path):
    model = save_gemm(tmp_path / "m.onnx", IDENTITY)
    with pytest.raises(OnnxPruneError, match="no array for model input.*'x'.*arrays found: inputs"):
        evaluate(model, {"inputs": X, "labels": np.zeros(4, np.int64)}, progress=False)
    with pytest.raises(OnnxPruneError, match="axis 1 must be 2"):
        evaluate(model, {"x": np.zeros((4, 3), np.float32), "labels": np.zeros(4, np.int64)},
                 progress=False)


def test_unreadable_model_is_an_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(OnnxPruneError, match="cannot load the model"):
        evaluate(tmp_path / "bad.onnx", {"x": X}, progress=False)


def test_format_metrics_lists_each_metric():
    text = format_metrics({"accuracy": 0.75, "mean_cosine": 0.35, "max_abs_diff": 2.0,
                           "samples": 4, "provider": "CPU", "wall_s": 0.01})
    lines = text.splitlines()
    assert lines[0].split() == ["accuracy", "0.7500"]
    assert lines[1].split() == ["mean", "cosine", "0.3500"]
    assert lines[2].split() == ["max", "abs", "diff", "2"]
    assert "samples" in lines[3] and lines[3].endswith("4")


def test_empty_data_is_an_error(tmp_path):
    model = save_gemm(tmp_path / "m.onnx", IDENTITY)
    with pytest.raises(OnnxPruneError, match="no samples"):
        evaluate(model, {"x": X[:0], "labels": np.zeros(0, np.int64)}, progress=False)


def test_a_model_proto_as_loaded_or_pruned_with_external_data(tmp_path):
    from onnxprune import prune

    data = {"x": X, "labels": np.array([1, 1, 0, 1])}
    path = save_gemm(tmp_path / "ext.onnx", IDENTITY, external=True)
    # inline: bytes underneath; external with absolute locations (a pruned result written to a
    # file keeps pointing at its data file): onnxruntime cannot take those as bytes
    inline = onnx.load(path)
    pruned = prune(path, 0.0, method="layer", output=tmp_path / "out.onnx").model
    assert pruned.graph.initializer[0].data_location == TensorProto.EXTERNAL
    for model in (inline, pruned):
        result = evaluate(model, data, reference=inline, progress=False)
        assert result["accuracy"] == 0.5 and result["mean_cosine"] == pytest.approx(1.0)


def _log_model(path):
    """y = z * log|z| with z = x @ W: a column of W pruned to zero makes that output NaN."""
    w = np.ones((8, 4), np.float32)
    w[:, 3] = 0.001
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Abs", ["z"], ["a"]),
         helper.make_node("Log", ["a"], ["l"]), helper.make_node("Mul", ["z", "l"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return str(path)


def test_nan_outputs_are_reported_not_hidden(tmp_path):
    from onnxprune import prune

    src = _log_model(tmp_path / "m.onnx")
    with pytest.raises(OnnxPruneError, match="output 'y' has 1 NaN or infinite values"):
        prune(src, 0.25, method="global", output=tmp_path / "p.onnx")  # one synthetic sample
    assert not (tmp_path / "p.onnx").exists()
    prune(src, 0.25, method="global", output=tmp_path / "p.onnx", verify=False)
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    metrics = evaluate(str(tmp_path / "p.onnx"), {"x": x}, reference=src, progress=False)
    assert metrics["nonfinite_samples"] == 20
    assert metrics["mean_cosine"] == 0.0 and np.isfinite(metrics["max_abs_diff"])
    assert "20 samples have NaN" in format_metrics(metrics)
    json.dumps(metrics, allow_nan=False)  # strict JSON
    clean = evaluate(src, {"x": x}, reference=src, progress=False)
    assert clean["nonfinite_samples"] == 0 and clean["mean_cosine"] == pytest.approx(1.0)


def test_strict_json_has_no_nan_literals():
    from onnxprune.cli import to_json

    assert json.loads(to_json({"a": float("inf"), "b": [float("nan"), 1.5], "c": {"d": 2},
                               "e": np.float32(1.5), "f": np.float32("nan"), "g": np.int64(3)})) == \
        {"a": None, "b": [None, 1.5], "c": {"d": 2}, "e": 1.5, "f": None, "g": 3}


def test_no_finite_output_has_no_largest_change():
    from onnxprune.evaluate import _Fidelity

    fidelity = _Fidelity(keep_embeddings=False, output="y")
    fidelity.add(np.full((2, 3), np.nan, np.float32), np.ones((2, 3), np.float32))
    metrics = fidelity.metrics()
    assert metrics["max_abs_diff"] is None and metrics["nonfinite_samples"] == 2
    assert "max abs diff" not in format_metrics(metrics)


@pytest.mark.parametrize("bad_one", ["model", "reference model"])
def test_a_missing_or_folder_path_fails_in_words_naming_which_model(tmp_path, bad_one):
    good = save_gemm(tmp_path / "m.onnx", IDENTITY)
    (tmp_path / "folder.onnx").mkdir()
    for bad, problem in ((tmp_path / "missing.onnx", "no such file"),
                         (tmp_path / "folder.onnx", "is a directory, not an ONNX file")):
        model, reference = (bad, good) if bad_one == "model" else (good, bad)
        with pytest.raises(OnnxPruneError) as error:
            evaluate(model, {"x": X}, reference=reference, progress=False)
        assert str(error.value) == f"{bad_one}: {bad}: {problem}"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    errors = []

    def call():
        try:
            evaluate(fifo, {"x": X}, progress=False)
        except Exception as e:  # noqa: BLE001 -- whatever it is, the assert below shows it
            errors.append(e)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # blocked opening the FIFO for reading: an end of file frees it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=10)
    assert [str(e) for e in errors] == [f"model: {fifo}: not a regular file"]


def test_a_reference_onnxruntime_cannot_load_is_named(tmp_path):
    model = save_gemm(tmp_path / "m.onnx", IDENTITY)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(OnnxPruneError, match=r"^reference model: .*cannot load"):
        evaluate(model, {"x": X}, reference=tmp_path / "bad.onnx", progress=False)


def test_one_sample_is_singular():
    text = format_metrics({"mean_cosine": 0.0, "nonfinite_samples": 1, "samples": 1,
                           "provider": "CPU"})
    assert "1 sample has NaN or infinite outputs" in text


def test_no_progress_bar_on_a_redirected_stderr(tmp_path, monkeypatch, capsys):
    import itertools

    import tqdm.std

    ticks = itertools.count(step=10.0)  # a slow clock: any delay or redraw interval has passed
    monkeypatch.setattr(tqdm.std, "time", lambda: next(ticks))
    model = save_gemm(tmp_path / "m.onnx", IDENTITY)
    evaluate(model, {"x": X, "labels": np.array([0, 1, 1, 0])}, batch_size=1, progress=True)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal


def test_a_too_new_ir_version_is_said_in_words(tmp_path):
    model = save_gemm(tmp_path / "ir14.onnx", IDENTITY, ir_version=14)
    with pytest.raises(OnnxPruneError) as error:
        evaluate(model, {"x": X, "labels": np.array([0, 1, 1, 0])}, progress=False)
    message = str(error.value)
    assert "unsupported model IR version 14" in message and "onnxruntime::" not in message
