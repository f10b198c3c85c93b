"""Inputs of calibration and evaluation: fixed batch sizes, scalar inputs, mappings and lists,
per-model dtypes and inputs, label range, the measured output, bfloat16, argument checks."""
from __future__ import annotations

import types

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import builders
from builders import vinfo
from onnxprune import OnnxPruneError, prune
from onnxprune import runtime
from onnxprune.calibration.collect import collect_statistics
from onnxprune.calibration.source import load_calibration
from onnxprune.cli import main
from onnxprune.data import check_against_model
from onnxprune.evaluate import evaluate, format_metrics
from onnxprune.graph import find_layers

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((6, 8)).astype(np.float32)
W2 = RNG.standard_normal((8, 3)).astype(np.float32)


def mlp(batch="N", dtype=np.float32):
    """x (batch, 6) -> MatMul -> Relu -> MatMul -> y (batch, 3), in `dtype` throughout."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    return builders.make_model(nodes, [vinfo("x", [batch, 6], elem)], [vinfo("y", [batch, 3], elem)],
                               [numpy_helper.from_array(W1.astype(dtype), "W1"),
                                numpy_helper.from_array(W2.astype(dtype), "W2")])


def save(model, tmp_path, name):
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def samples(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32)


# 1. a fixed batch dimension ------------------------------------------------------------------

def test_calibration_of_a_fixed_batch_model_gives_the_statistics_of_the_free_batch_model():
    x = samples(12)
    fixed, free = mlp(batch=1), mlp()
    calib_fixed = load_calibration({"x": x}, fixed, None)
    assert calib_fixed.fixed_batch == 1 and calib_fixed.note is None
    assert all(len(b["x"]) == 1 for b in calib_fixed.batches(32))  # --batch-size gives way
    layers_fixed, _ = find_layers(fixed)
    layers_free, _ = find_layers(free)
    got, info = collect_statistics(fixed, layers_fixed, calib_fixed.batches(32))
    want, _ = collect_statistics(free, layers_free, load_calibration({"x": x}, free, None).batches(5))
    assert info["samples"] == 12 and info["batches"] == 12
    for name in want:
        np.testing.assert_allclose(got[name].gram, want[name].gram, rtol=1e-9)
    for method, extra in (("dc", {}), ("global-mt", {"refit": True})):
        a = prune(fixed, 0.5, method=method, calib={"x": x}, verify=False, **extra).model
        b = prune(free, 0.5, method=method, calib={"x": x}, verify=False, **extra).model
        for ta, tb in zip(a.graph.initializer, b.graph.initializer):
            np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))
    assert prune(fixed, 0.5, method="dc", calib="random", calib_samples=8, verify=False).model


def test_a_fixed_batch_that_does_not_divide_the_samples_uses_a_multiple_of_it():
    model = mlp(batch=4)
    calib = load_calibration({"x": samples(10)}, model, None)
    assert calib.size == 8 and "fixed at 4" in calib.note and "8 of the 10" in calib.note
    assert [len(b["x"]) for b in calib.batches(3)] == [4, 4]
    assert load_calibration({"x": samples(10)}, model, 6).size == 4
    assert load_calibration("random", model, 10).size == 8
    with pytest.raises(OnnxPruneError, match=r"fixed at 4, so calibration needs at least 4 "
                                             r"samples, but the calibration data holds 3"):
        load_calibration({"x": samples(3)}, model, None)
    with pytest.raises(OnnxPruneError, match="fixed at 4.*--calib-samples is 2"):
        load_calibration("random", model, 2)


# 2. scalar inputs ----------------------------------------------------------------------------

def scalar_model():
    """y = (x @ W1) * scale, with the rank-0 input `scale` listed FIRST."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["z"]), helper.make_node("Mul", ["z", "scale"], ["y"])]
    return builders.make_model(nodes, [vinfo("scale", []), vinfo("x", ["N", 6])],
                               [vinfo("y", ["N", 8])], [numpy_helper.from_array(W1, "W1")])


def test_a_scalar_input_is_fed_whole_with_every_batch(tmp_path):
    model = save(scalar_model(), tmp_path, "scalar.onnx")
    x = samples(10)
    labels = np.argmax(x @ W1 * -1.0, axis=1)
    data = {"x": x, "scale": np.float64(-1.0), "labels": labels}  # scalar cast to float32 too
    result = evaluate(model, data, batch_size=3, progress=False)
    assert result["samples"] == 10 and result["accuracy"] == 1.0
    np.savez(tmp_path / "d.npz", **data)
    assert evaluate(model, str(tmp_path / "d.npz"), progress=False)["accuracy"] == 1.0
    with pytest.raises(OnnxPruneError, match=r"input 'scale' is a scalar \(rank 0\).*shape \(10,\)"):
        evaluate(model, {**data, "scale": np.ones(10, np.float32)}, progress=False)


def test_calibration_with_a_scalar_input_from_every_kind_of_source():
    model = scalar_model()
    x = samples(10)
    layers, _ = find_layers(model)
    want = None
    batches = [{"scale": np.float32(2), "x": x[i:i + 4]} for i in range(0, 10, 4)]
    for source in ({"scale": np.float32(2), "x": x}, batches, iter(batches)):
        calib = load_calibration(source, model, None)
        assert calib.size == 10
        stats, info = collect_statistics(model, layers, calib.batches(4))
        assert info["samples"] == 10
        gram = stats[layers[0].name].gram
        want = gram if want is None else want
        np.testing.assert_allclose(gram, want)
    calib = load_calibration("random", model, 5)
    assert calib.samples["scale"].shape == () and calib.size == 5
    assert load_calibration({"scale": np.float32(2), "x": x}, model, 4).size == 4
    with pytest.raises(OnnxPruneError, match="scalar 'scale' different values"):
        load_calibration([{"scale": 1.0, "x": x[:2]}, {"scale": 2.0, "x": x[2:]}], model, None)
    with pytest.raises(OnnxPruneError, match="'scale'.*not finite|'scale'.*NaN"):  # not "nan and nan"
        load_calibration([{"scale": np.nan, "x": x[:2]}, {"scale": np.nan, "x": x[2:]}], model, None)
    assert prune(model, 0.5, method="dc", calib={"scale": np.float32(2), "x": x}, verify=False).model


# 3. mappings and lists -----------------------------------------------------------------------

def test_any_mapping_of_arrays_or_lists_is_calibration_data(tmp_path):
    model = mlp()
    x = samples(10)
    np.savez(tmp_path / "c.npz", x=x)
    with np.load(tmp_path / "c.npz") as npz:
        assert load_calibration(npz, model, None).size == 10
    proxy = types.MappingProxyType({"x": x})
    np.testing.assert_array_equal(load_calibration(proxy, model, None).samples["x"], x)
    as_lists = load_calibration({"x": x.tolist()}, model, None).samples["x"]
    assert as_lists.dtype == np.float32 and as_lists.shape == (10, 6)
    with pytest.raises(OnnxPruneError, match="'x': cannot be read as an array"):
        load_calibration({"x": [[1.0] * 6, [1.0] * 5]}, model, None)


def test_evaluate_takes_lists_and_npz_files(tmp_path):
    model = save(mlp(), tmp_path, "m.onnx")
    x = samples(8)
    labels = np.argmax(np.maximum(x @ W1, 0) @ W2, axis=1)
    assert evaluate(model, {"x": x.tolist(), "labels": labels.tolist()}, progress=False)["accuracy"] == 1.0
    np.savez(tmp_path / "e.npz", x=x, labels=labels)
    with np.load(tmp_path / "e.npz") as npz:
        assert evaluate(model, npz, progress=False)["accuracy"] == 1.0


# 4. each model gets the data in its own input dtype ------------------------------------------

def test_fp16_model_against_fp32_reference_and_back(tmp_path):
    fp16 = save(mlp(dtype=np.float16), tmp_path, "m16.onnx")
    fp32 = save(mlp(), tmp_path, "m32.onnx")
    data = {"x": samples(16)}
    for model, reference in ((fp16, fp32), (fp32, fp16)):
        result = evaluate(model, data, reference=reference, progress=False)
        assert result["mean_cosine"] > 0.999 and result["samples"] == 16


# 5. labels out of range ----------------------------------------------------------------------

@pytest.mark.parametrize("shift, shown", [(1, r"1\.\.3"), (-1, r"-1\.\.1"), (100, r"100\.\.102")])
def test_labels_outside_the_classes_are_an_error(tmp_path, shift, shown):
    model = save(mlp(), tmp_path, "m.onnx")
    labels = np.arange(9) % 3 + shift
    with pytest.raises(OnnxPruneError, match=f"labels range {shown} but output 'y' has 3 classes"):
        evaluate(model, {"x": samples(9), "labels": labels}, progress=False)


# 6. a reference with other inputs ------------------------------------------------------------

def with_bias_input():
    """mlp plus an input b added to the output."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["z"]), helper.make_node("Add", ["z", "b"], ["y"])]
    return builders.make_model(nodes, [vinfo("x", ["N", 6]), vinfo("b", ["N", 3])],
                               [vinfo("y", ["N", 3])], [numpy_helper.from_array(W1, "W1"),
                                                        numpy_helper.from_array(W2, "W2")])


def test_each_model_takes_its_own_inputs_from_the_data(tmp_path):
    plain = save(mlp(), tmp_path, "plain.onnx")
    biased = save(with_bias_input(), tmp_path, "biased.onnx")
    data = {"x": samples(6), "b": np.zeros((6, 3), np.float32)}
    for model, reference in ((plain, biased), (biased, plain)):
        assert evaluate(model, data, reference=reference, progress=False)["max_abs_diff"] == 0.0
    with pytest.raises(OnnxPruneError, match=r"^reference model: data has no array for model "
                                             r"input\(s\) 'b'"):
        evaluate(plain, {"x": data["x"]}, reference=biased, progress=False)
    only_b = save(builders.make_model([helper.make_node("Identity", ["b"], ["y"])],
                                      [vinfo("b", ["N", 3])], [vinfo("y", ["N", 3])]), tmp_path, "b.onnx")
    with pytest.raises(OnnxPruneError, match="6 samples for the model's inputs but 4 for the reference's"):
        evaluate(plain, {"x": data["x"], "b": data["b"][:4]}, reference=only_b, progress=False)


def test_model_and_reference_with_different_fixed_batches(tmp_path):
    one = save(mlp(batch=1), tmp_path, "one.onnx")
    four = save(mlp(batch=4), tmp_path, "four.onnx")
    data = {"x": samples(7)}
    for model, reference in ((one, four), (four, one)):
        result = evaluate(model, data, reference=reference, batch_size=3, progress=False)
        assert result["samples"] == 7 and result["max_abs_diff"] == 0.0


# 7. the measured output ----------------------------------------------------------------------

def two_outputs(order=("cls", "logits")):
    """mlp with its class id (ArgMax, shape (N,)) as another output."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["logits"]),
             helper.make_node("ArgMax", ["logits"], ["cls"], axis=1, keepdims=0)]
    outs = {"cls": vinfo("cls", ["N"], TensorProto.INT64), "logits": vinfo("logits", ["N", 3])}
    return builders.make_model(nodes, [vinfo("x", ["N", 6])], [outs[o] for o in order],
                               [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")])


def test_output_chooses_what_is_measured(tmp_path):
    model = save(two_outputs(), tmp_path, "two.onnx")
    reference = save(two_outputs(("logits", "cls")), tmp_path, "ref.onnx")
    x = samples(10)
    labels = np.argmax(np.maximum(x @ W1, 0) @ W2, axis=1)
    assert evaluate(model, {"x": x, "labels": labels}, progress=False)["accuracy"] == 1.0  # labels
    result = evaluate(model, {"x": x, "labels": labels}, output="logits", progress=False)
    assert result["accuracy"] == 1.0 and result["output"] == "logits"
    assert "output    logits" in format_metrics(result)
    # with a name, the reference's output of that name, wherever it is in its list
    result = evaluate(model, {"x": x}, reference=reference, output="logits", progress=False)
    assert result["max_abs_diff"] == 0.0 and result["top1_agreement"] == 1.0
    with pytest.raises(OnnxPruneError,
                       match=r"^the model has no output 'prob' \(its outputs: cls, logits\)$"):
        evaluate(model, {"x": x}, output="prob", progress=False)
    with pytest.raises(OnnxPruneError, match=r"^reference model: the model has no output 'logits'"):
        evaluate(model, {"x": x}, reference=save(mlp(), tmp_path, "m.onnx"), output="logits",
                 progress=False)


def test_eval_command_output_option(tmp_path):
    model = save(two_outputs(), tmp_path, "two.onnx")
    x = samples(10)
    np.savez(tmp_path / "d.npz", x=x, labels=np.argmax(np.maximum(x @ W1, 0) @ W2, axis=1))
    runner = CliRunner()
    help_text = " ".join(runner.invoke(main, ["eval", "--help"]).output.split())
    assert "--output NAME" in help_text and "[default: the model's first output" in help_text
    ok = runner.invoke(main, ["eval", model, "--data", str(tmp_path / "d.npz"), "--output", "logits",
                              "--json", "-q"])
    assert ok.exit_code == 0 and '"output": "logits"' in ok.output and '"accuracy": 1.0' in ok.output
    bad = runner.invoke(main, ["eval", model, "--data", str(tmp_path / "d.npz"), "--output", "nope"])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [
        "onnxprune: error: the model has no output 'nope' (its outputs: cls, logits)"]


# 8. bfloat16 inputs --------------------------------------------------------------------------

def bf16_input_model():
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["xf", "W1"], ["y"])]
    return builders.make_model(nodes, [vinfo("x", ["N", 6], TensorProto.BFLOAT16)],
                               [vinfo("y", ["N", 8])], [numpy_helper.from_array(W1, "W1")])


def test_float32_data_casts_to_a_bfloat16_input():
    x = samples(4)
    got = check_against_model({"x": x}, [("x", np.dtype(ml_dtypes.bfloat16), ["N", 6])])["x"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), x, rtol=1e-2)
    with pytest.raises(OnnxPruneError, match="2 NaN or infinite values"):
        check_against_model({"x": np.full((2, 6), 1e39)}, [("x", np.dtype(ml_dtypes.bfloat16), ["N", 6])])


def test_a_bfloat16_input_calibrates_or_is_one_clear_error():
    data = [{"x": samples(4)}, {"x": samples(4).astype(ml_dtypes.bfloat16)}]
    if "tensor(bfloat16)" in runtime.ORT_TYPES:  # runtime feeds bfloat16 to onnxruntime itself
        for d in data:
            assert prune(bf16_input_model(), 0.5, method="dc", calib=d).report.calibration["samples"] == 4
        return
    message = (r"^input 'x' is bfloat16, which onnxruntime cannot take as a numpy array: "
               r"calibration cannot feed this model")
    for d in data:
        with pytest.raises(OnnxPruneError, match=message):
            prune(bf16_input_model(), 0.5, method="dc", calib=d, verify=False)


# 9. argument checks --------------------------------------------------------------------------

def test_evaluate_checks_device_and_batch_size_first(tmp_path):
    model = save(mlp(), tmp_path, "m.onnx")
    data = {"x": samples(4), "labels": np.zeros(4, np.int64)}
    with pytest.raises(OnnxPruneError, match=r"^unknown device 'tpu' \(choose from auto, cpu, cuda\)$"):
        evaluate(model, data, device="tpu", progress=False)
    for size in (2.5, 0, True):
        with pytest.raises(OnnxPruneError, match="batch size must be a whole number of at least 1"):
            evaluate(model, data, batch_size=size, progress=False)


def test_cuda_asked_for_but_absent_is_noted(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    model = save(mlp(), tmp_path, "m.onnx")
    data = {"x": samples(4), "labels": np.zeros(4, np.int64)}
    result = evaluate(model, data, device="cuda", progress=False)
    assert result["provider"] == "CPU" and "no CUDA execution provider" in result["notes"][0]
    assert "note" in format_metrics(result) and "notes" not in evaluate(model, data, progress=False)
