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


def test_data_as_batches_or_a_reader_gives_the_same_metrics(tmp_path):
    model = save_gemm(tmp_path / "identity.onnx", IDENTITY)
    reference = save_gemm(tmp_path / "flip.onnx", FLIP)
    labels = np.array([0, 1, 1, 0])
    batches = [{"x": X[:3], "labels": labels[:3]}, {"x": X[3:], "labels": labels[3:]}]

    class Reader:
        items = iter(batches)

        def get_next(self):
            return next(self.items, None)

    want = evaluate(model, {"x": X, "labels": labels}, reference=reference, progress=False)
    for data in (batches, iter(batches), Reader()):
        got = evaluate(model, data, reference=reference, progress=False)
        assert {k: v for k, v in got.items() if k != "wall_s"} == {k: v for k, v in want.items() if k != "wall_s"}
    with pytest.raises(OnnxPruneError, match="data of type ndarray is not supported"):
        evaluate(model, X, progress=False)
    with pytest.raises(OnnxPruneError, match="model must be a path, bytes or an onnx.ModelProto, not NoneType"):
        evaluate(None, {"x": X}, progress=False)
    with pytest.raises(OnnxPruneError, match="reference model must be a path"):
        evaluate(model, {"x": X}, reference=3, progress=False)
    np.savez(tmp_path / "d.npz", x=X)  # the reference's input z is missing from a file: say whose
    other = tmp_path / "ref.onnx"
    renamed = onnx.load(reference)
    renamed.graph.input[0].name = "z"
    for n in renamed.graph.node:
        n.input[:] = ["z" if i == "x" else i for i in n.input]
    onnx.save(renamed, other)
    with pytest.raises(OnnxPruneError, match="^reference model: data has no array for model input\\(s\\) 'z'"):
        evaluate(model, str(tmp_path / "d.npz"), reference=str(other), progress=False)


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
    from onnxprune.metrics import Fidelity

    fidelity = Fidelity(keep_embeddings=False, output="y")
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


# A skl2onnx-style classifier ------------------------------------------------------------------

CLASSES = [3, 5, 7]  # class values, not column indices: labels are compared with these
XC = np.random.default_rng(7).standard_normal((10, 4)).astype(np.float32)
WC = np.random.default_rng(8).standard_normal((4, 3)).astype(np.float32)


def save_classifier(path, weight, classes=CLASSES, batch="n"):
    """Outputs: label (int64 class values, (n,)), scores (ZipMap: a sequence of {class: prob}),
    parts (a sequence of tensors) and cube (the probabilities as (n, 3, 1))."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["p"], axis=1),
             helper.make_node("ArgMax", ["p"], ["index"], axis=1, keepdims=0),
             helper.make_node("Gather", ["classes", "index"], ["label"]),
             helper.make_node("ZipMap", ["p"], ["scores"], domain="ai.onnx.ml",
                              classlabels_int64s=classes),
             helper.make_node("SequenceConstruct", ["x", "p"], ["parts"]),
             helper.make_node("Unsqueeze", ["p", "axes"], ["cube"])]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, [batch]),
               helper.make_value_info("scores", helper.make_sequence_type_proto(
                   helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(
                       TensorProto.FLOAT, [])))),
               helper.make_value_info("parts", helper.make_sequence_type_proto(
                   helper.make_tensor_type_proto(TensorProto.FLOAT, None))),
               helper.make_tensor_value_info("cube", TensorProto.FLOAT, [batch, 3, 1])]
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        outputs, [numpy_helper.from_array(weight, "w"),
                  numpy_helper.from_array(np.array(classes, np.int64), "classes"),
                  numpy_helper.from_array(np.array([2], np.int64), "axes")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    onnx.save(model, str(path))
    return str(path)


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_a_classifier_is_measured_on_its_labels_or_its_zipmap_scores(tmp_path):
    model = save_classifier(tmp_path / "m.onnx", WC)
    predicted = np.array(CLASSES)[np.argmax(XC @ WC, axis=1)]
    labels = predicted.copy()
    labels[:3] = np.where(predicted[:3] == 3, 5, 3)  # three wrong: accuracy 0.7
    data = {"x": XC, "labels": labels}

    for output in (None, "label", "scores"):  # the default is the first output, label
        assert evaluate(model, data, output=output, progress=False)["accuracy"] == 0.7
    fixed = save_classifier(tmp_path / "fixed.onnx", WC, batch=3)  # padded last batch of maps
    assert evaluate(fixed, data, output="scores", progress=False)["accuracy"] == 0.7

    ref_weight = WC + np.random.default_rng(9).standard_normal(WC.shape).astype(np.float32)
    reference = save_classifier(tmp_path / "ref.onnx", ref_weight)
    agreement = np.mean(np.argmax(XC @ WC, axis=1) == np.argmax(XC @ ref_weight, axis=1))
    assert 0 < agreement < 1
    on_labels = evaluate(model, data, reference=reference, batch_size=4, progress=False)
    assert on_labels["accuracy"] == 0.7 and on_labels["label_agreement"] == agreement
    assert "mean_cosine" not in on_labels and "max_abs_diff" not in on_labels  # of class numbers
    assert format_metrics(on_labels).splitlines()[2].split() == ["label", "agreement",
                                                                 f"{agreement:.4f}"]
    on_scores = evaluate(model, data, reference=reference, output="scores", batch_size=4,
                         progress=False)
    p, q = _softmax(XC @ WC), _softmax(XC @ ref_weight)
    cosine = np.sum(p * q, axis=1) / np.linalg.norm(p, axis=1) / np.linalg.norm(q, axis=1)
    assert on_scores["mean_cosine"] == pytest.approx(cosine.mean(), abs=1e-6)
    assert on_scores["max_abs_diff"] == pytest.approx(np.abs(p - q).max(), abs=1e-6)
    assert on_scores["top1_agreement"] == agreement and on_scores["accuracy"] == 0.7
    unlabelled = evaluate(model, {"x": XC}, reference=reference, output="scores", progress=False)
    assert "retrieval_agreement" not in unlabelled  # a classifier's scores are no embeddings
    json.dumps(on_scores)


def test_labels_must_be_among_a_maps_integer_classes(tmp_path):
    model = save_classifier(tmp_path / "m.onnx", WC)
    data = {"x": XC, "labels": np.argmax(XC @ WC, axis=1)}  # column indices 0..2, not 3 / 5 / 7
    with pytest.raises(OnnxPruneError, match=r"^labels range 0\.\.2 but output 'scores' has "
                                             r"classes 3, 5, 7: labels must be among them$"):
        evaluate(model, data, output="scores", progress=False)
    other = save_classifier(tmp_path / "other.onnx", WC, classes=[3, 5, 8])
    with pytest.raises(OnnxPruneError, match=r"^output 'scores' has classes 3, 5, 7 in the "
                                             r"model but 3, 5, 8 in the reference$"):
        evaluate(model, {"x": XC}, reference=other, output="scores", progress=False)


def test_errors_name_only_outputs_that_would_work(tmp_path):
    model = save_classifier(tmp_path / "m.onnx", WC)
    data = {"x": XC, "labels": np.full(10, 3)}
    with pytest.raises(OnnxPruneError) as error:
        evaluate(model, data, output="cube", progress=False)
    assert str(error.value) == (
        "labels need a (samples, classes) output of scores or a (samples,) output of integer "
        "labels, but 'cube' is float of shape ('n', 3, 1); give a reference model to measure "
        "fidelity instead or choose another output (label, scores)")
    with pytest.raises(OnnxPruneError) as error:
        evaluate(model, data, reference=model, output="parts", progress=False)
    assert str(error.value) == (
        "eval cannot measure output 'parts' of type seq(tensor(float)): it measures tensors, "
        "and sequences of maps (a classifier's per-class scores); choose another output "
        "(label, scores, cube)")


def save_unshaped_input(path, external=False):
    """y = x @ W with x declared without a shape (onnxruntime reports [] for it, as for a
    scalar); onnx.checker would refuse it, onnxruntime runs it."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "unshaped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(IDENTITY, "W")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=external, location="w.bin",
                    size_threshold=0)
    return str(path)


def test_an_input_declared_without_a_shape_takes_data_of_any_rank(tmp_path):
    path = save_unshaped_input(tmp_path / "m.onnx", external=True)
    data = {"x": X, "labels": np.array([0, 1, 1, 0])}
    for model in (path, onnx.load(path), onnx.load(path).SerializeToString()):
        result = evaluate(model, data, reference=path, batch_size=3, progress=False)
        assert result["accuracy"] == 0.75 and result["max_abs_diff"] == 0.0
