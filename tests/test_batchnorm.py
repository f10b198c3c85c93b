"""A BatchNormalization after a layer (exports that keep it unfused) is folded into the solve:
DC and LTP give the layer the weights they give the same layer of the BN-folded model."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import prune
from onnxprune.graph import find_layers


def _bn(name, x, y, params):
    names = [f"{name}.{p}" for p in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], epsilon=1e-3), dict(zip(names, params))


def _bn_params(rng, c, zero_scale=False):
    scale = rng.uniform(0.2, 3.0, c) * rng.choice([-1, 1], c, p=[0.2, 0.8])
    if zero_scale:
        scale[0] = 0.0
    return [a.astype(np.float32) for a in (scale, rng.normal(0, 0.5, c), rng.normal(0, 0.5, c),
                                           rng.uniform(0.3, 2.0, c))]


def _model(nodes, inputs, outputs, tensors):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _conv_net(rng, conv_bias: bool, zero_scale=False):
    """Conv -> BN -> Relu -> Conv (2 groups) -> BN -> Relu -> Flatten -> Gemm -> BN -> Relu -> Gemm."""
    t = {"w1": rng.normal(0, 0.4, (6, 2, 3, 3)), "w2": rng.normal(0, 0.3, (8, 3, 3, 3)),
         "g1": rng.normal(0, 0.2, (12, 32)), "g2": rng.normal(0, 0.3, (4, 12))}
    t = {k: v.astype(np.float32) for k, v in t.items()}
    if conv_bias:
        t.update(b1=rng.normal(0, 0.3, 6).astype(np.float32), b2=rng.normal(0, 0.3, 8).astype(np.float32))
    bn1, p1 = _bn("bn1", "c1", "n1", _bn_params(rng, 6, zero_scale))
    bn2, p2 = _bn("bn2", "c2", "n2", _bn_params(rng, 8))
    bn3, p3 = _bn("bn3", "f1", "n3", _bn_params(rng, 12))
    nodes = [helper.make_node("Conv", ["x", "w1"] + (["b1"] if conv_bias else []), ["c1"], pads=[1, 1, 1, 1]),
             bn1, helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"] + (["b2"] if conv_bias else []), ["c2"], group=2, strides=[2, 2]),
             bn2, helper.make_node("Relu", ["n2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["fl"]),
             helper.make_node("Gemm", ["fl", "g1"], ["f1"], transB=1), bn3,
             helper.make_node("Relu", ["n3"], ["r3"]),
             helper.make_node("Gemm", ["r3", "g2"], ["y"], transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    return _model(nodes, inputs, outputs, {**t, **p1, **p2, **p3})


def _folded(model):
    """The same function with every BN folded into the layer before it (as torch's export does):
    the layers keep their names, and get a bias '<weight>.folded_b'."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    t = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        layer = producer[bn.input[0]]
        gamma, beta, mean, var = (numpy_helper.to_array(t[x]).astype(np.float64) for x in bn.input[1:])
        s = gamma / np.sqrt(var + bn.attribute[0].f)
        w = numpy_helper.to_array(t[layer.input[1]]).astype(np.float64)
        b = (numpy_helper.to_array(t[layer.input[2]]).astype(np.float64) if len(layer.input) > 2
             else np.zeros(len(s)))
        alpha, beta_c = _gemm_factors(layer)  # Gemm: alpha A B + beta C
        b = b * beta_c
        w = w * alpha
        t[layer.input[1]].CopyFrom(numpy_helper.from_array(
            (w * _per_channel(layer, w.shape, s)).astype(np.float32), layer.input[1]))
        bias = layer.input[1] + ".folded_b"
        g.initializer.append(numpy_helper.from_array((s * (b - mean) + beta).astype(np.float32), bias))
        if layer.op_type == "MatMul":  # the bias comes in an Add
            g.node.insert(list(g.node).index(bn), helper.make_node("Add", [bn.input[0], bias], [bn.output[0]]))
        else:
            del layer.input[2:]
            layer.input.append(bias)
            layer.output[0] = bn.output[0]
        g.node.remove(bn)
    return model


def _gemm_factors(layer):
    """(alpha, beta) of a Gemm, which the folded copy sets to 1; (1, 1) for other ops."""
    attrs = {a.name: a for a in layer.attribute}
    factors = [attrs.pop(n).f if n in attrs else 1.0 for n in ("alpha", "beta")]
    del layer.attribute[:]
    layer.attribute.extend(attrs.values())
    return factors


def _per_channel(layer, shape, s):
    """BN's per-channel `s`, broadcast over a weight of `layer` (a NodeProto) by output channel."""
    attrs = {a.name: helper.get_attribute_value(a) for a in layer.attribute}
    if layer.op_type == "ConvTranspose":  # W (C_in, C_out / g, ...): channel g * C_out/g + j
        group, (c_in, per) = attrs.get("group", 1), shape[:2]
        index = (np.arange(c_in)[:, None] // (c_in // group)) * per + np.arange(per)[None, :]
        return s[index].reshape(c_in, per, *[1] * (len(shape) - 2))
    if layer.op_type == "MatMul" or (layer.op_type == "Gemm" and not attrs.get("transB", 0)):  # W (K, N)
        return s.reshape(1, -1)
    return s.reshape(-1, *[1] * (len(shape) - 1))


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _scales(model):
    """{weight name: its BN's per-channel scale, broadcast over the weight}."""
    t = _weights(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        gamma, _, _, var = (t[x].astype(np.float64) for x in bn.input[1:])
        layer = producer[bn.input[0]]
        alpha = next((a.f for a in layer.attribute if a.name == "alpha"), 1.0)
        out[layer.input[1]] = _per_channel(layer, t[layer.input[1]].shape,
                                           alpha * gamma / np.sqrt(var + bn.attribute[0].f))
    return out


def _per_row(w, s):
    return w * s if s is not None else w


@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("method", ["dc", "ltp"])
def test_pruning_an_unfused_model_gives_the_folded_models_weights(conv_bias, method):
    rng = np.random.default_rng(61)
    model = _conv_net(rng, conv_bias)
    folded = _folded(model)
    calib = {"x": rng.normal(size=(96, 2, 5, 5)).astype(np.float32)}
    # dc with a uniform allocation, so that both models are asked for the same count per layer
    # (global-mt would rank the unscaled weights); ltp learns its allocation from the solve
    options = dict(method=method, calib=calib, **({"allocation": "uniform"} if method == "dc" else {}))
    layers, _ = find_layers(model)
    assert all(layer.affine is not None and layer.relu for layer in layers if layer.name != "g2")
    assert all(layer.bias is not None for layer in layers if layer.name != "g2")
    assert {layer.name for layer in layers if layer.affine and layer.affine.holds_bias} == (
        {"g1"} if conv_bias else {"w1", "w2", "g1"})  # the Gemm has no C
    a, b = prune(model, 0.6, **options), prune(folded, 0.6, **options)
    wa, wb, scales = _weights(a.model), _weights(b.model), _scales(model)
    for name in ("w1", "w2", "g1", "g2"):
        seen = _per_row(wa[name].astype(np.float64), scales.get(name))
        if method == "ltp" or name == "w1":
            assert np.array_equal(seen == 0, wb[name] == 0), name
            np.testing.assert_allclose(seen, wb[name], rtol=1e-4, atol=1e-5, err_msg=name)
        else:  # DC's stochastic steps amplify the float32 rounding of the folded weights
            assert np.mean((seen == 0) == (wb[name] == 0)) > 0.95, name
    if method == "ltp":
        x = rng.normal(size=(64, 2, 5, 5)).astype(np.float32)
        np.testing.assert_allclose(_run(a.model, x), _run(b.model, x), rtol=1e-4, atol=1e-4)
    notes = {row.name: row.note for row in a.report.layers}
    assert "fitted with the BatchNormalization after it" in notes["w1"] and "Batch" not in notes["g2"]
    assert ("BN's B refitted as its bias" in notes["w1"]) == (not conv_bias), notes["w1"]
    if not conv_bias and method == "ltp":  # ltp refits biases: BN's B carries the conv's
        assert not np.array_equal(wa["bn1.B"], _weights(model)["bn1.B"])


def test_a_channel_batchnorm_scales_by_zero_loses_its_weights_and_keeps_its_output():
    rng = np.random.default_rng(62)
    model = _conv_net(rng, conv_bias=True, zero_scale=True)
    calib = {"x": rng.normal(size=(64, 2, 5, 5)).astype(np.float32)}
    result = prune(model, 0.5, method="dc", calib=calib)
    w1 = _weights(result.model)["w1"]
    assert not w1[0].any() and w1[1:].any()  # channel 0 computes BN's shift whatever its weights
    assert _weights(result.model)["b1"][0] == _weights(model)["b1"][0]
    assert result.report.zeros == round(0.5 * result.report.params)


@pytest.mark.parametrize("method", ["dc", "ltp"])
def test_the_zero_count_is_exact_when_batchnorm_zeroes_channels(method):
    # a BN scaling every channel of w1 by 0 (torchvision's zero_init_residual, dead channels):
    # the solvers see zeros there, and the layer must still get exactly its count
    rng = np.random.default_rng(67)
    model = _conv_net(rng, conv_bias=True)
    for t in model.graph.initializer:
        if t.name == "bn1.scale":
            t.CopyFrom(numpy_helper.from_array(np.zeros(6, np.float32), t.name))
    calib = {"x": rng.normal(size=(64, 2, 5, 5)).astype(np.float32)}
    for sparsity in (0.2, 0.5):
        result = prune(model, sparsity, method=method, calib=calib, allocation="uniform" if method == "dc" else "global-mt")
        if method == "dc":  # uniform: every layer its own round(s * n)
            assert [row.zeros_after for row in result.report.layers] == [
                round(sparsity * row.params) for row in result.report.layers]
        else:
            assert result.report.zeros == round(sparsity * result.report.params), sparsity


def test_batchnorm_forms_that_are_not_folded():
    rng = np.random.default_rng(63)
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3, 3])]
    bn, params = _bn("bn", "c", "n", _bn_params(rng, 4))
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    relu = helper.make_node("Relu", ["n"], ["y"])

    # the layer's output is also a graph output: BN is not all that reads it
    exposed = _model([conv, bn, relu], inputs, out + [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4, 3, 3])],
                     {"w": w, **params})
    (layer,), _ = find_layers(exposed)
    assert layer.affine is None and not layer.relu

    # BN's B shared with another node: not refitted, so no bias to carry BN's offset
    twin = helper.make_node("BatchNormalization", ["c2", *bn.input[1:]], ["n2"], epsilon=1e-3)
    shared = _model([conv, bn, relu, helper.make_node("Conv", ["x", "w2"], ["c2"]), twin], inputs,
                    out + [helper.make_tensor_value_info("n2", TensorProto.FLOAT, ["N", 4, 3, 3])],
                    {"w": w, "w2": w[::-1].copy(), **params})
    layer = find_layers(shared)[0][0]
    assert layer.affine is not None and layer.bias is None and not layer.relu
    assert any("bias also used by" in n for n in layer.notes), layer.notes
    prune(shared, 0.5, method="ltp", refit=True, calib="random")  # runs: BN's B stays


@pytest.mark.parametrize("op, attrs, shape, x_shape, bias", [
    ("Conv", dict(group=2, pads=[1, 1, 1, 1]), (6, 2, 3, 3), (4, 5, 5), False),
    ("ConvTranspose", dict(group=2, strides=[2, 2]), (4, 3, 3, 3), (4, 4, 4), True),
    ("Gemm", dict(transB=0), (10, 6), (10,), False),
    ("Gemm", dict(transB=1, alpha=-0.5, beta=2.0), (6, 10), (10,), True)])
def test_each_layer_kind_sees_its_own_channels_scaled(op, attrs, shape, x_shape, bias):
    rng = np.random.default_rng(64)
    w = rng.normal(0, 0.5, shape).astype(np.float32)
    channels = shape[1] * attrs["group"] if op == "ConvTranspose" else shape[0] if op != "Gemm" else (
        shape[0] if attrs["transB"] else shape[1])
    biases = {"b": rng.normal(0, 0.5, channels).astype(np.float32)} if bias else {}
    layer = helper.make_node(op, ["x", "w", *biases], ["c"], **attrs)
    bn, params = _bn("bn", "c", "n", _bn_params(rng, channels))
    model = _model([layer, bn, helper.make_node("Relu", ["n"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"][:len(x_shape) + 1])],
                   {"w": w, **biases, **params})
    assert find_layers(model)[0][0].relu  # a negative alpha too: BN's factor takes its sign
    calib = {"x": rng.normal(size=(64, *x_shape)).astype(np.float32)}
    for method, rtol in (("ltp", 1e-4), ("dc", 0.1)):
        a, b = (prune(m, 0.6, method=method, calib=calib, refit=method == "ltp")
                for m in (model, _folded(model)))
        seen = _weights(a.model)["w"] * _scales(model)["w"]
        assert np.array_equal(seen == 0, _weights(b.model)["w"] == 0), method
        # DC's steps amplify float32 rounding (one ulp more in the folded weights moves one by
        # 3 %); a wrong channel's factor would be off by up to 15x (BN's factors: 0.2-3)
        np.testing.assert_allclose(seen, _weights(b.model)["w"], rtol=rtol, atol=1e-5, err_msg=method)


@pytest.mark.parametrize("op, chain, shapes, own_bias, carrier", [
    ("Conv", ["Mul", "Add"], (1, 6, 1, 1), False, "the Add's constant"),  # tf2onnx's Keras BN
    ("Conv", ["Sub", "Div"], (6, 1, 1), True, ""),
    ("MatMul", ["Mul", "Add"], (6,), False, "the Add's constant"),  # Dense -> BN, from tf2onnx
    ("MatMul", ["Mul", "Add"], (1, 6), True, ""),  # Dense with bias -> BN
    ("Gemm", ["Mul", "Add"], (1, 6), False, "the Add's constant")])
def test_a_per_channel_mul_and_add_after_a_layer_are_folded_like_a_batchnorm(op, chain, shapes, own_bias, carrier):
    rng = np.random.default_rng(65)
    conv = op == "Conv"
    w = rng.normal(0, 0.5, (6, 3, 3, 3) if conv else (10, 6) if op == "MatMul" else (6, 10)).astype(np.float32)
    b = rng.normal(0, 0.3, 6).astype(np.float32)
    consts = {n: rng.uniform(0.3, 2.0, 6) * rng.choice([-1, 1], 6, p=[0.2, 0.8]) for n in ("c0", "c1")}
    x_shape = (3, 5, 5) if conv else (10,)
    nodes, tensors, value = [], {"w": w}, "z"
    if op == "Conv":
        nodes.append(helper.make_node("Conv", ["x", "w"] + (["b"] if own_bias else []), ["z"]))
    elif op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["x", "w"], ["z"], transB=1))
    else:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["z"]))
        if own_bias:
            nodes.append(helper.make_node("Add", ["z", "b"], ["zb"]))
            value = "zb"
    if own_bias:
        tensors["b"] = b
    scale, shift = np.ones(6), b.astype(np.float64) if own_bias else np.zeros(6)
    for i, kind in enumerate(chain):
        c = consts[f"c{i}"]
        tensors[f"c{i}"] = c.reshape(shapes).astype(np.float32)
        nodes.append(helper.make_node(kind, [value, f"c{i}"], [f"a{i}"]))
        value = f"a{i}"
        c = tensors[f"c{i}"].astype(np.float64).reshape(-1)
        scale, shift = {"Mul": (scale * c, shift * c), "Add": (scale, shift + c),
                        "Sub": (scale, shift - c), "Div": (scale / c, shift / c)}[kind]
    nodes.append(helper.make_node("Relu", [value], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 3, 3] if conv else ["N", 6])]
    model = _model(nodes, inputs, outputs, tensors)
    per_channel = scale.reshape(-1, 1, 1, 1) if conv else scale.reshape(1, -1) if op == "MatMul" else scale.reshape(-1, 1)
    folded_w = (w * per_channel).astype(np.float32)
    if op == "MatMul":
        folded = _model([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["zb"]),
                         helper.make_node("Relu", ["zb"], ["y"])], inputs, outputs,
                        {"w": folded_w, "b": shift.astype(np.float32)})
    else:
        folded = _model([helper.make_node(op, ["x", "w", "b"], ["z"], **({} if conv else {"transB": 1})),
                         helper.make_node("Relu", ["z"], ["y"])], inputs, outputs,
                        {"w": folded_w, "b": shift.astype(np.float32)})
    (layer,), _ = find_layers(model)
    assert layer.affine is not None and layer.affine.ops == " -> ".join(chain) and layer.relu
    assert layer.affine.holds_bias == carrier
    calib = {"x": rng.normal(size=(64, *x_shape)).astype(np.float32)}
    a, f = (prune(m, 0.6, method="ltp", refit=True, calib=calib) for m in (model, folded))
    seen = _weights(a.model)["w"] * per_channel
    assert np.array_equal(seen == 0, _weights(f.model)["w"] == 0)
    np.testing.assert_allclose(seen, _weights(f.model)["w"], rtol=1e-4, atol=1e-5)
    x = rng.normal(size=(32, *x_shape)).astype(np.float32)
    np.testing.assert_allclose(_run(a.model, x), _run(f.model, x), rtol=1e-4, atol=1e-4)
    if carrier:
        assert f"{carrier} refitted as its bias" in a.report.layers[0].note


def test_scalings_that_are_not_per_channel_are_not_folded():
    rng = np.random.default_rng(66)
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3, 3])]
    for other, first in ((np.full((1, 1, 1, 3), 2.0), False),  # along the width, not the channels
                         (np.full((4, 1, 1), 2.0), True)):  # 2 - y: not a scaling of y
        ins = ["k", "c"] if first else ["c", "k"]
        model = _model([helper.make_node("Conv", ["x", "w"], ["c"]),
                        helper.make_node("Sub" if first else "Mul", ins, ["m"]),
                        helper.make_node("Relu", ["m"], ["y"])], inputs, out,
                       {"w": w, "k": other.astype(np.float32)})
        (layer,), _ = find_layers(model)
        assert layer.affine is None and not layer.relu
    # a per-channel Mul alone, on a layer without bias: folded, but no offset to fit: no ReLU objective
    model = _model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["m"]),
                    helper.make_node("Relu", ["m"], ["y"])], inputs, out,
                   {"w": w, "k": np.full((1, 4, 1, 1), 2.0, np.float32)})
    (layer,), _ = find_layers(model)
    assert layer.affine.ops == "Mul" and not layer.affine.holds_bias and layer.bias is None and not layer.relu


def test_a_linear_without_bias_then_batchnorm1d_calibrates():
    # torch's default export of Linear(bias=False) -> BatchNorm1d -> ReLU -> ... (a projection
    # head): onnxruntime 1.31's graph rewrites refuse it once calibration reads the values
    rng = np.random.default_rng(68)
    t = {"w1": rng.normal(size=(16, 32)), "w2": rng.normal(size=(32, 32)), "w3": rng.normal(size=(4, 32)),
         "b3": rng.normal(size=4)}
    t = {k: v.astype(np.float32) for k, v in t.items()}
    bn1, p1 = _bn("bn1", "m1", "n1", _bn_params(rng, 32))
    bn2, p2 = _bn("bn2", "m2", "n2", _bn_params(rng, 32))
    model = _model([helper.make_node("MatMul", ["x", "w1"], ["m1"]), bn1, helper.make_node("Relu", ["n1"], ["r1"]),
                    helper.make_node("MatMul", ["r1", "w2"], ["m2"]), bn2,
                    helper.make_node("Gemm", ["n2", "w3", "b3"], ["y"], transB=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], {**t, **p1, **p2})
    calib = {"x": rng.normal(size=(64, 16)).astype(np.float32)}
    for options in (dict(method="dc"), dict(method="ltp"), dict(refit=True)):
        assert prune(model, 0.5, calib=calib, **options).report.sparsity == 0.5


def test_a_batchnorm_after_a_matmul_is_folded_where_the_output_has_two_axes():
    rng = np.random.default_rng(69)
    bn, params = _bn("bn", "m", "n", _bn_params(rng, 6))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Identity", ["n"], ["i"]),
             helper.make_node("Relu", ["i"], ["y"])]
    w = rng.normal(size=(10, 6)).astype(np.float32)
    flat = _model([nodes[0], bn, *nodes[1:]], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], {"w": w, **params})
    (layer,), _ = find_layers(flat)
    assert layer.affine.ops == "BatchNormalization" and layer.affine.holds_bias == "BN's B" and layer.relu
    # (N, 6, 6): BN normalises axis 1, which is not the MatMul's outputs
    bn3, params3 = _bn("bn", "m", "n", _bn_params(rng, 6))
    deep = _model([nodes[0], bn3, *nodes[1:]], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 10])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 6])], {"w": w, **params3})
    (layer,), _ = find_layers(deep)
    assert layer.affine is None
    # an Identity between the layer and its BN (as some converters write) is seen through
    conv = _model([helper.make_node("Conv", ["x", "k"], ["c"]), helper.make_node("Identity", ["c"], ["m"]), bn,
                   helper.make_node("Relu", ["n"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 2, 2])],
                  {"k": rng.normal(size=(6, 2, 3, 3)).astype(np.float32), **params})
    (layer,), _ = find_layers(conv)
    assert layer.affine.ops == "BatchNormalization" and layer.relu


def test_a_bias_not_one_per_channel_leaves_the_scaling_after_it_alone():
    rng = np.random.default_rng(71)
    w = rng.normal(size=(8, 6)).astype(np.float32)
    k = _bn_params(rng, 6)[0]
    for c in (np.array([0.5], np.float32), rng.normal(size=(16, 1)).astype(np.float32)):  # (1,), (N, 1)
        model = _model([helper.make_node("Gemm", ["x", "w", "c"], ["z"]), helper.make_node("Mul", ["z", "k"], ["m"]),
                        helper.make_node("Relu", ["m"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 6])], {"w": w, "c": c, "k": k})
        (layer,), _ = find_layers(model)
        assert layer.affine is None
        for method in ("dc", "ltp"):
            result = prune(model, 0.5, method=method, calib={"x": rng.normal(size=(16, 8)).astype(np.float32)})
            assert np.array_equal(_weights(result.model)["c"], c) or c.size == 1
    # a weight whose view is computed at run time: named as such, and nothing after it is read
    shape = helper.make_node("Identity", ["s"], ["s2"])
    model = _model([shape, helper.make_node("Reshape", ["wf", "s2"], ["w2"]),
                    helper.make_node("Gemm", ["x", "w2"], ["z"]), helper.make_node("Mul", ["z", "k"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                   {"wf": w.reshape(-1), "s": np.array([8, 6], np.int64), "k": k})
    (layer,), _ = find_layers(model)
    assert layer.layout_unknown and layer.affine is None


def test_refit_fits_the_weights_and_bns_b_as_the_folded_models_weights_and_bias():
    # one BN factor (-1.5) for every channel, so that magnitude ranks the stored and the folded
    # weights alike; the refit then gives the unfused model what it gives the folded one
    rng = np.random.default_rng(70)
    mean, var = rng.normal(0, 0.5, 6), rng.uniform(0.3, 2.0, 6)
    params = [(-1.5 * np.sqrt(var + 1e-3)), rng.normal(0, 0.5, 6), mean, var]
    bn, params = _bn("bn", "m", "n", [p.astype(np.float32) for p in params])
    model = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), bn, helper.make_node("Relu", ["n"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                   {"w": rng.normal(size=(10, 6)).astype(np.float32), **params})
    folded = _folded(model)
    calib = {"x": rng.normal(size=(64, 10)).astype(np.float32)}
    a, b = (prune(m, 0.6, method="layer", refit=True, calib=calib) for m in (model, folded))
    wa, wb, s = _weights(a.model), _weights(b.model), _scales(model)["w"]
    assert np.array_equal(wa["w"] == 0, wb["w"] == 0)
    np.testing.assert_allclose(wa["w"] * s, wb["w"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(wa["bn.B"] - s[0] * wa["bn.mean"], wb["w.folded_b"], rtol=1e-4, atol=1e-5)
    assert a.report.layers[0].note.endswith("BN's B refitted as its bias")
    x = rng.normal(size=(32, 10)).astype(np.float32)
    np.testing.assert_allclose(_run(a.model, x), _run(b.model, x), rtol=1e-4, atol=1e-4)
