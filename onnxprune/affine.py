"""The per-channel scaling between a layer and the node after it: a BatchNormalization, or the
Mul -> Add that tf2onnx writes for one. dc and ltp fit the layer through it (solve.py), as
they would the same layer of a BN-folded export. Graph reading only: no pruning math here."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .layout import block_shape
from .modelio import tensor_to_array
from .operand import FLOAT_TYPES, attr_value


@dataclass
class AffineAfter:
    """Per-channel constant scaling and shifting between a layer's output y and the next node,
    which sees scale * y + shift: a BatchNormalization (inference form), or the Mul -> Add that
    tf2onnx writes for one. The solvers fit scale * W and the channel's offset as the bias,
    what a BN-folded export of the same model holds."""
    ops: str  # "BatchNormalization", "Mul -> Add", ...
    scale: np.ndarray
    shift: np.ndarray
    holds_bias: str = ""  # the layer has no bias: what `Layer.bias` is instead ("BN's B", ...)

    def same(self, other: "AffineAfter | None") -> bool:
        return (other is not None and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.shift, other.shift) and self.holds_bias == other.holds_bias)


def fold_affine(layer, consumers, constant) -> None:
    """Record the per-channel constant scaling and shifting that alone reads the layer's output
    (BatchNormalization, Mul, Add, Sub, Div, in a chain) as `layer.affine`, and see the layer's
    output past it. A layer without a bias of its own gets the chain's last added constant
    (BN's B, an Add's constant) as its bias, when nothing scales after it.
    `consumers`: graph._Consumers of the layer's graph; `constant(name)`: the constant tensor
    behind a value, or None."""
    if layer.weight_side != "right" or not layer.layout_known:
        return
    k, d_out, _ = block_shape(layer.operand_shape, layer.layout_op, layer.attrs)
    channels, name = k * d_out, layer.output_name
    own = layer.bias_adders[0].op_type in ("Conv", "ConvTranspose") if layer.bias_adders else False
    if (layer.layout_op == "MatMul" and k > 1) or (layer.bias is not None and (
            int(np.prod(layer.bias.dims)) != channels if own else _channel_dims(layer.bias, layer, channels) != channels)):
        return  # (a bias that is not one value per channel is left alone, and so is the chain)
    scale, shift, ops, carrier = 1.0, 0.0, [], None  # per channel once a step gives per-channel values
    while len(consumers.get(name, [])) == 1 and not consumers.used_otherwise(name):
        node = consumers[name][0]
        step = _affine_step(node, name, layer, channels, consumers, constant)
        if step is None:
            break
        mul, add, added = step
        scale, shift = scale * mul, shift * mul + add
        carrier = (node, added) if added is not None else None if np.any(np.asarray(mul) != 1) else carrier
        if node.op_type != "Identity":
            ops.append(node.op_type)
        name = node.output[0]
    if layer.op == "Gemm":  # the chain sees alpha A B + beta C: alpha scales the weight too
        scale = scale * layer.attrs.get("alpha", 1.0)
    if not ops or not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        return
    scale, shift = (np.broadcast_to(np.asarray(v, dtype=np.float64), (channels,)).copy() for v in (scale, shift))
    layer.affine, layer.output_name = AffineAfter(" -> ".join(ops), scale, shift), name
    if layer.bias is None and carrier is not None:  # (_unshare_biases keeps it if another node reads it)
        node, tensor = carrier
        layer.bias, layer.bias_adders = tensor, [node]
        layer.affine.holds_bias = "BN's B" if node.op_type == "BatchNormalization" else "the Add's constant"


def _affine_step(node, name, layer, channels, consumers, constant):
    """(mul, add, the tensor added as it is or None): what `node` does per channel to the value
    `name`, or None when it is not a per-channel constant affine map of it."""
    if node.op_type == "Identity":
        return 1.0, 0.0, None
    if node.op_type == "BatchNormalization":
        attrs = {a.name: attr_value(a) for a in node.attribute}
        matmul_2d = layer.layout_op != "MatMul" or consumers.rank(name) == 2  # BN: axis 1
        if (not matmul_2d or node.input[0] != name or len(node.input) != 5
                or sum(map(bool, node.output)) != 1 or attrs.get("training_mode", 0) or not attrs.get("spatial", 1)):
            return None
        params = [constant(x) for x in node.input[1:]]
        if any(p is None or int(np.prod(p.dims)) != channels for p in params):
            return None
        gamma, beta, mean, var = (tensor_to_array(p).astype(np.float64).reshape(-1) for p in params)
        with np.errstate(all="ignore"):
            factor = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
            return factor, beta - factor * mean, params[1]
    if node.op_type not in ("Mul", "Add", "Sub", "Div") or len(node.input) != 2 or node.input[0] == node.input[1]:
        return None
    if node.op_type in ("Sub", "Div") and node.input[0] != name:
        return None  # c - y and c / y are not affine maps of y of this kind
    other = constant(node.input[1] if node.input[0] == name else node.input[0])
    values = None if other is None else _channel_values(other, layer, channels)
    if values is None:
        return None
    with np.errstate(all="ignore"):
        return {"Mul": (values, 0.0, None), "Div": (1 / values, 0.0, None), "Sub": (1.0, -values, None),
                "Add": (1.0, values, other if values.size == channels else None)}[node.op_type]


def _channel_values(tensor, layer, channels) -> np.ndarray | None:
    """A constant's values, flat (one, or one per output channel), when it broadcasts against the
    layer's output along the channel axis only (axis 1 of a Conv / Gemm output, the last of a
    MatMul's), else None."""
    if _channel_dims(tensor, layer, channels) is None or tensor.data_type not in FLOAT_TYPES:
        return None
    return tensor_to_array(tensor).astype(np.float64).reshape(-1)


def _channel_dims(tensor, layer, channels) -> int | None:
    """How many values a constant has along the layer's output channels (1 or `channels`) when it
    varies along no other axis of the output, else None."""
    dims = [int(d) for d in tensor.dims]
    rank = len(layer.operand_shape) if layer.layout_op in ("Conv", "ConvTranspose") else 2
    if layer.layout_op == "MatMul":
        rank = max(rank, len(dims))
    if len(dims) > rank:
        return None
    dims = [1] * (rank - len(dims)) + dims
    axis = rank - 1 if layer.layout_op == "MatMul" else 1
    if any(d != 1 for i, d in enumerate(dims) if i != axis) or dims[axis] not in (1, channels):
        return None
    return dims[axis]


class Ranks:
    """Ranks of the main graph's values, from onnx's shape inference, run once on first use
    (only a BatchNormalization after a MatMul asks: its channels are the last axis only when the
    output has two); None where unknown."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.ranks = model, None

    def of(self, name: str) -> int | None:
        if self.ranks is None:
            try:
                graph = onnx.shape_inference.infer_shapes(self.model).graph
            except Exception:  # a model over 2 GB, or one shape inference fails on: unknown
                graph = onnx.GraphProto()
            self.ranks = {v.name: len(v.type.tensor_type.shape.dim)
                          for v in [*graph.input, *graph.value_info, *graph.output]
                          if v.type.tensor_type.HasField("shape")}
        return self.ranks.get(name)
