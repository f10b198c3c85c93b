"""End-to-end pruning of exported-model shapes: exact sparsity, runs in onnxruntime, rest untouched."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
from onnxprune import OnnxPruneError, prune, storage, verify
from onnxprune.graph import find_layers
from onnxprune.modelio import iter_graphs, iter_tensors, load_model

ALL_BUILDERS = {
    "cnn_bn": builders.cnn_with_batchnorm,
    "mlp_gemm": builders.mlp_gemm,
    "mlp_matmul": builders.mlp_matmul,
    "constant": builders.constant_weights,
    "if_subgraph": builders.if_subgraph,
    "shared": builders.shared_weight,
    "fp16": builders.half_precision,
    "embedding": builders.embedding_and_layernorm,
}


def tensors_by_name(model):
    """name -> array for initializers and Constant values (Constant keyed by its output)."""
    out = {}
    for g in iter_graphs(model.graph):
        for tensor in g.initializer:
            out[tensor.name] = numpy_helper.to_array(tensor)
        for node in g.node:
            if node.op_type == "Constant":
                out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def without_tensor_data(model):
    """A copy with every tensor's data cleared: what must stay identical after pruning."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in iter_tensors(copy):
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
    return copy


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
@pytest.mark.parametrize("method", ["layer", "global", "global-mt"])
def test_prune_exact_runs_and_keeps_the_rest(tmp_path, name, method):
    model = ALL_BUILDERS[name]()
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    sparsity = 0.7
    result = prune(path, sparsity, method=method, output=tmp_path / "out.onnx", min_keep=0.5)
    assert path.read_bytes() == before, "the input must never be modified"
    report = result.report
    layers, _ = find_layers(model)
    sizes = [layer.size for layer in layers]
    if method == "layer":
        assert [r.zeros_after for r in report.layers] == [round(sparsity * n) for n in sizes]
    else:
        assert report.zeros == round(sparsity * sum(sizes))
    assert report.verification is not None and report.verification["max_abs_diff"]

    out = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(out)
    assert without_tensor_data(out) == without_tensor_data(model)
    old, new = tensors_by_name(model), tensors_by_name(out)
    pruned = {r.name for r in report.layers}
    for key, value in old.items():
        if key in pruned:
            kept = new[key] != 0
            assert np.array_equal(new[key][kept].view(np.uint8), value[kept].view(np.uint8))
        else:
            assert np.array_equal(new[key], value), key


def test_cnn_global_matches_torch_global_unstructured(tmp_path):
    import torch
    from torch.nn.utils import prune as tprune

    model = builders.cnn_with_batchnorm()
    layers, _ = find_layers(model)
    assert [layer.op for layer in layers] == ["Conv", "Conv", "Gemm"]
    weights = [numpy_helper.to_array(layer.tensor) for layer in layers]
    result = prune(model, 0.8, method="global", verify=False)
    ours = [numpy_helper.to_array(layer_t) != 0 for layer_t in
            (t for t in result.model.graph.initializer if t.name in {l.name for l in layers})]
    holders = [torch.nn.Module() for _ in weights]
    for holder, w in zip(holders, weights):
        holder.weight = torch.nn.Parameter(torch.from_numpy(w.copy()))
    tprune.global_unstructured([(h, "weight") for h in holders], tprune.L1Unstructured,
                               amount=round(0.8 * sum(w.size for w in weights)))
    theirs = {layer.name: h.weight_mask.numpy() != 0 for layer, h in zip(layers, holders)}
    by_name = {t.name: numpy_helper.to_array(t) != 0 for t in result.model.graph.initializer}
    for layer in layers:
        assert np.array_equal(by_name[layer.name], theirs[layer.name])
    assert len(ours) == 3


def test_found_weights_and_skips():
    layers, skipped = find_layers(builders.embedding_and_layernorm())
    assert [layer.name for layer in layers] == ["head"]
    reasons = {s.name: s.reason for s in skipped}
    assert "embed" in reasons and "int8_w" in reasons and "INT8" in reasons["int8_w"]
    layers, _ = find_layers(builders.embedding_and_layernorm(), include="Gather|LayerNorm")
    assert sorted(layer.name for layer in layers) == ["embed", "head", "ln_bias", "ln_scale"]
    layers, skipped = find_layers(builders.cnn_with_batchnorm(), exclude="Gemm")
    assert [layer.op for layer in layers] == ["Conv", "Conv"]
    assert any("exclude" in s.reason for s in skipped)


def test_matmul_orientation_and_subgraphs():
    layers, _ = find_layers(builders.mlp_matmul())
    assert [layer.op for layer in layers] == ["MatMul", "MatMul"]
    assert all(layer.name.startswith("onnx::MatMul") for layer in layers)
    assert layers[0].shape == (12, 24) and layers[0].relu and layers[0].bias is not None
    layers, _ = find_layers(builders.if_subgraph())
    names = sorted(layer.name for layer in layers)
    assert names == ["else_w", "outer_w", "then_w"]  # the shared outer weight counted once
    layers, _ = find_layers(builders.shared_weight())
    assert len(layers) == 1 and layers[0].consumers == ["MatMul", "MatMul"]


def test_if_subgraph_output_runs_both_branches(tmp_path):
    onnx.save(builders.if_subgraph(), tmp_path / "m.onnx")
    prune(tmp_path / "m.onnx", 0.5, output=tmp_path / "o.onnx")
    session = ort.InferenceSession(str(tmp_path / "o.onnx"))
    x = np.ones((2, 8), np.float32)
    for flag in (True, False):
        assert session.run(None, {"x": x, "flag": np.array(flag)})[0].shape == (2, 8)


def test_bfloat16_bit_identical_kept_values():
    model = builders.half_precision(elem=TensorProto.BFLOAT16)
    w = numpy_helper.to_array(model.graph.initializer[0])
    result = prune(model, 0.5, method="global", verify=False)
    new = numpy_helper.to_array(result.model.graph.initializer[0])
    assert new.dtype == w.dtype and np.count_nonzero(new == 0) == 64
    keep = new != 0
    assert np.array_equal(new.view(np.uint16)[keep], w.view(np.uint16)[keep])


def test_external_data_round_trip(tmp_path):
    model = builders.mlp_gemm()
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    inputs = sorted(p.name for p in tmp_path.iterdir())
    result = prune(tmp_path / "ext.onnx", 0.6, output=tmp_path / "out.onnx")
    assert sorted(result.report.output_files) == sorted([str(tmp_path / "out.onnx"), str(tmp_path / "out.onnx.data")])
    assert all(n in {p.name for p in tmp_path.iterdir()} for n in inputs)
    reloaded = load_model(tmp_path / "out.onnx")
    assert reloaded.data_files == [tmp_path / "out.onnx.data"]
    ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, {"input": np.ones((1, 20), np.float32)})


def test_sparse_storage_checker_and_ort(tmp_path):
    onnx.save(builders.cnn_with_batchnorm(), tmp_path / "m.onnx")
    result = prune(tmp_path / "m.onnx", 0.9, storage_format="sparse", output=tmp_path / "s.onnx")
    out = onnx.load(tmp_path / "s.onnx")
    onnx.checker.check_model(out)
    dense = prune(tmp_path / "m.onnx", 0.9, output=tmp_path / "d.onnx")
    pruned = {r.name for r in result.report.layers}
    smaller = {t.name for t in dense.model.graph.initializer if t.name in pruned
               and storage._as_sparse(t, numpy_helper.to_array(t).reshape(-1)).ByteSize() < t.ByteSize()}
    assert smaller and {s.values.name for s in out.graph.sparse_initializer} == smaller
    for s in out.graph.sparse_initializer:  # typed fields: onnx-graphsurgeon reads raw ones as zeros
        assert s.indices.data_type == TensorProto.INT64 and not s.indices.HasField("raw_data")
        assert len(s.values.float_data) == s.values.dims[0] and not s.values.HasField("raw_data")
    import onnx_graphsurgeon as gs
    read = {t.name: t.values for t in gs.import_onnx(out).tensors().values() if isinstance(t, gs.Constant)}
    for t in dense.model.graph.initializer:
        if t.name in smaller:
            np.testing.assert_array_equal(np.asarray(read[t.name], np.float32), numpy_helper.to_array(t))
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    ys = [ort.InferenceSession(str(tmp_path / f)).run(None, {"input": x})[0] for f in ("s.onnx", "d.onnx")]
    np.testing.assert_array_equal(ys[0], ys[1])
    assert result.report.output_bytes < dense.report.output_bytes


def test_in_memory_model_is_not_modified():
    model = builders.mlp_gemm()
    snapshot = model.SerializeToString()
    result = prune(model, 0.5)
    assert model.SerializeToString() == snapshot
    assert result.report.zeros == round(0.5 * result.report.params)


def test_already_zero_weights_count(tmp_path):
    model = builders.shared_weight()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.reshape(-1)[:10] = 0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    result = prune(model, 0.5, method="layer", verify=False)
    row = result.report.layers[0]
    assert row.zeros_before == 10 and row.zeros_after == 18
    result = prune(model, 0.25, method="layer", verify=False)
    assert result.report.layers[0].zeros_after == 10  # cannot un-zero: the realised sparsity is reported


def test_integer_only_model_has_nothing_to_prune():
    with pytest.raises(OnnxPruneError, match="no prunable weights"):
        prune(builders.int_weights(), 0.5)


def test_pass_through_chain_and_old_ir_initializer_inputs(tmp_path):
    """Weight -> Cast -> Reshape -> Unsqueeze -> Squeeze -> Transpose -> MatMul; the weight is
    also listed as a graph input (old IR style) and still counts as a weight."""
    rng = np.random.default_rng(9)
    w = numpy_helper.from_array(rng.standard_normal(48).astype(np.float16), "w_flat")
    shape = numpy_helper.from_array(np.array([6, 8], np.int64), "shape")
    nodes = [
        onnx.helper.make_node("Cast", ["w_flat"], ["w32"], to=TensorProto.FLOAT),
        onnx.helper.make_node("Reshape", ["w32", "shape"], ["w2d"]),
        onnx.helper.make_node("Unsqueeze", ["w2d", "axes"], ["w3d"]),
        onnx.helper.make_node("Squeeze", ["w3d", "axes"], ["w2d_again"]),
        onnx.helper.make_node("Transpose", ["w2d_again"], ["wt"], perm=[1, 0]),
        onnx.helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    model = builders.make_model(
        nodes, [builders.vinfo("x", ["n", 6]), builders.vinfo("w_flat", [48], TensorProto.FLOAT16)],
        [builders.vinfo("y", ["n", 8])], [w, shape, axes])
    layers, _ = find_layers(model)
    assert [layer.name for layer in layers] == ["w_flat"]
    stored = numpy_helper.to_array(w)
    np.testing.assert_array_equal(layers[0].operand(stored), stored.reshape(6, 8).T)
    result = prune(model, 0.75, method="layer", verify=False)
    assert result.report.zeros == 36


def test_exporter_generated_tensor_names_show_and_select_by_node_name():
    # torch.onnx.export names weights onnx::MatMul_<n> and nodes by module path
    rng = np.random.default_rng(13)
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_1"], ["h"], name="/encoder/attention/q/MatMul"),
             helper.make_node("MatMul", ["h", "onnx::MatMul_2"], ["y"], name="/encoder/ffn/MatMul")]
    model = builders.make_model(nodes, [builders.vinfo("x", ["n", 8])], [builders.vinfo("y", ["n", 8])],
                                [numpy_helper.from_array(builders.rand(rng, 8, 8), f"onnx::MatMul_{i}")
                                 for i in (1, 2)])
    result = prune(model, 0.5, verify=False)
    table = result.report.format()
    assert "/encoder/attention/q/MatMul" in table and "onnx::MatMul_1" not in table
    assert result.report.to_dict()["layers"][0]["name"] == "onnx::MatMul_1"
    kept = prune(model, 0.5, exclude="attention", verify=False)
    assert [row.name for row in kept.report.layers] == ["onnx::MatMul_2"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=[0.7, 0.5]), "must be increasing"),
    (dict(device="tpu"), "unknown device"),
    (dict(include="("), "not a regular expression"),
    (dict(dims={"batch": 0}), "positive integer"),
    (dict(method="dc", calib="random", calib_samples=-5), "calib_samples"),
    (dict(method="dc", calib="random", row_cap=-1), "row_cap"),
    (dict(method="dc", calib="random", max_positions=0), "max_positions"),
    (dict(model=42), "path, bytes or an onnx.ModelProto"),
    (dict(min_keep="abc"), "min-keep"),
    (dict(mt_variant="fill"), "unknown Minimum Threshold variant"),
    (dict(method="dc", calib="random", seed="x"), "seed"),
    (dict(method="dc", calib="random", batch_size=True), "batch_size must be a whole number"),
    (dict(method="dc", calib="random", refit=True), "would change nothing"),
    (dict(method="ltp", calib="random", allocation="uniform"), "allocation"),
    (dict(sequential=True), "uses no calibration data"),
    (dict(output="/nonexistent-folder/out.onnx", method="dc", calib="random"), "does not exist"),
    (dict(sparsity=None), "must be a number"),
    (dict(sparsity="0.5"), "must be a number"),
    (dict(sparsity=True), "must be a number"),
    (dict(sparsity={0.5, 0.7}), "a number or a list"),
    (dict(include=5), "--include must be a regular expression or a list"),
    (dict(exclude=[b"W1"]), "--exclude must be a regular expression \\(a string\\)"),
    (dict(dims="N=2"), "dims must map dimension names"),
    (dict(dims={"N": True}), "positive integer"),
    (dict(output=5), "output must be a path"),
    (dict(method="dc", calib="random", seed=None), "seed must be a whole number"),
    (dict(method="dc", calib="random", batch_size=None), "batch_size must be a whole number"),
    (dict(refit="False", calib="random"), "refit must be True or False"),
    (dict(force="no"), "force must be True or False"),
    (dict(max_memory=True), "--max-memory expects a size"),
    (dict(max_memory=1.5), "--max-memory expects a size"),
])
def test_library_arguments_are_checked_before_any_work(kwargs, message):
    kwargs = dict(kwargs)
    model, sparsity = kwargs.pop("model", builders.mlp_matmul()), kwargs.pop("sparsity", 0.5)
    with pytest.raises(OnnxPruneError, match=message):
        prune(model, sparsity, verify=False, **kwargs)


def test_a_zero_dimensional_array_is_one_sparsity_level():
    from decimal import Decimal
    from fractions import Fraction

    for level in (np.array(0.5), np.float32(0.5), Decimal("0.5"), Fraction(1, 2)):
        result = prune(builders.mlp_matmul(), level, verify=False)
        assert not isinstance(result, list) and result.report.target_sparsity == 0.5
    with pytest.raises(OnnxPruneError, match="must be a number"):
        prune(builders.mlp_matmul(), [0.5, [0.6]])  # not a ValueError from numpy
    with pytest.raises(OnnxPruneError, match="must be a number"):
        prune(builders.mlp_matmul(), Fraction(10 ** 400, 3))  # not an OverflowError
    import re
    kept = prune(builders.mlp_matmul(), 0.5, exclude=[re.compile("_13$")], verify=False)  # compiled
    assert [row.name for row in kept.report.layers] == ["onnx::MatMul_12"]


def test_trail_results_hold_their_own_level(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(builders.mlp_gemm(), path)
    written = prune(str(path), [0.5, 0.9], method="global", output=tmp_path / "o.onnx")
    assert [r.model for r in written] == [None, None]  # the files hold them
    in_memory = prune(str(path), [0.5, 0.9], method="global")
    def zeros(model):
        return sum(int(np.count_nonzero(numpy_helper.to_array(t) == 0)) for t in model.graph.initializer
                   if t.name in {r.name for r in written[0].report.layers})

    for level, result in zip(written, in_memory):
        on_disk = onnx.load(level.report.output_files[0])
        assert zeros(on_disk) == zeros(result.model) == level.report.zeros


def test_a_trail_that_fails_at_a_later_level_names_the_levels_it_wrote(tmp_path):
    # column 1 of W holds the smallest weights: emptied at 0.5, its output divides by zero
    w = np.array([[1, 0.1], [2, 0.2], [3, 0.3], [4, 0.4]], np.float32)
    model = builders.make_model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                                 helper.make_node("Reciprocal", ["h"], ["y"])],
                                [builders.vinfo("x", ["N", 4])], [builders.vinfo("y", ["N", 2])],
                                [numpy_helper.from_array(w, "w")])
    with pytest.raises(OnnxPruneError, match=r"non-finite|NaN|infinite") as e:
        prune(model, [0.25, 0.5], method="global", output=tmp_path / "o.onnx")
    assert str(e.value).endswith(f"levels written and complete: {tmp_path / 'o.s0.25.onnx'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.s0.25.onnx"]


def test_trail_file_names_keep_every_digit_of_the_level(tmp_path):
    written = prune(builders.mlp_gemm(), [0.5, 0.5000001], method="global", output=tmp_path / "o.onnx")
    assert [r.report.output_files[0] for r in written] == [str(tmp_path / "o.s0.5.onnx"),
                                                           str(tmp_path / "o.s0.5000001.onnx")]
    from onnxprune.prune import level_outputs
    assert [p.name for p in level_outputs("o.onnx", np.array([0.5, 0.9], np.float32))] == ["o.s0.5.onnx", "o.s0.9.onnx"]
    assert [p.name for p in level_outputs("o.onnx", [0.1234567, 0.3, 0.1 + 0.2])] == [
        "o.s0.1234567.onnx", "o.s0.3.onnx", "o.s0.30000000000000004.onnx"]  # each level exactly


def _classifier_with_non_tensor_outputs() -> onnx.ModelProto:
    """A skl2onnx-style classifier: int64 labels, per-class scores as a sequence of maps
    (ZipMap), and a sequence of differently shaped tensors."""
    rng = np.random.default_rng(31)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["p"], axis=1),
             helper.make_node("ArgMax", ["p"], ["label"], axis=1, keepdims=0),
             helper.make_node("ZipMap", ["p"], ["scores"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
             helper.make_node("SequenceConstruct", ["x", "p"], ["parts"])]
    outputs = [helper.make_tensor_value_info("label", onnx.TensorProto.INT64, ["n"]),
               helper.make_value_info("scores", helper.make_sequence_type_proto(helper.make_map_type_proto(
                   onnx.TensorProto.INT64, helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])))),
               helper.make_value_info("parts", helper.make_sequence_type_proto(
                   helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None)))]
    graph = helper.make_graph(nodes, "g", [builders.vinfo("x", ["n", 8])], outputs,
                              [numpy_helper.from_array(builders.rand(rng, 8, 3), "w")])
    return helper.make_model(graph, ir_version=builders.IR, opset_imports=[
        helper.make_opsetid("", builders.OPSET), helper.make_opsetid("ai.onnx.ml", 3)])


def test_verification_compares_maps_and_counts_changed_labels():
    result = prune(_classifier_with_non_tensor_outputs(), 0.9, method="layer", dims={"n": 64})
    verification = result.report.verification
    assert set(verification["max_abs_diff"]) == {"scores", "parts"}  # maps as rows, sequence flattened
    assert verification["max_abs_diff"]["scores"] > 0
    assert re.search(r"output 'label': \d+ of 64 values changed", verification["note"])
    assert "max abs output change vs input model: scores" in result.report.format()
    ref, moved = [np.zeros((2, 3)), np.zeros((4,))], [np.zeros((3, 2)), np.zeros((4,))]
    assert verify._part_shapes(ref) != verify._part_shapes(moved)  # flattened alike, not the same


def test_an_input_without_a_declared_shape_takes_data_of_any_rank():
    rng = np.random.default_rng(32)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)  # no shape: onnxruntime
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x],  # runs it,
                              [builders.vinfo("y", ["n", 4])],  # onnx.checker would not
                              [numpy_helper.from_array(builders.rand(rng, 8, 4), "w")])
    model = helper.make_model(graph, ir_version=builders.IR, opset_imports=[helper.make_opsetid("", builders.OPSET)])
    data = {"x": rng.standard_normal((16, 8)).astype(np.float32)}
    result = prune(model, 0.5, method="dc", calib=data)
    assert result.report.zeros == 16
    assert "input 'x' declares no shape" in result.report.verification["note"]
    with pytest.raises(OnnxPruneError, match="declares no shape, so random inputs cannot be made"):
        prune(model, 0.5, method="dc", calib="random")


def test_a_layer_global_pruning_empties_is_named_in_a_note():
    rng = np.random.default_rng(48)
    model = builders.make_model([helper.make_node("MatMul", ["x", "big"], ["h"]),
                                 helper.make_node("MatMul", ["h", "small"], ["y"])],
                                [builders.vinfo("x", ["N", 8])], [builders.vinfo("y", ["N", 2])],
                                [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "big"),
                                 numpy_helper.from_array(1e-3 * rng.standard_normal((8, 2)).astype(np.float32), "small")])
    emptied = prune(model, 0.2, method="global", verify=False).report
    assert any(note.startswith("1 tensor pruned to all zeros") and note.endswith(": small") for note in emptied.notes)
    kept = prune(model, 0.2, method="global-mt", verify=False).report
    assert not any("all zeros" in note for note in kept.notes)


def test_a_signal_during_the_final_renames_is_held_until_both_are_done(tmp_path, monkeypatch):
    # the model and its data file are renamed into place one after the other: Ctrl-C between
    # them would leave a data file without its model, or an old model reading a new data file
    import os
    import signal

    from onnxprune import writer

    renamed, real = [], os.replace

    def replace_and_interrupt(src, dst):
        real(src, dst)
        renamed.append(str(dst))
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives between the two renames

    monkeypatch.setattr(writer.os, "replace", replace_and_interrupt)
    w = numpy_helper.from_array(np.ones((32, 32), np.float32), "w")  # 4 KiB: to the data file
    model = builders.make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                                [builders.vinfo("x", ["N", 32])], [builders.vinfo("y", ["N", 32])], [w])
    with pytest.raises(KeyboardInterrupt):
        writer.save_model(model, tmp_path / "out.onnx", external_data=True)
    assert renamed == [str(tmp_path / "out.onnx.data"), str(tmp_path / "out.onnx")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_solved_weight_too_small_for_its_dtype_stays_nonzero(dtype):
    # an fp16 refit of the ONNX-runtime-optimized MiniLM gave one kept weight below fp16's
    # smallest subnormal: it became a zero the mask never chose (5,308,417 for 5,308,416)
    import ml_dtypes

    from onnxprune.solve import _in_dtype
    values = np.array([1e-30, -1e-30, 0.0, 0.25, -2.0])
    cast = _in_dtype(values, getattr(ml_dtypes, dtype, None) or np.dtype(dtype))
    assert list(cast == 0) == [False, False, True, False, False]
    assert list(np.signbit(cast.astype(np.float64))) == [False, True, False, False, True]
    np.testing.assert_array_equal(cast[3:].astype(np.float64), values[3:])
