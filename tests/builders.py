"""Small ONNX models covering the ways exporters store weights (IR 10 / opset 17)."""
from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR = 10


def make_model(nodes, inputs, outputs, initializers=(), **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR,
                              **kwargs)
    onnx.checker.check_model(model)
    return model


def vinfo(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def rand(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def torch_export(module, example, **kwargs) -> onnx.ModelProto:
    import torch

    buffer = io.BytesIO()
    module.eval()
    torch.onnx.export(module, example, buffer, dynamo=False, opset_version=OPSET,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kwargs)
    model = onnx.load_from_string(buffer.getvalue())
    model.ir_version = min(model.ir_version, IR)
    return model


def cnn_with_batchnorm() -> onnx.ModelProto:
    """Torch export: BatchNorm folds into the Conv weights (renamed onnx::Conv_*)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, groups=2), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 3 * 3, 10))
    with torch.no_grad():  # non-trivial running statistics, so folding changes the weights
        for m in net:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model = torch_export(net, torch.randn(1, 1, 8, 8))
    model.metadata_props.add(key="labels", value="zero,one,two")
    model.doc_string = "a CNN with BatchNorm"
    return model


def mlp_gemm() -> onnx.ModelProto:
    import torch

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    return torch_export(net, torch.randn(2, 20))


def mlp_matmul() -> onnx.ModelProto:
    """Rank-3 input: torch exports MatMul with transposed weights (onnx::MatMul_*)."""
    import torch

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 6))
    return torch_export(net, torch.randn(2, 3, 12))


def constant_weights(seed=3) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1, w2 = rand(rng, 10, 16), rand(rng, 4, 16)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "")),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2_value")),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1),
    ]
    return make_model(nodes, [vinfo("x", ["n", 10])], [vinfo("y", ["n", 4])])


def if_subgraph(seed=4) -> onnx.ModelProto:
    """Weights inside both branches of an If, and an outer weight used inside a branch."""
    rng = np.random.default_rng(seed)
    outer = numpy_helper.from_array(rand(rng, 8, 8), "outer_w")

    def branch(name, scale):
        w = numpy_helper.from_array(rand(rng, 8, 8) * scale, f"{name}_w")
        nodes = [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_h"]),
                 helper.make_node("MatMul", [f"{name}_h", "outer_w"], [f"{name}_y"])]
        return helper.make_graph(nodes, name, [], [vinfo(f"{name}_y", ["n", 8])], [w])

    nodes = [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", 1.0),
                              else_branch=branch("else", 2.0))]
    return make_model(nodes, [vinfo("x", ["n", 8]), vinfo("flag", [], TensorProto.BOOL)],
                      [vinfo("y", ["n", 8])], [outer])


def shared_weight(seed=5) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rand(rng, 6, 6), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "w"], ["y"])]
    return make_model(nodes, [vinfo("x", ["n", 6])], [vinfo("y", ["n", 6])], [w])


def half_precision(seed=6, elem=TensorProto.FLOAT16) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    w = numpy_helper.from_array(rand(rng, 16, 8).astype(dtype), "w")
    b = numpy_helper.from_array(rand(rng, 8).astype(dtype), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    return make_model(nodes, [vinfo("x", ["n", 16], elem)], [vinfo("y", ["n", 8], elem)], [w, b])


def embedding_and_layernorm(seed=7) -> onnx.ModelProto:
    """Token embedding (Gather), LayerNorm and a MatMul head: only the head is pruned by default."""
    rng = np.random.default_rng(seed)
    table = numpy_helper.from_array(rand(rng, 50, 16), "embed")
    scale = numpy_helper.from_array(np.ones(16, np.float32), "ln_scale")
    bias = numpy_helper.from_array(np.zeros(16, np.float32), "ln_bias")
    head = numpy_helper.from_array(rand(rng, 16, 4), "head")
    q = numpy_helper.from_array(np.arange(16, dtype=np.int8).reshape(4, 4), "int8_w")
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["e"]),
             helper.make_node("LayerNormalization", ["e", "ln_scale", "ln_bias"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "head"], ["y"]),
             helper.make_node("Cast", ["int8_w"], ["q"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["y", "q"], ["z"])]
    return make_model(nodes, [vinfo("ids", ["n", 3], TensorProto.INT64)], [vinfo("z", ["n", 3, 4])],
                      [table, scale, bias, head, q])


def int_weights(seed=8) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.integers(-5, 5, (4, 4)).astype(np.int32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return make_model(nodes, [vinfo("x", ["n", 4], TensorProto.INT32)],
                      [vinfo("y", ["n", 4], TensorProto.INT32)], [w])
