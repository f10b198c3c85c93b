"""How a layer's node sees its weight: the index map through the pass-through ops between them
(Transpose, Reshape, Squeeze, a Slice that keeps every element), and an Einsum that is a MatMul."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .modelio import tensor_to_array

# A weight cut into parts before its layers (torch's dynamo export splits a cross-attention
# in_proj_weight into q, k, v): traced as a weight, but one layer per tensor cannot describe
# the parts' layouts, so it is pruned by magnitude, without calibration statistics.
SLICING = ("Split", "Slice", "SplitToSequence", "SequenceAt")

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.DOUBLE}


def attr_value(attr):
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return list(value)
    return value


def einsum_weight(node, slot) -> str | None:
    """'io' or 'oi' when an Einsum multiplies data by the 2-D weight at `slot` as a MatMul would
    (flax's nn.Einsum 'bti,io->bto'; 'oi': by its transpose); None for any other equation."""
    equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "").replace(" ", "")
    operands, _, out = equation.partition("->")
    operands = operands.split(",")
    if len(node.input) != 2 or not out or len(operands) != 2:
        return None
    w, x = operands[slot], operands[1 - slot]
    if len(w) != 2 or len(set(w)) != 2 or not w.isalpha():
        return None
    for c, o in ((w[0], w[1]), (w[1], w[0])):  # c contracted, o the output feature
        lead = x[:-1]
        if (x.endswith(c) and out == lead + o and c not in lead and o not in lead
                and len(set(lead.replace(".", ""))) == len(lead.replace(".", ""))):
            return "io" if c == w[0] else "oi"
    return None


def _slice_key(node, attrs, scope, rank) -> tuple[slice, ...]:
    """A Slice node's bounds as numpy slices (ONNX clamps them as Python does)."""
    def values(i):
        has = len(node.input) > i and node.input[i]
        return [int(v) for v in tensor_to_array(scope[node.input[i]]).reshape(-1)] if has else None
    if len(node.input) > 1:  # opset 10 and later: bounds are inputs
        starts, ends, axes, steps = values(1), values(2), values(3), values(4)
    else:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    key = [slice(None)] * rank
    for axis, start, end, step in zip(axes or range(len(starts)), starts, ends, steps or [1] * len(starts)):
        key[axis % rank] = slice(start, end, step)
    return tuple(key)


def operand_view(shape, chain, scope, transpose: bool = False) -> tuple[np.ndarray | None, str]:
    """(the index map of the operand the node sees, "" or why it is not known): a part of the
    tensor (Split, or a Slice that leaves elements out) or a shape computed at run time.
    `transpose`: the node multiplies by the 2-D operand's transpose (an Einsum 'bti,oi->bto')."""
    parts = next((node.op_type for node in chain if node.op_type in SLICING and node.op_type != "Slice"), None)
    if parts:
        return None, f"a part of the tensor, through {parts}"
    try:
        index = _index_map(shape, chain, scope)
    except (KeyError, ValueError, IndexError):
        return None, "its view through " + "/".join(n.op_type for n in reversed(chain)) + " is computed at run time"
    if index is not None and index.size != int(np.prod(shape, dtype=np.int64)):
        return None, "a part of the tensor, through Slice"
    if transpose:
        index = (_identity(shape) if index is None else index).T
    return index, ""


def _identity(shape) -> np.ndarray:
    return np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.int64).reshape(shape)


def _index_map(shape, chain, scope) -> np.ndarray | None:
    """Apply the pass-through chain (innermost first) to flat indices of the stored tensor."""
    if not chain:
        return None
    index = _identity(shape)
    for node in reversed(chain):
        attrs = {a.name: attr_value(a) for a in node.attribute}
        if node.op_type == "Transpose":
            index = np.transpose(index, attrs.get("perm") or None)
        elif node.op_type == "Reshape":
            target = [int(d) for d in tensor_to_array(scope[node.input[1]])]
            if not attrs.get("allowzero", 0):
                target = [index.shape[i] if d == 0 else d for i, d in enumerate(target)]
            index = index.reshape(target)
        elif node.op_type in ("Squeeze", "Unsqueeze"):
            axes = attrs.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = [int(a) for a in tensor_to_array(scope[node.input[1]])]
            if node.op_type == "Squeeze":
                index = np.squeeze(index, axis=tuple(axes) if axes else None)
            else:
                rank = index.ndim + len(axes)
                for a in sorted(a % rank for a in axes):
                    index = np.expand_dims(index, a)
        elif node.op_type == "Slice":  # with constant bounds (a kernel flip: steps -1)
            index = index[_slice_key(node, attrs, scope, index.ndim)]
    return index
