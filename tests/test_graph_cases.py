"""Graph forms real exporters and converters write, each pruned end to end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
from onnxprune import OnnxPruneError, prune
from onnxprune.graph import find_layers
from onnxprune.modelio import node_label


def _model(nodes, inputs, outputs, tensors, opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _tensor(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_gemm_with_a_scalar_c_and_one_output():
    rng = np.random.default_rng(0)
    model = _model([helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1)],
                   [_value("x", ["N", 16])], [_value("y", ["N", 1])],
                   {"W": rng.standard_normal((1, 16)).astype(np.float32), "C": np.array(0.3, np.float32)})
    for method in ("dc", "ltp"):  # raised IndexError on the 0-d C
        result = prune(model, 0.5, method=method, calib="random", verify=False)
        assert result.report.zeros == 8


def test_left_matmul_bias_over_columns_is_not_refitted():
    # y = W @ x + b: a 1-D b adds per column of x, not per output row of W, even when W is square
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((16, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["W", "x"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                   [_value("x", ["N", 16, 16])], [_value("y", ["N", 16, 16])], {"W": w, "b": b})
    data = {"x": (rng.standard_normal((64, 16, 16)) + 3).astype(np.float32)}
    for method in ("dc", "ltp"):
        result = prune(model, 0.6, method=method, calib=data, verify=False)
        assert np.array_equal(_tensor(result.model, "b"), b)
        assert "bias refitted" not in result.report.layers[0].note
    # (16, 1) is per output row: refitted
    model = _model([helper.make_node("MatMul", ["W", "x"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                   [_value("x", ["N", 16, 16])], [_value("y", ["N", 16, 16])], {"W": w, "b": b.reshape(16, 1)})
    result = prune(model, 0.6, method="dc", calib=data, verify=False)
    assert not np.array_equal(_tensor(result.model, "b"), b.reshape(16, 1))


def test_recurrent_weights_are_named_as_skipped():
    # an LSTM's W and R are not Conv / Gemm / MatMul weights: left alone, but said so
    rng = np.random.default_rng(0)
    hidden, d = 4, 3
    model = _model([helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=hidden),
                    helper.make_node("Reshape", ["y", "shape"], ["flat"]),
                    helper.make_node("MatMul", ["flat", "fc"], ["out"])],
                   [_value("x", [5, 1, d])], [_value("out", [5, 2])],
                   {"W": rng.standard_normal((1, 4 * hidden, d)).astype(np.float32),
                    "R": rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32),
                    "B": np.zeros((1, 8 * hidden), np.float32), "shape": np.array([5, hidden], np.int64),
                    "fc": rng.standard_normal((hidden, 2)).astype(np.float32)})
    layers, skipped = find_layers(model)
    assert [layer.name for layer in layers] == ["fc"]
    assert {s.name for s in skipped if "LSTM weight" in s.reason} == {"W", "R"}
    result = prune(model, 0.5, verify=False)
    assert "skipped W, R: LSTM weight" in result.report.format()
    included, _ = find_layers(model, include="^W$")
    assert {layer.name for layer in included} == {"W", "fc"}


def test_constant_value_floats_weights_are_pruned():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(8).astype(np.float32)
    model = _model([helper.make_node("Constant", [], ["w2"], value_floats=w.tolist()),
                    helper.make_node("MatMul", ["x", "w2"], ["y0"]),
                    helper.make_node("Constant", [], ["scale"], value_float=0.5),  # no weight
                    helper.make_node("Mul", ["y0", "scale"], ["y"])],
                   [_value("x", ["N", 8])], [_value("y", ["N"])], {})
    before = model.SerializeToString()
    result = prune(model, 0.5)
    assert model.SerializeToString() == before  # the caller's proto is untouched
    assert [row.name for row in result.report.layers] == ["w2"]
    value = result.model.graph.node[0].attribute[0]
    assert value.name == "value"
    assert result.model.graph.node[2] == model.graph.node[2]  # left as it was written
    pruned = numpy_helper.to_array(value.t)
    assert np.count_nonzero(pruned == 0) == 4 and np.array_equal(pruned[pruned != 0], w[pruned != 0])


def _int8(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int8), name)


def test_quantized_weights_are_named_and_activations_are_not():
    rng = np.random.default_rng(0)
    scale, zero = np.array(0.1, np.float32), np.array(0, np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),  # an activation Q / DQ
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]),  # the weight's DQ
             helper.make_node("MatMul", ["xd", "w"], ["h"]),
             helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
             helper.make_node("MatMulInteger", ["hq", "bq"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [_value("x", ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 3])],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z"),
         _int8("wq", rng.integers(-9, 9, (4, 4))), _int8("bq", rng.integers(-9, 9, (4, 3)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    layers, skipped = find_layers(model)
    assert layers == []
    assert {s.name for s in skipped} == {"wq", "bq"}  # not xq, hq: those are activations
    import pytest

    from onnxprune import OnnxPruneError
    with pytest.raises(OnnxPruneError, match="2 quantized weights found.*prune the model before"):
        prune(model, 0.5)


def test_duplicate_initializer_names_are_an_error():
    import pytest

    from onnxprune import OnnxPruneError
    w = np.ones((4, 4), np.float32)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_value("x", ["N", 4])],
                   [_value("y", ["N", 4])], {"W": w})
    model.graph.initializer.append(numpy_helper.from_array(2 * w, "W"))
    with pytest.raises(OnnxPruneError, match="initializer name 'W' is used more than once"):
        prune(model, 0.5)


def test_input_size_is_reported_for_bytes_and_protos(tmp_path):
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_value("x", ["N", 4])],
                   [_value("y", ["N", 4])], {"W": np.ones((4, 4), np.float32)})
    onnx.save(model, tmp_path / "m.onnx")
    size = (tmp_path / "m.onnx").stat().st_size
    for source in (model, model.SerializeToString(), str(tmp_path / "m.onnx")):
        assert prune(source, 0.5, verify=False).report.input_bytes == size


def test_sparse_storage_round_trips_every_float_type(tmp_path):
    import ml_dtypes
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    for np_type, onnx_type in ((np.float16, TensorProto.FLOAT16), (ml_dtypes.bfloat16, TensorProto.BFLOAT16),
                               (np.float64, TensorProto.DOUBLE), (np.float32, TensorProto.FLOAT)):
        w = (rng.standard_normal((64, 32)) * 3).astype(np_type)
        w[0, 0], w[0, 1] = -0.0, np.array(-1e-3).astype(np_type)  # sign bits survive
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
            [helper.make_tensor_value_info("x", onnx_type, ["N", 64])],
            [helper.make_tensor_value_info("y", onnx_type, ["N", 32])],
            [numpy_helper.from_array(w, "W")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        dense = prune(model, 0.8, verify=False).model
        prune(model, 0.8, storage_format="sparse", output=tmp_path / "s.onnx", verify=False, force=True)
        saved = onnx.load(tmp_path / "s.onnx")
        onnx.checker.check_model(saved)
        (sparse,) = saved.graph.sparse_initializer
        values = numpy_helper.to_array(sparse.values)
        restored = np.zeros(64 * 32, values.dtype)
        restored[numpy_helper.to_array(sparse.indices)] = values
        expected = numpy_helper.to_array(dense.graph.initializer[0]).reshape(-1)
        assert np.array_equal(restored.view(np.uint8), expected.view(np.uint8))
        if onnx_type != TensorProto.BFLOAT16:  # no bfloat16 MatMul in onnxruntime's CPU build
            x = rng.standard_normal((3, 64)).astype(np_type)
            outs = [ort.InferenceSession(m).run(None, {"x": x})[0]
                    for m in (str(tmp_path / "s.onnx"), dense.SerializeToString())]
            np.testing.assert_array_equal(outs[0], outs[1])


def test_sequential_trail_level_equals_its_single_run_with_a_shared_biased_weight():
    rng = np.random.default_rng(0)
    model = _model([helper.make_node("Gemm", ["x", "W", "b"], ["h1"], transB=1),
                    helper.make_node("Relu", ["h1"], ["r"]),
                    helper.make_node("Gemm", ["r", "W", "b"], ["h2"], transB=1),  # W and b again
                    helper.make_node("Gemm", ["h2", "W2"], ["y"], transB=1)],
                   [_value("x", ["N", 8])], [_value("y", ["N", 3])],
                   {"W": rng.standard_normal((8, 8)).astype(np.float32),
                    "b": rng.standard_normal(8).astype(np.float32),
                    "W2": rng.standard_normal((3, 8)).astype(np.float32)})
    data = {"x": rng.standard_normal((64, 8)).astype(np.float32)}
    trail = prune(model, [0.5, 0.8], method="dc", calib=data, sequential=True, verify=False)
    single = prune(model, 0.8, method="dc", calib=data, sequential=True, verify=False)
    for a, b in zip(trail[1].model.graph.initializer, single.model.graph.initializer):
        assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)), a.name


def test_subgraph_reusing_an_outer_tensor_name_keeps_each_layer_its_own_data():
    # an If body may hold its own "W" and "b" (legal); they must not stand in for the outer
    # graph's W and b in the bias, the statistics or the sparse storage (all were keyed by name)
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)

    def model(with_if):
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])]
        outputs, tensors = [_value("y", ["N", 8])], {"W": w, "b": b}
        if with_if:
            def branch(name, shape):
                return helper.make_graph(
                    [helper.make_node("Gemm", ["x", "W", "b"], [name], transB=1)], name, [],
                    [_value(name, ["N", shape[0]])],
                    [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "W"),
                     numpy_helper.from_array(np.full(shape[0], 100, np.float32), "b")])
            nodes += [helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
                      helper.make_node("Greater", ["sx", "zero"], ["c"]),
                      helper.make_node("If", ["c"], ["z"], then_branch=branch("t", (3, 8)),
                                       else_branch=branch("e", (3, 8)))]
            outputs.append(_value("z", ["N", 3]))
            tensors["zero"] = np.array(0, np.float32)
        return _model(nodes, [_value("x", ["N", 8])], outputs, tensors)

    data = {"x": rng.standard_normal((200, 8)).astype(np.float32)}
    for kw in (dict(method="dc", allocation="uniform"), dict(method="layer", refit=True)):
        alone = prune(model(False), 0.5, calib=data, verify=False, **kw).model
        beside = prune(model(True), 0.5, calib=data, verify=False, storage_format="sparse", **kw)
        (sparse,) = [s for s in beside.model.graph.sparse_initializer if s.values.name == "W"]
        values = numpy_helper.to_array(sparse.values)
        restored = np.zeros(64, np.float32)
        restored[numpy_helper.to_array(sparse.indices)] = values
        assert np.array_equal(restored.reshape(8, 8), _tensor(alone, "W"))
        assert np.array_equal(_tensor(beside.model, "b"), _tensor(alone, "b"))
        assert len(beside.report.layers) == 3


def test_random_stand_in_data_is_random_for_every_float_type():
    import ml_dtypes

    from onnxprune.data import random_array
    for dtype in (np.float16, np.float32, ml_dtypes.bfloat16):  # bfloat16 was filled with ones
        values = random_array(dtype, (1000,), np.random.default_rng(0)).astype(np.float32)
        assert 0.8 < values.std() < 1.2
    assert (random_array(np.int64, (5,), np.random.default_rng(0)) == 1).all()


def test_fake_quantized_float_weights_are_named():
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["W", "s", "z"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    model = _model(nodes, [_value("x", ["N", 4])], [_value("y", ["N", 4])],
                   {"W": w, "s": np.array(0.05, np.float32), "z": np.array(0, np.int8)})
    layers, skipped = find_layers(model)
    assert layers == [] and [s.name for s in skipped] == ["W"] and "--include" in skipped[0].reason
    assert [layer.name for layer in find_layers(model, include="^W$")[0]] == ["W"]


def test_a_weight_split_into_parts_is_pruned_by_magnitude():
    # torch's dynamo export of cross-attention: in_proj_weight -> Split -> Transpose -> q / k MatMuls
    rng = np.random.default_rng(40)
    nodes = [helper.make_node("Split", ["in_proj", "sizes"], ["wq", "wk"], axis=0),
             helper.make_node("Transpose", ["wq"], ["wq_t"], perm=[1, 0]),
             helper.make_node("Transpose", ["wk"], ["wk_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wq_t"], ["q"]), helper.make_node("MatMul", ["m", "wk_t"], ["k"]),
             helper.make_node("Add", ["q", "k"], ["y"])]
    model = _model(nodes, [_value("x", ["N", 8]), _value("m", ["N", 8])], [_value("y", ["N", 8])],
                   {"in_proj": rng.standard_normal((16, 8)).astype(np.float32),
                    "sizes": np.array([8, 8], np.int64)})
    layers, _ = find_layers(model)
    assert [(layer.name, layer.layout_known) for layer in layers] == [("in_proj", False)]
    result = prune(model, 0.5, method="dc", calib="random")
    pruned = _tensor(result.model, "in_proj")
    dense = _tensor(model, "in_proj")
    assert result.report.zeros == 64 and np.array_equal(pruned != 0, np.abs(dense) >= np.median(np.abs(dense)))
    assert any("without calibration statistics" in note for note in result.report.notes)


def test_dynamo_module_paths_name_layers_and_select_them():
    rng = np.random.default_rng(41)
    nodes = [helper.make_node("MatMul", ["x", "val_7"], ["h"], name="node_MatMul_4"),
             helper.make_node("MatMul", ["h", "val_9"], ["y"], name="node_MatMul_6")]
    for node, scopes in zip(nodes, ("['', 'blocks.0', 'qkv', 'linear']", "['', 'head', 'linear_1']")):
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes)
    model = _model(nodes, [_value("x", ["N", 8])], [_value("y", ["N", 8])],
                   {"val_7": rng.standard_normal((8, 8)).astype(np.float32),
                    "val_9": rng.standard_normal((8, 8)).astype(np.float32)})
    layers, _ = find_layers(model, exclude="head")
    assert [(layer.name, layer.node) for layer in layers] == [("val_7", "/blocks.0/qkv/linear")]
    table = prune(model, 0.5, verify=False).report.format()
    assert "/blocks.0/qkv/linear " in table and "val_7" not in table  # generated names: the module's
    # torch 2.13 writes every level's full name: the innermost module's is kept
    nodes[0].metadata_props[0].value = "['', 'bert', 'bert.encoder', 'bert.encoder.layer.0', 'linear']"
    assert node_label(nodes[0]) == "/bert.encoder.layer.0/linear"
    excluded = prune(model, 0.5, exclude="head", verify=False).report.format()
    assert "skipped /head/linear_1: excluded by --exclude" in excluded  # not val_9


def test_weights_used_otherwise_are_named_and_noted():
    rng = np.random.default_rng(42)
    function = helper.make_function(
        "local", "Head", ["a"], ["b"],
        [helper.make_node("Constant", [], ["wh"], value=numpy_helper.from_array(
            rng.standard_normal((8, 8)).astype(np.float32))), helper.make_node("MatMul", ["a", "wh"], ["b"])],
        [helper.make_opsetid("", 13)])
    nodes = [helper.make_node("Einsum", ["x", "we"], ["e"], equation="ni,ii->ni"),  # W's diagonal
             helper.make_node("Head", ["e"], ["f"], domain="local"),
             helper.make_node("MatMul", ["f", "w"], ["g"]), helper.make_node("Mul", ["w", "w"], ["w2"]),
             helper.make_node("Gather", ["table", "ids"], ["t"]), helper.make_node("MatMul", ["g", "table_t"], ["o"]),
             helper.make_node("Transpose", ["table"], ["table_t"])]
    graph = helper.make_graph(nodes, "g", [_value("x", ["N", 8]), helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [_value("o", ["N", 5]), _value("w2", [8, 8]), _value("t", [3, 8])],
                              [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
                               for n, s in (("we", (8, 8)), ("w", (8, 8)), ("table", (5, 8)))])
    model = helper.make_model(graph, functions=[function], ir_version=8, opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid("local", 1)])
    layers, skipped = find_layers(model)
    reasons = {s.name: s.reason for s in skipped}
    assert [layer.name for layer in layers] == ["w"]
    assert layers[0].notes == ["also used by Mul:w2, which sees the pruned values"]
    assert reasons["we"].startswith("used by Einsum")
    assert reasons["Head/wh"] == "inside model-local function 'Head', which onnxprune does not look into"
    assert "also the weight of MatMul" in reasons["table"]  # a tied output layer
    included = {layer.name: layer.notes for layer in find_layers(model, include="^table$")[0]}
    assert included["table"] == ["also the weight of MatMul:o (a tied output layer): pruned by magnitude, for both uses"]


def test_a_bias_two_layers_share_is_kept_as_it_is():
    # exporters merge equal initializers: fc2 and fc3 both read fc2.bias
    rng = np.random.default_rng(43)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b"], ["y"], transB=1)]
    model = _model(nodes, [_value("x", ["N", 8])], [_value("y", ["N", 8])],
                   {"w1": rng.standard_normal((8, 8)).astype(np.float32),
                    "w2": rng.standard_normal((8, 8)).astype(np.float32),
                    "b": rng.standard_normal(8).astype(np.float32)})
    for method in ("dc", "ltp"):
        result = prune(model, 0.5, method=method, calib="random")
        assert np.array_equal(_tensor(result.model, "b"), _tensor(model, "b"))
        notes = {row.name: row.note for row in result.report.layers}
        assert notes["w1"].endswith("bias also used by Gemm:y: kept as it is"), notes
        assert notes["w2"].endswith("bias also used by Gemm:h: kept as it is"), notes


def test_a_bias_a_non_layer_node_also_uses_is_kept_as_it_is():
    # b is the fc layer's bias and an offset added elsewhere: refitting it would change that sum
    rng = np.random.default_rng(45)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["y"]),
             helper.make_node("Mul", ["x", "b"], ["z"])]
    model = _model(nodes, [_value("x", ["N", 8])], [_value("y", ["N", 8]), _value("z", ["N", 8])],
                   {"w": rng.standard_normal((8, 8)).astype(np.float32),
                    "b": rng.standard_normal(8).astype(np.float32)})
    for method in ("dc", "ltp"):
        result = prune(model, 0.5, method=method, calib="random", refit=method == "ltp")
        assert np.array_equal(_tensor(result.model, "b"), _tensor(model, "b"))
        assert result.report.layers[0].note.endswith("bias also used by Mul:z: kept as it is")
    # the same weight used twice with its own bias each time: refitted for both uses together
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
             helper.make_node("MatMul", ["y", "w"], ["h2"]), helper.make_node("Add", ["h2", "b"], ["z"])]
    model = _model(nodes, [_value("x", ["N", 8])], [_value("z", ["N", 8])],
                   {"w": rng.standard_normal((8, 8)).astype(np.float32),
                    "b": rng.standard_normal(8).astype(np.float32)})
    result = prune(model, 0.5, method="dc", calib="random")
    assert not np.array_equal(_tensor(result.model, "b"), _tensor(model, "b"))
    assert result.report.layers[0].note == "bias refitted"


def test_weights_behind_pass_through_ops_get_no_other_use_notes():
    # Transpose(W) -> MatMul and a table used by Add and by Gather: no false "also used" / "tied"
    rng = np.random.default_rng(44)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["h"]),
             helper.make_node("Add", ["T", "pos"], ["tp"]),
             helper.make_node("Gather", ["T", "ids"], ["g"])]
    model = _model(nodes, [_value("x", ["N", 8]), _value("pos", [5, 8]),
                           helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                   [_value("h", ["N", 8]), _value("tp", [5, 8]), _value("g", [3, 8])],
                   {"W": rng.standard_normal((8, 8)).astype(np.float32),
                    "T": rng.standard_normal((5, 8)).astype(np.float32)})
    layers, skipped = find_layers(model)
    assert [(layer.name, layer.notes) for layer in layers] == [("W", [])]
    assert {s.name: s.reason for s in skipped} == {"T": "embedding table: --include prunes it"}


def test_include_exclude_patterns_are_each_their_own_regex():
    model = builders.mlp_gemm()  # 0.weight, 0.bias, 2.weight, 2.bias
    def names(**kw):
        return [layer.name for layer in find_layers(model, **kw)[0]]

    assert names(exclude=["(?i)^0\\.WEIGHT"]) == ["2.weight"]  # inline flags in one of several
    assert names(exclude=[""], include="") == ["0.weight", "2.weight"]  # empty: no pattern
    assert names(exclude=["(a)\\1|^0\\.w", "(b)\\1|^2\\.w"], include=["bias"]) == ["0.bias", "2.bias"]


def test_a_model_without_prunable_weights_names_what_it_left_alone():
    rng = np.random.default_rng(45)
    model = _model([helper.make_node("Einsum", ["x", "w"], ["y"], equation="ni,io->n")],
                   [_value("x", ["N", 8])], [_value("y", ["N"])],
                   {"w": rng.standard_normal((8, 4)).astype(np.float32)})
    with pytest.raises(OnnxPruneError, match="no prunable weights found.*; left alone: w: used by Einsum"):
        prune(model, 0.5)


def test_a_weight_passed_through_into_a_subgraph_can_still_be_included():
    # W -> Transpose -> Wt, used only inside an If branch: the outer graph's walk cannot trace it
    rng = np.random.default_rng(46)
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "Wt"], ["yb"])], "b", [],
                               [_value("yb", ["N", 4])])
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [_value("x", ["N", 8]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [_value("y", ["N", 4])], [numpy_helper.from_array(
                                  rng.standard_normal((4, 8)).astype(np.float32), "W")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
    assert [s.name for s in find_layers(model)[1]] == ["W"]
    assert [layer.name for layer in find_layers(model, include="^W$")[0]] == ["W"]


def test_a_conv_bias_added_after_the_conv_and_a_relu_behind_identity_are_found():
    # paddle2onnx: Conv without B -> Add of a (1, C, 1, 1) constant -> Identity -> Relu
    rng = np.random.default_rng(46)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b"], ["a"]),
             helper.make_node("Identity", ["a"], ["i"]),
             helper.make_node("Relu", ["i"], ["y"])]
    tensors = {"w": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
               "b": rng.standard_normal((1, 4, 1, 1)).astype(np.float32)}
    model = _model(nodes, [_value("x", ["N", 2, 5, 5])], [_value("y", ["N", 4, 5, 5])], tensors)
    (layer,), _ = find_layers(model)
    assert layer.bias is not None and layer.bias.name == "b" and layer.relu
    result = prune(model, 0.5, method="dc", calib="random")
    assert not np.array_equal(_tensor(result.model, "b"), tensors["b"])  # refitted, in its own shape
    assert _tensor(result.model, "b").shape == (1, 4, 1, 1)
    # a (C,) constant broadcasts along the last axis (W = 4 here too): not a per-channel bias
    wide = _model(nodes, [_value("x", ["N", 2, 4, 4])], [_value("y", ["N", 4, 4, 4])],
                  {**tensors, "b": rng.standard_normal(4).astype(np.float32)})
    (layer,), _ = find_layers(wide)
    assert layer.bias is None and not layer.relu
    # the value before the ReLU is also a model output: DC must fit it, not only relu(z)
    exposed = _model(nodes, [_value("x", ["N", 2, 5, 5])], [_value("y", ["N", 4, 5, 5]), _value("i", ["N", 4, 5, 5])],
                     tensors)
    (layer,), _ = find_layers(exposed)
    assert layer.bias is not None and not layer.relu


def test_a_kernel_flipped_by_a_slice_is_calibrated_like_the_flipped_initializer():
    # jax2onnx's ConvTranspose: kernel -> Transpose -> Slice(steps -1 on both spatial axes)
    rng = np.random.default_rng(47)
    kernel = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)  # H, W, C_in, C_out
    seen = np.ascontiguousarray(kernel.transpose(2, 3, 0, 1)[:, :, ::-1, ::-1])
    flip = [helper.make_node("Transpose", ["k"], ["kt"], perm=[2, 3, 0, 1]),
            helper.make_node("Slice", ["kt", "starts", "ends", "axes", "steps"], ["kf"]),
            helper.make_node("ConvTranspose", ["x", "kf"], ["y"])]
    bounds = {"starts": np.array([-1, -1], np.int64), "ends": np.array([-2**63, -2**63], np.int64),
              "axes": np.array([2, 3], np.int64), "steps": np.array([-1, -1], np.int64)}
    inputs, outputs = [_value("x", ["N", 4, 5, 5])], [_value("y", ["N", 2, 7, 7])]
    sliced = _model(flip, inputs, outputs, {"k": kernel, **bounds})
    folded = _model([helper.make_node("ConvTranspose", ["x", "k"], ["y"])], inputs, outputs, {"k": seen})
    (layer,), _ = find_layers(sliced)
    assert layer.layout_known and np.array_equal(kernel.reshape(-1)[layer.index], seen)
    calib = {"x": rng.standard_normal((16, 4, 5, 5)).astype(np.float32)}
    a = prune(sliced, 0.5, method="dc", calib=calib)
    b = prune(folded, 0.5, method="dc", calib=calib)
    assert not a.report.notes or "without calibration" not in " ".join(a.report.notes)
    got = _tensor(a.model, "k").transpose(2, 3, 0, 1)[:, :, ::-1, ::-1]
    np.testing.assert_allclose(got, _tensor(b.model, "k"), rtol=1e-5, atol=1e-6)
    # a Slice that leaves elements out is a part of the tensor: named, pruned by magnitude
    part = _model([helper.make_node("Slice", ["k", "s", "e", "a"], ["kp"]),
                   helper.make_node("Transpose", ["kp"], ["kt"], perm=[2, 3, 0, 1]),
                   helper.make_node("ConvTranspose", ["x", "kt"], ["y"])],
                  inputs, [_value("y", ["N", 2, 6, 6])],
                  {"k": kernel, "s": np.array([0], np.int64), "e": np.array([2], np.int64),
                   "a": np.array([0], np.int64)})
    (layer,), _ = find_layers(part)
    assert layer.layout_unknown == "a part of the tensor, through Slice"
    result = prune(part, 0.5, method="dc", calib=calib)
    assert any("k (a part of the tensor, through Slice)" in note for note in result.report.notes)


@pytest.mark.parametrize("equation, transposed", [("bti,io->bto", False), ("bti,oi->bto", True),
                                                   ("io,bti->bto", False), ("...i,io->...o", False)])
def test_an_einsum_that_is_a_matrix_product_is_pruned_as_its_matmul(equation, transposed):
    # flax's nn.Einsum / jnp.einsum dense layers; the same weights as a MatMul get the same result
    rng = np.random.default_rng(49)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # (d_in, d_out)
    slot = 0 if equation.startswith("io") else 1
    inputs = ["w", "x"] if slot == 0 else ["x", "w"]
    einsum = _model([helper.make_node("Einsum", inputs, ["h"], equation=equation),
                     helper.make_node("Add", ["h", "b"], ["y"])],
                    [_value("x", ["N", 3, 6])], [_value("y", ["N", 3, 4])],
                    {"w": w.T.copy() if transposed else w, "b": rng.standard_normal(4).astype(np.float32)}, opset=13)
    matmul = _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                    [_value("x", ["N", 3, 6])], [_value("y", ["N", 3, 4])],
                    {"w": w, "b": _tensor(einsum, "b")})
    (layer,), skipped = find_layers(einsum)
    assert layer.op == "Einsum" and layer.bias is not None and not skipped
    calib = {"x": rng.standard_normal((32, 3, 6)).astype(np.float32)}
    for method, refit in (("dc", False), ("ltp", True), ("global-mt", True)):
        a = prune(einsum, 0.5, method=method, calib=calib, refit=refit)
        b = prune(matmul, 0.5, method=method, calib=calib, refit=refit)
        got = _tensor(a.model, "w")
        np.testing.assert_allclose(got.T if transposed else got, _tensor(b.model, "w"), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_tensor(a.model, "b"), _tensor(b.model, "b"), rtol=1e-5, atol=1e-6)
        assert not any("without calibration" in note for note in a.report.notes)


def test_a_value_an_if_branch_also_reads_is_not_given_the_relu_objective():
    # y = x W feeds a Relu and, implicitly, a branch of an If: DC must fit y, not only relu(y)
    rng = np.random.default_rng(51)
    branch = lambda name: helper.make_graph([helper.make_node("Neg", ["y"], [name])], name, [],  # noqa: E731
                                            [_value(name, ["N", 4])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node("If", ["c"], ["b"], then_branch=branch("t"), else_branch=branch("e"))]
    graph = helper.make_graph(nodes, "g", [_value("x", ["N", 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [_value("r", ["N", 4]), _value("b", ["N", 4])],
                              [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
    (layer,), _ = find_layers(model)
    assert not layer.relu


@pytest.mark.parametrize("low, high, opset, relu", [(0.0, 6.0, 13, True), (0.0, None, 13, True),
                                                    (-1.0, 6.0, 13, False), (0.0, 6.0, 9, True),
                                                    (0.0, 0.0, 13, False)])
def test_a_clip_at_zero_from_below_counts_as_a_relu_for_dc(low, high, opset, relu):
    # MobileNet's ReLU6 is Clip(0, 6): DC's ReLU objective ignores the outputs below 0, as it does
    # (on the reference CNN with its Relus made ReLU6, dc at 0.9 / 0.95: 95.45 / 94.75 % -> 95.60 / 94.85 %)
    rng = np.random.default_rng(48)
    tensors = {"w": rng.standard_normal((4, 2, 3, 3)).astype(np.float32)}
    if opset >= 11:
        tensors["lo"] = np.array(low, np.float32)
        inputs = ["c", "lo"] + ([] if high is None else ["hi"])
        if high is not None:
            tensors["hi"] = np.array(high, np.float32)
        clip = helper.make_node("Clip", inputs, ["y"])
    else:
        clip = helper.make_node("Clip", ["c"], ["y"], min=low, max=high)
    model = _model([helper.make_node("Conv", ["x", "w"], ["c"]), clip], [_value("x", ["N", 2, 5, 5])],
                   [_value("y", ["N", 4, 3, 3])], tensors, opset=opset)
    (layer,), _ = find_layers(model)
    assert layer.relu == relu


def _dense_on_3d(rng, reshaped: bool, split_to=(4, 8)):
    """x (N, 5, 16) -> Dense(32) + ReLU -> Dense(32), its output as (N, 5, 4, 8). `reshaped`: as
    tf2onnx writes it: MatMul on (N*5, 16), Reshape to a shape computed at run time, Add, Relu;
    then MatMul, Reshape to a constant (-1, 5, *split_to) and Add of a constant of that shape."""
    t = {"w1": rng.standard_normal((16, 32)), "b1": rng.standard_normal(32) * 0.5,
         "w2": rng.standard_normal((32, 32)) * 0.3, "b2": rng.standard_normal(32) * 0.5}
    t = {k: v.astype(np.float32) for k, v in t.items()}
    out = [_value("y", ["N", 5, 4, 8])]
    if not reshaped:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
                 helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["h2"]),
                 helper.make_node("Add", ["h2", "b2"], ["a2"]), helper.make_node("Reshape", ["a2", "s"], ["y"])]
        return _model(nodes, [_value("x", ["N", 5, 16])], out, {**t, "s": np.array([-1, 5, 4, 8])})
    t.update(flat=np.array([-1, 16]), c32=np.array([32]), i01=np.array([0, 1]),
             s=np.array([-1, 5, *split_to]), b2=t["b2"].reshape(split_to))
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "w1"], ["h"]),
             helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Gather", ["xs", "i01"], ["lead"]),
             helper.make_node("Concat", ["lead", "c32"], ["shape"], axis=0),
             helper.make_node("Reshape", ["h", "shape"], ["h3"]), helper.make_node("Add", ["h3", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["h2"]),
             helper.make_node("Reshape", ["h2", "s"], ["h4"]), helper.make_node("Add", ["h4", "b2"], ["y"])]
    return _model(nodes, [_value("x", ["N", 5, 16])], [_value("y", ["N", 5, *split_to])], t)


def test_a_bias_added_after_a_reshape_that_keeps_the_channels_is_the_layers():
    # tf2onnx's Dense on 3-D input (Tensordot) and Keras attention's per-head bias: the Add follows
    # a Reshape. The same weights as the plain model get the same result, the bias keeps its shape
    rng = np.random.default_rng(53)
    tf_like, plain = _dense_on_3d(rng, True), _dense_on_3d(np.random.default_rng(53), False)
    first, second = find_layers(tf_like)[0]
    assert (first.bias.name, first.relu, first.channel_split) == ("b1", True, (32,))
    assert (second.bias.name, second.relu, second.channel_split) == ("b2", False, (4, 8))
    calib = {"x": rng.standard_normal((64, 5, 16)).astype(np.float32)}
    for method, refit in (("ltp", True), ("dc", False)):
        a = prune(tf_like, 0.6, method=method, calib=calib, refit=refit)
        b = prune(plain, 0.6, method=method, calib=calib, refit=refit)
        tol = dict(rtol=1e-4, atol=1e-5) if method == "ltp" else dict(rtol=0.05, atol=0.02)  # DC: see test_batchnorm
        for w in ("w1", "w2", "b1"):
            np.testing.assert_allclose(_tensor(a.model, w), _tensor(b.model, w), **tol)
            assert (_tensor(a.model, w) == 0).sum() == (_tensor(b.model, w) == 0).sum()
        assert _tensor(a.model, "b2").shape == (4, 8)
        np.testing.assert_allclose(_tensor(a.model, "b2").reshape(-1), _tensor(b.model, "b2"), **tol)
        assert not np.array_equal(_tensor(a.model, "b2"), _tensor(tf_like, "b2"))  # refitted


@pytest.mark.parametrize("split_to", [(8, 4), (2, 16)])
def test_a_reshape_that_moves_channels_across_axes_keeps_the_add_apart(split_to):
    # (8, 4) still splits the 32 channels, so its (8, 4) constant is a bias; (2, 16) puts half of
    # them into the axis before: a (2, 16) constant still adds per channel, a (16,) one would not
    model = _dense_on_3d(np.random.default_rng(54), True, split_to)
    second = find_layers(model)[0][1]
    assert second.bias is not None and second.channel_split == split_to
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    b2 = next(t for t in bad.graph.initializer if t.name == "b2")
    b2.CopyFrom(numpy_helper.from_array(_tensor(model, "b2").reshape(-1)[:split_to[-1]].copy(), "b2"))
    second = find_layers(bad)[0][1]
    assert second.bias is None and second.channel_split == () and second.output_name == "h2"


def test_a_reshape_with_its_shape_as_an_attribute_is_not_seen_through():
    # Reshape-1 (opset < 5) holds the shape as an attribute: nothing to trace, and no crash
    rng = np.random.default_rng(55)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h"], ["r"], shape=[-1, 6]),
                    helper.make_node("Add", ["r", "b"], ["y"])], [_value("x", ["N", 4])], [_value("y", ["N", 6])],
                   {"w": rng.standard_normal((4, 6)).astype(np.float32), "b": np.ones(6, np.float32)}, opset=4)
    (layer,), _ = find_layers(model)
    assert layer.bias is None and layer.channel_split == ()


def _ms_model(nodes, tensors, out_shape):
    graph = helper.make_graph(nodes, "g", [_value("x", ["N", 4, 8])], [_value("y", out_shape)],
                              [numpy_helper.from_array(v, k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("fused", ["Attention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
                                   "BiasGelu", "FastGelu"])
def test_onnxruntime_fusions_keep_the_layer_and_its_bias(fused):
    # onnxruntime.transformers.optimizer packs Q | K | V into Attention's weight, and moves the
    # biases of the other MatMuls into SkipLayerNormalization / BiasGelu / FastGelu: each is still
    # x W + b, pruned and refitted as the plain MatMul -> Add gives it
    rng = np.random.default_rng(56)
    d_out = 24 if fused == "Attention" else 8
    t = {"w": rng.standard_normal((8, d_out)).astype(np.float32), "b": rng.standard_normal(d_out).astype(np.float32),
         "gamma": np.ones(8, np.float32), "beta": np.zeros(8, np.float32)}
    ms = dict(domain="com.microsoft")
    if fused == "Attention":
        nodes = [helper.make_node("Attention", ["x", "w", "b"], ["y"], num_heads=2, **ms)]
    elif fused == "SkipLayerNormalization":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
                 helper.make_node(fused, ["x", "h", "gamma", "beta", "b"], ["y"], **ms)]
    elif fused == "SkipSimplifiedLayerNormalization":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
                 helper.make_node(fused, ["h", "x", "gamma", "b"], ["y"], **ms)]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node(fused, ["h", "b"], ["y"], **ms)]
    model = _ms_model(nodes, t, ["N", 4, 8])
    plain = _ms_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                      {"w": t["w"], "b": t["b"]}, ["N", 4, d_out])
    (layer,), _ = find_layers(model)
    assert (layer.name, layer.op, layer.bias.name, layer.input_name, layer.relu) == ("w", fused if fused == "Attention" else "MatMul", "b", "x", False)
    calib = {"x": rng.standard_normal((64, 4, 8)).astype(np.float32)}
    for options in (dict(method="dc"), dict(method="layer", refit=True)):
        a, b = (prune(m, 0.6, calib=calib, **options) for m in (model, plain))
        assert a.report.layers[0].note == "bias refitted" and not any("without calibration" in n for n in a.report.notes)
        for name in ("w", "b"):
            np.testing.assert_allclose(_tensor(a.model, name), _tensor(b.model, name), rtol=1e-4, atol=1e-5)


def test_fused_embedding_tables_and_quantized_attention_are_named_for_what_they_are():
    rng = np.random.default_rng(57)
    ms = dict(domain="com.microsoft")
    t = {"word": rng.standard_normal((30, 8)), "pos": rng.standard_normal((16, 8)), "seg": rng.standard_normal((2, 8)),
         "gamma": np.ones(8), "beta": np.zeros(8)}
    t = {k: v.astype(np.float32) for k, v in t.items()}
    nodes = [helper.make_node("EmbedLayerNormalization", ["ids", "segs", "word", "pos", "seg", "gamma", "beta"],
                              ["e", "mask_index"], **ms),
             helper.make_node("QAttention", ["eq", "wq", "bias", "s", "s"], ["y"], num_heads=2, **ms)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.INT32, ["N", 4]) for n in ("ids", "segs")]
                              + [helper.make_tensor_value_info("eq", TensorProto.UINT8, ["N", 4, 8])],
                              [_value("y", ["N", 4, 8])],
                              [numpy_helper.from_array(v, k) for k, v in t.items()]
                              + [_int8("wq", rng.integers(-9, 9, (8, 24))),
                                 numpy_helper.from_array(np.zeros(24, np.float32), "bias"),
                                 numpy_helper.from_array(np.array(0.1, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    layers, skipped = find_layers(model)
    reasons = {s.name: s.reason for s in skipped}
    assert layers == [] and reasons["wq"].startswith("quantized weight")
    assert all(reasons[n].startswith("embedding table") for n in ("word", "pos", "seg"))


def test_a_split_bias_that_varies_along_another_axis_or_a_bn_on_another_axis_is_left_alone():
    rng = np.random.default_rng(58)
    model = _dense_on_3d(rng, True)
    b2 = next(t for t in model.graph.initializer if t.name == "b2")  # (5, 4, 8): one per position too
    b2.CopyFrom(numpy_helper.from_array(rng.standard_normal((5, 4, 8)).astype(np.float32), "b2"))
    assert find_layers(model)[0][1].bias is None
    # MatMul -> Reshape (-1, 8, 8) -> Add (8,) -> BatchNormalization: BN's axis 1 is the sequence
    t = {"w": rng.standard_normal((8, 8)), "b": rng.standard_normal(8), "g": np.r_[0.0, np.ones(7)],
         "beta": rng.standard_normal(8), "mu": np.zeros(8), "var": np.ones(8)}
    t = {k: v.astype(np.float32) for k, v in t.items()}
    bn = _model([helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "w"], ["h"]),
                 helper.make_node("Reshape", ["h", "shp"], ["h3"]), helper.make_node("Add", ["h3", "b"], ["a"]),
                 helper.make_node("BatchNormalization", ["a", "g", "beta", "mu", "var"], ["y"])],
                [_value("x", ["N", 8, 8])], [_value("y", ["N", 8, 8])],
                {**t, "flat": np.array([-1, 8]), "shp": np.array([-1, 8, 8])})
    (layer,), _ = find_layers(bn)
    assert layer.bias is not None and layer.affine is None


def test_onnx_attention_and_other_domains_ops_are_not_onnxruntimes_fusions():
    # opset 23's Attention takes Q, K and V (here K, V constant): no weight; a BiasGelu of another
    # domain adds no bias we know
    rng = np.random.default_rng(59)
    t = {"w": rng.standard_normal((8, 8)).astype(np.float32), "k": rng.standard_normal((1, 4, 8)).astype(np.float32),
         "v": rng.standard_normal((1, 4, 8)).astype(np.float32), "b": np.ones(8, np.float32)}
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["q"]),
                               helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=2)],
                              "g", [_value("x", [1, 4, 8])], [_value("y", [1, 4, 8])],
                              [numpy_helper.from_array(v, k) for k, v in t.items() if k != "b"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    layers, _ = find_layers(model)
    assert [layer.name for layer in layers] == ["w"]
    other = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("BiasGelu", ["h", "b"], ["y"], domain="my.ops")],
        "g", [_value("x", ["N", 8])], [_value("y", ["N", 8])], [numpy_helper.from_array(t["w"], "w"), numpy_helper.from_array(t["b"], "b")]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)], ir_version=8)
    assert find_layers(other)[0][0].bias is None


def test_a_bias_pruned_on_its_own_is_not_refitted_over():
    # --include b prunes the bias by magnitude; a refit of it for the weight would be overwritten
    rng = np.random.default_rng(60)
    w, b = rng.standard_normal((6, 10)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    model = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], [_value("x", ["N", 10])],
                   [_value("y", ["N", 6])], {"w": w, "b": b})
    x = (rng.standard_normal((64, 10)) + 1.0).astype(np.float32)
    result = prune(model, 0.5, method="layer", refit=True, calib={"x": x}, include="^b$")
    notes = {row.name: row.note for row in result.report.layers}
    assert notes["w"] == "bias pruned on its own (--include): not refitted"
    np.testing.assert_array_equal(_tensor(result.model, "b"), np.where(np.abs(b) >= np.sort(np.abs(b))[3], b, 0))


def test_multiheadattentions_qkv_biases_are_refitted_each_in_its_part():
    # MatMul q, k, v -> MultiHeadAttention(q, k, v, [bq | bk | bv]): each layer refits its part,
    # as the plain model's three MatMul -> Add do; a trail writes each level's parts afresh
    rng = np.random.default_rng(61)
    w = {n: rng.standard_normal((8, 8)).astype(np.float32) for n in ("wq", "wk", "wv")}
    b = rng.standard_normal(24).astype(np.float32)
    mm = [helper.make_node("MatMul", ["x", n], [n[1]]) for n in ("wq", "wk", "wv")]
    fused = _ms_model(mm + [helper.make_node("MultiHeadAttention", ["q", "k", "v", "b"], ["y"], num_heads=2,
                                             domain="com.microsoft")], {**w, "b": b}, ["N", 4, 8])
    parts = {f"b{n}": b[8 * i:8 * i + 8] for i, n in enumerate("qkv")}
    plain = _ms_model(mm + [helper.make_node("Add", [n, f"b{n}"], [f"{n}b"]) for n in "qkv"]
                      + [helper.make_node("MultiHeadAttention", ["qb", "kb", "vb"], ["y"], num_heads=2, domain="com.microsoft")],
                      {**w, **parts}, ["N", 4, 8])
    assert [layer.bias_part for layer in find_layers(fused)[0]] == [(0, 8), (8, 16), (16, 24)]
    calib = {"x": rng.standard_normal((64, 4, 8)).astype(np.float32)}
    for options in (dict(method="dc"), dict(method="layer", refit=True)):
        a, p = (prune(m, [0.5, 0.7], calib=calib, **options) for m in (fused, plain))
        single = prune(fused, 0.7, calib=calib, **options)
        for level_a, level_p in zip(a, p):
            for n in ("wq", "wk", "wv"):
                np.testing.assert_allclose(_tensor(level_a.model, n), _tensor(level_p.model, n), rtol=1e-4, atol=1e-5)
            got = _tensor(level_a.model, "b")
            want = np.concatenate([_tensor(level_p.model, f"b{n}") for n in "qkv"])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            assert not np.array_equal(got, b)
        np.testing.assert_array_equal(_tensor(a[1].model, "b"), _tensor(single.model, "b"))


def test_one_weight_feeding_two_parts_of_a_multiheadattention_bias_is_two_different_uses():
    # q = x W, k = ctx W: the uses add different parts of MHA's bias, so W is no one-bias layer
    rng = np.random.default_rng(62)
    t = {"w": rng.standard_normal((8, 8)).astype(np.float32), "wv": rng.standard_normal((8, 12)).astype(np.float32),
         "b": rng.standard_normal(28).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"]), helper.make_node("MatMul", ["x", "w"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("MultiHeadAttention", ["q", "k", "v", "b"], ["y"], num_heads=2, domain="com.microsoft")]
    w, wv = find_layers(_ms_model(nodes, t, ["N", 4, 12]))[0]
    assert w.uses_differ and (wv.bias_part, wv.bias.name) == ((16, 28), "b")  # V wider than Q and K
