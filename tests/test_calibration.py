"""Calibration through onnxruntime: data sources, checks, statistics, device fallback, DC end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
import pytest

import builders
from onnxprune import OnnxPruneError, prune
from onnxprune.calibration.collect import accumulator_bytes, calibration_groups, collect_statistics
from onnxprune.calibration.source import load_calibration
from onnxprune.graph import find_layers
from onnxprune.methods.refit import refit_on_support
from onnxprune.runtime import make_session, providers_for

MODELS = Path(__file__).resolve().parent.parent / "models"


def cnn_data(n=40, seed=0):
    return {"input": np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)}


def test_statistics_equal_explicit_rows_and_do_not_depend_on_batch_size():
    model = builders.cnn_with_batchnorm()
    layers, _ = find_layers(model)
    data = load_calibration(cnn_data(), model, None)
    one, info1 = collect_statistics(model, layers, data.batches(1), max_positions=None)
    many, info64 = collect_statistics(model, layers, data.batches(64), max_positions=None)
    assert info1["samples"] == info64["samples"] == 40 and info1["batches"] == 40
    for name in one:
        np.testing.assert_allclose(one[name].gram, many[name].gram, rtol=1e-12, atol=1e-9)
        assert one[name].count == many[name].count
    # the Gemm's input is the flattened activation: its Gram is X^T X of what onnxruntime computes
    gemm = next(layer for layer in layers if layer.op == "Gemm")
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    augmented.graph.output.add().name = gemm.input_name
    x = ort.InferenceSession(augmented.SerializeToString()).run([gemm.input_name], cnn_data())[0]
    np.testing.assert_allclose(one[gemm.name].gram[0], x.astype(np.float64).T @ x, rtol=1e-6)


def test_python_sources_iterable_and_reader_match_the_dict():
    model = builders.cnn_with_batchnorm()
    samples = cnn_data(30)
    batches = [{"input": samples["input"][i:i + 7]} for i in range(0, 30, 7)]

    class Reader:  # onnxruntime.quantization.CalibrationDataReader convention
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            return next(self.items, None)

    for source in (iter(batches), Reader(), batches):
        got = load_calibration(source, model, None)
        np.testing.assert_array_equal(got.samples["input"], samples["input"])
    assert load_calibration(Reader(), model, 10).size == 10


def test_a_stream_is_read_up_to_the_limit_and_says_so_when_it_held_more():
    model = builders.cnn_with_batchnorm()
    batches = [{"input": x} for x in np.split(cnn_data(30)["input"], 5)]  # 6 samples each
    got = load_calibration(iter(batches), model, 12)
    np.testing.assert_array_equal(got.samples["input"], cnn_data(30)["input"][:12])
    assert "first batches, up to --calib-samples 12" in got.note
    assert load_calibration(iter(batches), model, 30).note is None  # all of it read
    assert load_calibration(batches, model, None).note is None
    used_up = iter(batches)
    load_calibration(used_up, model, None)
    with pytest.raises(OnnxPruneError, match="yielded no batches.*already used up"):
        load_calibration(used_up, model, None)


def test_stream_batches_must_hold_the_same_arrays():
    model = builders.cnn_with_batchnorm()
    x = cnn_data(8)["input"]
    with pytest.raises(OnnxPruneError, match="batch 2 holds 'x', but the first batch 'input'"):
        load_calibration([{"input": x[:4]}, {"x": x[4:]}], model, None)


def test_files_directory_and_glob(tmp_path):
    model = builders.cnn_with_batchnorm()
    samples = cnn_data(12)
    np.savez(tmp_path / "a.npz", input=samples["input"][:5])
    np.savez(tmp_path / "b.npz", input=samples["input"][5:])
    for spec in (tmp_path, str(tmp_path / "*.npz")):
        np.testing.assert_array_equal(load_calibration(spec, model, None).samples["input"],
                                      samples["input"])


@pytest.mark.parametrize("bad, message", [
    ({"x": np.zeros((4, 1, 8, 8), np.float32)}, "'input'"),                # missing input
    ({"input": np.zeros((4, 8, 8), np.float32)}, "input"),                 # wrong rank
    ({"input": np.zeros((4, 1, 9, 8), np.float32)}, "axis 2"),             # wrong fixed dim
    ({"input": np.zeros((4, 1, 8, 8), np.int64)}, "input"),                # int for a float input
    ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "no samples"),         # empty
])
def test_bad_calibration_data_is_one_clear_error(bad, message):
    with pytest.raises(OnnxPruneError, match=message):
        load_calibration(bad, builders.cnn_with_batchnorm(), None)


def test_bad_calibration_sources():
    model = builders.cnn_with_batchnorm()
    with pytest.raises(OnnxPruneError, match="not supported"):
        load_calibration(42, model, None)
    with pytest.raises(OnnxPruneError, match="dict of arrays"):
        load_calibration([np.zeros(3)], model, None)
    with pytest.raises(OnnxPruneError):
        load_calibration("/nonexistent/calib.npz", model, None)


def test_methods_that_need_data_refuse_to_run_without_it():
    with pytest.raises(OnnxPruneError, match="needs calibration data"):
        prune(builders.mlp_gemm(), 0.5, method="dc")
    with pytest.raises(OnnxPruneError, match="needs calibration data"):
        prune(builders.mlp_gemm(), 0.5, refit=True)


def test_random_calibration_only_when_asked_and_reported():
    result = prune(builders.mlp_gemm(), 0.5, method="dc", calib="random", calib_samples=32)
    assert result.report.calibration["random"] is True
    assert "RANDOM" in result.report.format()


def test_cuda_requested_but_absent_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers_for("cuda") == ["CPUExecutionProvider"]
    session = make_session(builders.mlp_gemm().SerializeToString(), "cuda")
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(OnnxPruneError, match="unknown device"):
        providers_for("tpu")
    result = prune(builders.mlp_gemm(), 0.5, device="cuda")  # the report says what happened
    assert any("no CUDA execution provider" in note for note in result.report.notes)
    assert not any("CUDA" in note for note in prune(builders.mlp_gemm(), 0.5).report.notes)


def test_dc_end_to_end_exact_sparsity_and_bias_refit():
    model = builders.mlp_gemm()
    data = {"input": np.random.default_rng(1).standard_normal((200, 20)).astype(np.float32)}
    result = prune(model, 0.7, method="dc", calib=data)
    report = result.report
    assert report.zeros == round(0.7 * report.params)
    assert report.calibration["samples"] == 200 and report.calibration["provider"] == "CPU"
    assert all(row.note == "bias refitted" for row in report.layers)
    dense = ort.InferenceSession(model.SerializeToString()).run(None, data)[0]
    pruned = ort.InferenceSession(result.model.SerializeToString()).run(None, data)[0]
    magnitude = prune(model, 0.7, method="global-mt").model
    mag = ort.InferenceSession(magnitude.SerializeToString()).run(None, data)[0]
    assert np.mean((pruned - dense) ** 2) < 0.5 * np.mean((mag - dense) ** 2)


def test_refit_after_magnitude_refits_the_bias_too():
    # inputs with a mean: the pruned weights carried part of it, which the bias can take back
    rng = np.random.default_rng(5)
    w, b = rng.standard_normal((8, 12)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    model = builders.make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
                                [builders.vinfo("x", ["N", 12])], [builders.vinfo("y", ["N", 8])],
                                [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    x = (rng.standard_normal((256, 12)) + 1.0).astype(np.float32)
    result = prune(model, 0.7, method="layer", refit=True, calib={"x": x})
    assert [row.note for row in result.report.layers] == ["bias refitted"]
    new = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    mask = new["w"] != 0
    assert mask.sum() == round(0.3 * w.size) and not np.array_equal(new["b"], b)
    x1 = np.hstack([x, np.ones((len(x), 1), np.float32)]).astype(np.float64)  # [X 1]: w and b in one solve
    both = refit_on_support(np.hstack([w, b[:, None]])[None], np.hstack([mask, np.ones((8, 1), bool)])[None],
                            (x1.T @ x1)[None])[0]
    np.testing.assert_allclose(new["w"], both[:, :-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["b"], both[:, -1], rtol=1e-5, atol=1e-6)
    weights_only = refit_on_support(w[None].astype(np.float64), mask[None], (x1[:, :-1].T @ x1[:, :-1])[None])[0]
    error = lambda wn, bn: np.mean((x @ wn.T + bn - (x @ w.T + b)) ** 2)  # noqa: E731
    assert error(new["w"], new["b"]) < 0.9 * error(weights_only, b) < 0.9 * error(w * mask, b)


def test_dc_on_the_animal_cnn_beats_magnitude(tmp_path):
    """Real data: the reference CNN at 0.9, a short calibration set."""
    from onnxprune.evaluate import evaluate

    calib = dict(np.load(MODELS / "animal_calib.npz"))
    test = {k: v[:500] for k, v in np.load(MODELS / "animal_test.npz").items()}
    accuracy = {}
    for method in ("global-mt", "dc"):
        out = tmp_path / f"{method}.onnx"
        prune(MODELS / "animal_cnn.onnx", 0.9, method=method, calib=calib, calib_samples=128,
              output=out, verify=False)
        accuracy[method] = evaluate(out, test, progress=False)["accuracy"]
    assert accuracy["dc"] > accuracy["global-mt"] + 0.15, accuracy


def test_statistics_over_the_budget_are_collected_in_groups_with_the_same_result():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    with np.load(MODELS / "digits_calib.npz") as z:
        data = {"input": z["input"][:64]}
    whole = prune(model, 0.8, method="dc", calib=data, verify=False)
    for method, refit in (("dc", False), ("global-mt", True)):
        one = prune(model, 0.8, method=method, refit=refit, calib=data, verify=False)
        split = prune(model, 0.8, method=method, refit=refit, calib=data, verify=False,
                      max_memory=20_000)  # below the largest layer's statistics: one group each
        layers = [r for r in split.report.layers]
        assert split.report.calibration["passes"] == split.report.calibration["groups"] == len(layers)
        assert "passes (layer groups" in split.report.format()
        for a, b in zip(one.model.graph.initializer, split.model.graph.initializer):
            assert a.raw_data == b.raw_data, a.name  # the same statistics, so the same weights
    assert whole.report.calibration.get("groups") is None
    with pytest.raises(OnnxPruneError, match="ltp learns every layer at once"):
        prune(model, 0.8, method="ltp", calib=data, max_memory=20_000)


def _qkv(through_identity: bool) -> onnx.ModelProto:
    """Three projections of one input (a transformer's Q, K, V) each followed by ReLU, plus one
    of another tensor; with through_identity each projection reads its own Identity copy of x."""
    rng = np.random.default_rng(21)
    helper = onnx.helper
    nodes, heads = [], []
    for name in "qkv":
        source = f"x_{name}" if through_identity else "x"
        if through_identity:
            nodes.append(helper.make_node("Identity", ["x"], [source]))
        nodes += [helper.make_node("MatMul", [source, f"w{name}"], [name]),
                  helper.make_node("Relu", [name], [f"{name}_relu"])]  # dc: the sampled rows
        heads.append(f"{name}_relu")
    nodes += [helper.make_node("Sum", heads, ["s"]), helper.make_node("MatMul", ["s", "wo"], ["y"])]
    weights = [onnx.numpy_helper.from_array(builders.rand(rng, 12, 12), f"w{n}") for n in "qkvo"]
    return builders.make_model(nodes, [builders.vinfo("x", ["n", 12])], [builders.vinfo("y", ["n", 12])],
                               weights)


def test_layers_reading_the_same_input_share_one_statistics_with_the_same_result():
    model, apart = _qkv(False), _qkv(True)
    x = np.random.default_rng(2).standard_normal((48, 12)).astype(np.float32)
    layers, _ = find_layers(model)
    stats, _ = collect_statistics(model, layers, [{"x": x}])
    assert stats["wq"] is stats["wk"] is stats["wv"] and stats["wo"] is not stats["wq"]
    assert calibration_groups(layers, {}, 10 ** 9) == [layers]
    # a budget of one statistics: q, k, v together in one pass, o in the next
    one = accumulator_bytes(layers[0])
    assert [len(g) for g in calibration_groups(layers, {}, one)] == [3, 1]
    assert [len(g) for g in calibration_groups(layers, {}, one // 2)] == [3, 1]  # over alone
    for method, refit in (("dc", False), ("ltp", False), ("global-mt", True)):
        shared = prune(model, [0.5, 0.8], method=method, refit=refit, calib={"x": x}, verify=False)
        alone = prune(apart, [0.5, 0.8], method=method, refit=refit, calib={"x": x}, verify=False)
        for a, b in zip(shared, alone):
            for name in ("wq", "wk", "wv", "wo"):
                np.testing.assert_array_equal(*(onnx.numpy_helper.to_array(
                    next(t for t in r.model.graph.initializer if t.name == name)) for r in (a, b)))


def test_a_sample_limit_takes_a_seeded_random_subset_not_a_prefix():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    x = np.arange(1000, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 8, 8), np.float32)
    subset = load_calibration({"input": x}, model, 100, seed=0).samples["input"][:, 0, 0, 0]
    assert subset.size == 100 and np.all(np.diff(subset) > 0)  # distinct, in file order
    assert subset.max() > 900  # a prefix would stop at 99: a file sorted by class loses classes
    again = load_calibration({"input": x}, model, 100, seed=0).samples["input"][:, 0, 0, 0]
    other = load_calibration({"input": x}, model, 100, seed=1).samples["input"][:, 0, 0, 0]
    assert np.array_equal(subset, again) and not np.array_equal(subset, other)
    everything = load_calibration({"input": x}, model, 1000, seed=0).samples["input"]
    assert np.array_equal(everything, x)


def test_a_layer_input_the_model_makes_non_finite_is_one_clear_error():
    # finite data, but Log(x) of negative x is NaN before the MatMul
    rng = np.random.default_rng(0)
    model = builders.make_model(
        [onnx.helper.make_node("Log", ["x"], ["lx"]), onnx.helper.make_node("MatMul", ["lx", "w"], ["y"])],
        [builders.vinfo("x", ["N", 4])], [builders.vinfo("y", ["N", 3])],
        [onnx.numpy_helper.from_array(builders.rand(rng, 4, 3), "w")])
    data = {"x": rng.standard_normal((8, 4)).astype(np.float32)}
    with pytest.raises(OnnxPruneError, match=r"layer '.*': its input holds NaN or infinite values"):
        prune(model, 0.5, method="dc", calib=data)


def test_a_shared_weight_sums_the_statistics_of_all_its_uses():
    # y = tanh(x W) W: one tensor, two inputs; its objective is the sum of both uses' errors
    model = builders.shared_weight()
    layers, _ = find_layers(model)
    assert layers[0].shared_inputs == ["t"] and not layers[0].uses_differ
    x = np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32)
    stats, _ = collect_statistics(model, layers, [{"x": x}])
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    t = np.tanh(x.astype(np.float64) @ w)
    np.testing.assert_allclose(stats["w"].gram[0], x.T.astype(np.float64) @ x + t.T @ t, rtol=1e-5)
    assert stats["w"].count == 64
    # two nodes applying the weight to the same input: one use, not a doubled count
    twice = builders.make_model(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("MatMul", ["x", "w"], ["g"]),
         onnx.helper.make_node("Add", ["h", "g"], ["y"])],
        [builders.vinfo("x", ["n", 6])], [builders.vinfo("y", ["n", 6])], [model.graph.initializer[0]])
    layers, _ = find_layers(twice)
    assert layers[0].shared_inputs == []
    stats, _ = collect_statistics(twice, layers, [{"x": x}])
    assert stats["w"].count == 32


def test_a_weight_used_in_two_ways_falls_back_to_magnitude_with_a_note():
    rng = np.random.default_rng(2)
    helper = onnx.helper
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),           # x W
             helper.make_node("MatMul", ["w", "h"], ["y"])]           # W h: the weight on the left
    model = builders.make_model(nodes, [builders.vinfo("x", [6, 6])], [builders.vinfo("y", [6, 6])],
                                [onnx.numpy_helper.from_array(builders.rand(rng, 6, 6), "w")])
    layers, _ = find_layers(model)
    assert layers[0].uses_differ
    result = prune(model, 0.5, method="dc", calib={"x": builders.rand(rng, 6, 6)}, verify=False)
    assert result.report.zeros == 18
    assert any("(used differently by several nodes)" in note for note in result.report.notes)
    refit = prune(model, 0.5, refit=True, calib={"x": builders.rand(rng, 6, 6)}, verify=False)
    assert any("pruned by magnitude, not refitted: w" in note for note in refit.report.notes)


def test_data_onnxruntime_rejects_while_running_is_one_clear_error():
    ids = np.full((8, 3), 1 << 40, dtype=np.int64)  # token ids far outside the 50-row table
    with pytest.raises(OnnxPruneError, match="onnxruntime failed to run the model on the data"):
        prune(builders.embedding_and_layernorm(), 0.5, method="dc", calib={"ids": ids})


def test_a_sequential_trail_over_a_shared_weight_equals_single_levels():
    # x W -> tanh -> V -> tanh -> W: the second use of W sees W itself and V, which must be
    # dense again at each level's start (as in a single run), not the previous level's
    rng = np.random.default_rng(5)
    h = onnx.helper
    nodes = [h.make_node("MatMul", ["x", "w"], ["a"]), h.make_node("Tanh", ["a"], ["ta"]),
             h.make_node("MatMul", ["ta", "v"], ["b"]), h.make_node("Tanh", ["b"], ["tb"]),
             h.make_node("MatMul", ["tb", "w"], ["y"])]
    model = builders.make_model(nodes, [builders.vinfo("x", ["N", 8])], [builders.vinfo("y", ["N", 8])],
                                [onnx.numpy_helper.from_array(builders.rand(rng, 8, 8), n) for n in "wv"])
    data = {"x": builders.rand(rng, 64, 8)}
    for kw in (dict(method="dc"), dict(method="global", refit=True)):
        trail = prune(model, [0.5, 0.9], calib=data, sequential=True, verify=False, **kw)
        single = prune(model, 0.9, calib=data, sequential=True, verify=False, **kw)
        for a, b in zip(trail[1].model.graph.initializer, single.model.graph.initializer):
            assert a.SerializeToString() == b.SerializeToString(), (kw, a.name)


def test_a_layer_input_onnxruntime_would_optimise_away_is_still_observed():
    # Transpose -> Gemm(constant A) -> Transpose: onnxruntime 1.31's transpose optimiser drops
    # 'xb' even when it is a graph output; the calibration reads an Identity copy of it
    rng = np.random.default_rng(9)
    h = onnx.helper
    nodes = [h.make_node("Transpose", ["x"], ["xb"], perm=[1, 0]),
             h.make_node("Gemm", ["w", "xb"], ["yt"]),
             h.make_node("Transpose", ["yt"], ["y"], perm=[1, 0])]
    model = builders.make_model(nodes, [builders.vinfo("x", ["N", 12])], [builders.vinfo("y", ["N", 7])],
                                [onnx.numpy_helper.from_array(builders.rand(rng, 7, 12), "w")])
    x = builders.rand(rng, 32, 12)
    result = prune(model, 0.5, method="dc", calib={"x": x})
    assert result.report.zeros == 42 and not result.report.notes
    assert [o.name for o in model.graph.output] == ["y"] and len(model.graph.node) == 3  # untouched


@pytest.mark.parametrize("method", ["dc", "ltp"])
def test_gemm_bias_refit_honours_alpha_and_beta(method):
    # alpha X W^T + beta C: the refitted C must be the solver's bias over beta / alpha
    rng = np.random.default_rng(10)
    h = onnx.helper
    model = builders.make_model(
        [h.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=2.0, beta=0.5)],
        [builders.vinfo("x", ["N", 10])], [builders.vinfo("y", ["N", 6])],
        [onnx.numpy_helper.from_array(builders.rand(rng, 6, 10), "w"),
         onnx.numpy_helper.from_array(builders.rand(rng, 6) * 3, "c")])
    x = (builders.rand(rng, 200, 10) + 0.5).astype(np.float32)

    def output(m):
        return ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0].astype(np.float64)

    dense = output(model)
    pruned = output(prune(model, 0.6, method=method, calib={"x": x}, verify=False).model)
    magnitude = output(prune(model, 0.6, verify=False).model)
    np.testing.assert_allclose((pruned - dense).mean(axis=0), 0, atol=1e-4)  # the mean shift is refitted
    assert ((pruned - dense) ** 2).sum() < ((magnitude - dense) ** 2).sum()


def test_a_gemm_with_negative_alpha_is_not_given_the_relu_objective():
    model = builders.make_model(
        [onnx.helper.make_node("Gemm", ["x", "w"], ["g"], transB=1, alpha=-1.0), onnx.helper.make_node("Relu", ["g"], ["y"])],
        [builders.vinfo("x", ["n", 4])], [builders.vinfo("y", ["n", 3])],
        [onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "w")])
    assert not find_layers(model)[0][0].relu


@pytest.mark.parametrize("side, c_shape, refitted", [
    ("right", (6,), True), ("right", (1, 6), True), ("right", (), False),
    ("left", (6, 1), True), ("left", (6,), False)])
def test_which_gemm_biases_are_refitted(side, c_shape, refitted):
    # x W^T + C with C per output (1-D or (1, d_out)); W X + C with C per output only as (d_out, 1)
    rng = np.random.default_rng(12)
    h = onnx.helper
    c = (builders.rand(rng, *c_shape) if c_shape else np.array(1.5, np.float32)) * 3
    if side == "right":
        node, x_shape, y_shape = h.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1), ["N", 10], ["N", 6]
    else:
        node, x_shape, y_shape = h.make_node("Gemm", ["w", "x"], ["y"]), [10, 6], [6, 6]
        node.input.append("c")
    model = builders.make_model([node], [builders.vinfo("x", x_shape)], [builders.vinfo("y", y_shape)],
                                [onnx.numpy_helper.from_array(builders.rand(rng, 6, 10), "w"),
                                 onnx.numpy_helper.from_array(c.astype(np.float32), "c")])
    x = builders.rand(rng, 64, 10) + 0.5 if side == "right" else builders.rand(rng, 10, 6) + 0.5  # one batch
    result = prune(model, 0.6, method="dc", calib={"x": x.astype(np.float32)}, verify=False)
    new_c = onnx.numpy_helper.to_array(result.model.graph.initializer[1])
    assert new_c.shape == c.shape
    assert (not np.array_equal(new_c, c)) == refitted
    assert ("bias refitted" in result.report.layers[0].note) == refitted


def test_a_layer_fitted_to_few_calibration_rows_gets_a_note():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    with np.load(MODELS / "digits_calib.npz") as z:
        x = z["input"]
    one = prune(model, 0.8, method="dc", calib={"input": x[:1]}, verify=False)
    assert any("few calibration rows" in n and "fc.weight (1 for 512 inputs)" in n for n in one.report.notes)
    enough = prune(model, 0.8, method="dc", calib={"input": x[:64]}, verify=False)
    assert not any("few calibration rows" in n for n in enough.report.notes)


def test_a_misnamed_array_in_a_file_is_named_though_it_is_not_read(tmp_path):
    np.savez(tmp_path / "d.npz", inptu=cnn_data(4)["input"])
    with pytest.raises(OnnxPruneError, match=r"no array for model input\(s\) 'input' \(arrays found: inptu\)"):
        load_calibration(tmp_path / "d.npz", builders.cnn_with_batchnorm(), None)
