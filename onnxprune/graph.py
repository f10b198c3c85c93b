"""Find the prunable weights of an ONNX graph.

A weight is a constant float tensor (an initializer or a Constant node's value, in the main
graph or any subgraph) that reaches the weight operand of Conv, ConvTranspose, Gemm or MatMul,
directly or through Transpose / Reshape / Identity / Cast / Squeeze / Unsqueeze / Slice. Such a chain is
recorded as an index map (operand.py), so the operand the node sees is `stored.flat[index]`.
"""
from __future__ import annotations

import math
import re
from collections import ChainMap, Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .errors import OnnxPruneError
from .modelio import body_label, node_label, tensor_key, tensor_to_array
from .affine import AffineAfter, Ranks, fold_affine
from .operand import FLOAT_TYPES, SLICING, attr_value, einsum_weight, operand_view

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "Attention")
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops, as its transformer optimizer writes them
# onnxruntime fusions that add a MatMul's bias inside them: {op: (the MatMul's slots, bias slot)}
FUSED_BIAS = {"SkipLayerNormalization": ((0, 1), 4), "SkipSimplifiedLayerNormalization": ((0, 1), 3),
              "BiasGelu": ((0,), 1), "FastGelu": ((0,), 1), "MultiHeadAttention": ((0, 1, 2), 3)}
PASS_THROUGH = ("Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze")
# Float matrices used by these are masks, position tables, offsets: no weight to name as skipped
NOT_WEIGHT_USES = ("Add", "Sub", "Where", "Expand", "Equal", "Less", "Greater", "Max", "Min")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # their W and R: skipped by default, named in the report
# integer layers and the inputs that hold their (constant) weights
QUANTIZED_WEIGHT_SLOTS = {"ConvInteger": (1,), "MatMulInteger": (0, 1), "QLinearConv": (3,),
                          "QLinearMatMul": (0, 3), "QGemm": (3,), "QAttention": (1,),
                          "DynamicQuantizeMatMul": (1,), "MatMulIntegerToFloat": (0, 1)}
QUANTIZED_REASON = "quantized weight: onnxprune prunes float weights (prune before quantizing)"
FAKE_QUANTIZED_REASON = ("float weight behind QuantizeLinear -> DequantizeLinear: --include its "
                         "name to prune it by magnitude")
NORM_OPS = ("BatchNormalization", "LayerNormalization", "InstanceNormalization",
            "GroupNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "RMSNormalization")


@dataclass
class Layer:
    """One prunable tensor and the node that defines how its values are used."""

    name: str
    role: str  # weight | embedding | recurrent | bias | norm | other (only weight pruned by default)
    op: str  # op type of the first consumer
    node: str
    tensor: onnx.TensorProto  # where the values live; edited in place when written back
    graph: str  # "" for the main graph, else the path of the subgraph
    initializer: bool  # False for a Constant node's value
    attrs: dict = field(default_factory=dict)
    weight_side: str = "right"  # 'left' for MatMul(W, X) / Gemm with constant A
    index: np.ndarray | None = None  # operand at the node = stored.flat[index]
    layout_unknown: str = ""  # why the view the node has of the tensor is not known ("": known)
    input_name: str | None = None  # the activation multiplied by the weight
    output_name: str | None = None  # the layer output after any bias Add
    bias: onnx.TensorProto | None = None
    bias_part: tuple[int, int] | None = None  # (start, stop) of a bias tensor layers share by parts
    channel_split: tuple[int, ...] = ()  # the axes a Reshape splits the channels into before the bias Add
    relu: bool = False  # every consumer of the output is a Relu
    affine: AffineAfter | None = None  # per-channel scale and shift before its consumers
    bias_scale: float = 1.0  # the bias as the solvers see it (output = X W^T + b): stored * this
    consumers: list[str] = field(default_factory=list)
    # a weight shared by several nodes: the inputs of the others that use it the same way (their
    # statistics add up: the objective is the sum of their errors), or uses_differ
    shared_inputs: list[str] = field(default_factory=list)
    uses_differ: bool = False
    other_uses: list[str] = field(default_factory=list)  # nodes using it as no layer does
    tied_uses: list[str] = field(default_factory=list)  # an embedding's uses as a layer weight
    bias_adders: list = field(default_factory=list, repr=False)  # the nodes adding .bias as this layer's
    notes: list[str] = field(default_factory=list)  # for the report's row

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims)

    @property
    def layout_op(self) -> str:
        """The op whose weight layout this layer follows: an Einsum is one only as a MatMul, and
        onnxruntime's fused Attention computes input @ W + bias for Q, K and V at once."""
        return "MatMul" if self.op in ("Einsum", "Attention") else self.op

    @property
    def layout_known(self) -> bool:
        return not self.layout_unknown

    @property
    def key(self) -> str:
        """Unique among a model's layers (a subgraph may reuse an outer tensor name)."""
        return tensor_key(self.graph, self.name)

    @property
    def names(self) -> list[str]:
        """What --include / --exclude match: the tensor's name, its node's (exporters name
        tensors onnx::MatMul_733 and nodes by module path) and its consumers' op types."""
        return [self.name, self.node, *self.consumers]

    @property
    def operand_shape(self) -> tuple[int, ...]:
        """The shape the node sees (through the pass-through ops that lead to it)."""
        return self.shape if self.index is None else self.index.shape

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.tensor.data_type))

    def operand(self, stored: np.ndarray) -> np.ndarray:
        """The weight as the node sees it."""
        return stored if self.index is None else stored.reshape(-1)[self.index]


@dataclass
class Skipped:
    name: str
    op: str
    reason: str
    node: str = ""  # its (first) node's label: the report shows it for generated tensor names


def name_patterns(patterns: str | Sequence[str] | None, option: str) -> list[re.Pattern]:
    """--include / --exclude, given once or several times (any of them matches); empty
    patterns are none (a script's empty "$VAR" must not match every tensor)."""
    if patterns is None or isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    elif not isinstance(patterns, (list, tuple, set, frozenset)):
        raise OnnxPruneError(f"--{option} must be a regular expression or a list of them, got {patterns!r}")
    compiled = []
    for pattern in filter(None, patterns):
        if isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, str):
            compiled.append(pattern)
            continue
        if not isinstance(pattern, str):
            raise OnnxPruneError(f"--{option} must be a regular expression (a string), got {pattern!r}")
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as e:
            raise OnnxPruneError(f"--{option} '{pattern}' is not a regular expression: {e}") from None
    return compiled


def find_layers(model: onnx.ModelProto, include: str | Sequence[str] | None = None,
                exclude: str | Sequence[str] | None = None) -> tuple[list[Layer], list[Skipped]]:
    """All float constants that feed a node; those to prune have .role 'weight' by default.

    include / exclude are regexes (or lists of them) matched (re.search) against Layer.names:
    include adds biases, norm parameters, embedding tables or any other float constant;
    exclude removes tensors. A pattern that matches no tensor is an error (a misspelt
    --exclude would prune what the user meant to keep). Returns (layers to prune, skipped).
    """
    finder = _Finder({f.name for f in model.functions}, Ranks(model))
    finder.walk(model.graph, ChainMap(), "")
    finder.skip_function_constants(model.functions)
    _unshare_biases(finder.layers.values(), finder.constant_users)
    found = list(finder.layers.values())
    inc, exc = name_patterns(include, "include"), name_patterns(exclude, "exclude")
    prunable = [layer for layer in found if layer.role == "weight" or _matches(inc, layer)]
    chosen = {id(layer) for layer in prunable}
    for option, patterns, among in (("include", inc, found), ("exclude", exc, prunable)):
        for pattern in patterns:  # an exclude must remove something that would be pruned
            if not any(_matches([pattern], layer) for layer in among):
                raise OnnxPruneError(f"--{option} '{pattern.pattern}' matches no tensor name, node "
                                     f"name or op type of this model's "
                                     f"{'weights' if option == 'include' else 'pruned weights'}")
    layers, skipped = [], list(finder.skipped)
    named = {s.name for s in skipped}  # skipped already, with a better reason (quantized)
    for layer in found:
        if id(layer) in chosen and _matches(exc, layer):  # (a bias was never to be pruned)
            skipped.append(Skipped(layer.name, layer.op, "excluded by --exclude", layer.node))
        elif id(layer) in chosen:
            layers.append(layer)
        elif layer.name not in named and (reason := _skip_reason(layer, finder.functions)):
            skipped.append(Skipped(layer.name, layer.op, reason, layer.node))
    pruned = {id(layer.tensor) for layer in layers}
    for layer in layers:
        if layer.other_uses and layer.role == "weight":
            layer.notes.append(f"also used by {', '.join(layer.other_uses)}, which sees the pruned values")
        if layer.tied_uses and layer.role == "embedding":  # chosen by --include
            layer.notes.append(f"also the weight of {', '.join(layer.tied_uses)} (a tied output layer): "
                               "pruned by magnitude, for both uses")
        if layer.bias is not None and id(layer.bias) in pruned:  # --include chose it: its own mask
            layer.bias, layer.relu = None, False  # stays, a refit would undo (see _unshare_biases)
            layer.notes.append("bias pruned on its own (--include): not refitted")
    return layers, skipped


def _matches(patterns: list[re.Pattern], layer: Layer) -> bool:
    return any(p.search(name) for p in patterns for name in layer.names)


def _skip_reason(layer: Layer, functions: set[str]) -> str | None:
    """Why a float constant that is not pruned by default is left alone, where the report
    should say (embedding tables, recurrent weights, matrices used otherwise)."""
    if layer.role == "embedding":
        if layer.tied_uses:
            return (f"embedding table, also the weight of {', '.join(layer.tied_uses)} (a tied output "
                    "layer): --include prunes both uses")
        return "embedding table: --include prunes it"
    if layer.role == "recurrent":
        return f"{layer.op} weight, not a Conv / Gemm / MatMul layer: --include prunes it by magnitude"
    uses = [op for op in layer.consumers if op not in NOT_WEIGHT_USES]
    if layer.role == "other" and uses and _is_matrix(layer.shape):
        used = (f"input of model-local function '{uses[0]}'" if uses[0] in functions
                else f"used by {uses[0]}")
        return f"{used}, not as a Conv / Gemm / MatMul weight: --include prunes it by magnitude"
    return None


def _is_matrix(dims) -> bool:
    """Two axes or more longer than 1: what a weight looks like (scales, offsets do not)."""
    return sum(d > 1 for d in dims) >= 2


def _unshare_biases(layers, constant_users) -> None:
    """A bias that another node also uses (exporters merge equal initializers, so two layers
    may add one tensor) is fitted to no layer: a refit would change what the other node sees.
    The layer keeps it as it is; the solvers see no bias, which is exact for a fixed one,
    except inside DC's ReLU objective (so not that)."""
    adder_of = {id(node): layer for layer in layers for node in layer.bias_adders}
    for layer in layers:
        if layer.role != "weight" or layer.bias is None:
            continue
        own = {id(node) for node in layer.bias_adders}
        other = next((n for n in constant_users.get(id(layer.bias), []) if id(n) not in own), None)
        if other is not None:
            user = adder_of.get(id(other))
            label = (_use_label(user.op, user.node) if user is not None
                     else _use_label(other.op_type, node_label(other)))
            layer.bias, layer.relu = None, False
            layer.notes.append(f"bias also used by {label}: kept as it is")


class _Finder:
    def __init__(self, functions: set[str] = frozenset(), ranks: Ranks | None = None):
        self.functions = functions  # the model-local functions' names (their call nodes' op_type)
        self.ranks = ranks
        self.layers: dict[int, Layer] = {}  # keyed by id(TensorProto): a shared tensor once
        self.skipped: list[Skipped] = []
        self._skipped_ids: set[int] = set()
        self._initializers: set[int] = set()
        self.constant_users: dict[int, list[onnx.NodeProto]] = {}  # id(tensor) -> nodes using it

    def walk(self, graph: onnx.GraphProto, outer: ChainMap, path: str) -> None:
        local: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        if len(local) < len(graph.initializer):  # onnxruntime would use one, we might prune the other
            twice = next(n for n, c in Counter(t.name for t in graph.initializer).items() if c > 1)
            raise OnnxPruneError(f"initializer name '{twice}' is used more than once in graph "
                                 f"'{graph.name}' (an invalid model: onnx.checker rejects it)")
        self._initializers.update(id(t) for t in local.values())
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        local[node.output[0]] = attr.t
        scope = outer.new_child(local)
        producers = {o: n for n in graph.node for o in n.output}
        consumers = _Consumers(o.name for o in graph.output)
        if self.ranks is not None and not path:  # (the main graph's only)
            consumers.rank = self.ranks.of
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
            consumers.used_in_subgraphs |= _outer_names(node)

        for node in graph.node:
            if node.op_type == "Constant":
                continue
            for slot, name in enumerate(node.input):
                if not name or (slot == 0 and node.op_type in PASS_THROUGH + SLICING
                                and consumers.get(node.output[0])):
                    continue  # a value passing through: its consumers are visited with the chain
                traced = self._trace(name, scope, producers)
                if traced is not None:
                    self._visit(node, slot, traced, scope, producers, consumers, path)
            for attr in node.attribute:
                sub = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for i, g in enumerate(sub):
                    self.walk(g, scope, body_label(path, node, attr.name, i, len(sub)))

    def skip_function_constants(self, functions) -> None:
        """Weights inside model-local functions are not looked into: named, not pruned."""
        for function in functions:
            for node in function.node:
                for attr in node.attribute if node.op_type == "Constant" else ():
                    t = attr.t if attr.type == onnx.AttributeProto.TENSOR else None
                    if t is not None and t.data_type in FLOAT_TYPES and _is_matrix(t.dims):
                        self.skipped.append(Skipped(f"{function.name}/{node.output[0]}", "Constant",
                                                    f"inside model-local function '{function.name}', "
                                                    "which onnxprune does not look into"))

    def _trace(self, name, scope, producers):
        """(constant tensor, chain of pass-through nodes, its name), ("quantized", the
        DequantizeLinear node) or None."""
        tensor, stop, chain, name = _walk_back(name, scope, producers)
        if tensor is None:
            return ("quantized", stop) if stop is not None and stop.op_type == "DequantizeLinear" else None
        return tensor, chain, name

    def _visit(self, node, slot, traced, scope, producers, consumers, path):
        if traced[0] == "quantized":  # DequantizeLinear of a constant, into a layer's weight slot
            qnode = traced[1]
            if node.op_type not in PRUNABLE_OPS or _role(node, slot, scope, producers) != "weight":
                return
            if _trace_const(qnode.input[0], scope, producers):
                self._skip_quantized(qnode, qnode.input[0], node.op_type)
                return
            fake = producers.get(qnode.input[0])  # float weight -> QuantizeLinear -> DequantizeLinear
            if (fake is not None and fake.op_type == "QuantizeLinear"
                    and _trace_const(fake.input[0], scope, producers)):
                self._skip_quantized(fake, fake.input[0], node.op_type, FAKE_QUANTIZED_REASON)
            return
        tensor, chain, name = traced  # name: a Constant's tensor is often unnamed
        self.constant_users.setdefault(id(tensor), []).append(node)
        role = _role(node, slot, scope, producers)
        if role == "quantized":
            self._skip_quantized(tensor, name, node.op_type)
            return
        if tensor.data_type not in FLOAT_TYPES:
            if role == "weight" and id(tensor) not in self._skipped_ids:
                self._skipped_ids.add(id(tensor))
                dtype = helper.tensor_dtype_to_string(tensor.data_type).removeprefix("TensorProto.")
                self.skipped.append(Skipped(tensor.name, node.op_type, f"{dtype} weights are not pruned"))
            return
        if role is None:
            return
        key = id(tensor)
        known = self.layers.get(key)
        if known is not None:
            known.consumers.append(node.op_type)
            self._another_role(known, role, node, slot, chain, scope, producers, consumers, path)
            return
        layer = Layer(name=name, role=role, op=node.op_type, node=node_label(node),
                      tensor=tensor, graph=path, initializer=key in self._initializers,
                      consumers=[node.op_type])
        self._fill(layer, node, slot, chain, role, scope, producers, consumers)
        self.layers[key] = layer

    def _another_role(self, known, role, node, slot, chain, scope, producers, consumers, path):
        """A tensor met again, used as `role` by `node`: an embedding wins (a tied output layer
        is noted), a weight use beats a plain use (which is noted), and a second weight use is
        a shared weight."""
        use = _use_label(node.op_type, node_label(node))
        if known.role == "embedding":
            if role == "weight":
                _add_once(known.tied_uses, use)
        elif role == "embedding":
            if known.role == "weight":
                _add_once(known.tied_uses, _use_label(known.op, known.node))
            self._fill(known, node, slot, chain, role, scope, producers, consumers)
        elif role == "weight" and known.role == "weight":
            self._another_use(known, node, slot, chain, scope, producers, consumers, path)
        elif role == "weight":
            if known.role == "other":
                _add_once(known.other_uses, _use_label(known.op, known.node))
            self._fill(known, node, slot, chain, role, scope, producers, consumers)
        elif known.role == "weight":
            _add_once(known.other_uses, use)

    def _skip_quantized(self, key_object, name, op, reason=None):
        if id(key_object) not in self._skipped_ids:
            self._skipped_ids.add(id(key_object))
            self.skipped.append(Skipped(name, op, reason or QUANTIZED_REASON))

    def _another_use(self, known, node, slot, chain, scope, producers, consumers, path):
        use = Layer(name=known.name, role="weight", op=node.op_type, node=node_label(node),
                    tensor=known.tensor, graph=path, initializer=known.initializer)
        self._fill(use, node, slot, chain, "weight", scope, producers, consumers)
        same = (use.graph == known.graph and use.op == known.op and use.attrs == known.attrs
                and use.weight_side == known.weight_side and use.bias is known.bias
                and use.bias_part == known.bias_part
                and (use.affine.same(known.affine) if use.affine else known.affine is None)
                and use.layout_known and known.layout_known
                and (use.index is None) == (known.index is None)
                and (use.index is None or np.array_equal(use.index, known.index))
                and use.input_name is not None)
        if same:
            if use.input_name != known.input_name and use.input_name not in known.shared_inputs:
                known.shared_inputs.append(use.input_name)  # the same input twice: one use
            known.relu = known.relu and use.relu  # DC's ReLU objective only if every use has one
            known.bias_adders += use.bias_adders  # each use adds the bias: the sum of errors refits it
        else:
            known.uses_differ = True

    def _fill(self, layer, node, slot, chain, role, scope, producers, consumers):
        layer.role, layer.op, layer.node = role, node.op_type, node_label(node)
        if role != "weight":
            return
        layer.attrs = {a.name: attr_value(a) for a in node.attribute}
        einsum = einsum_weight(node, slot) if node.op_type == "Einsum" else None
        layer.weight_side = "left" if slot == 0 and not einsum else "right"
        layer.index, layer.layout_unknown = operand_view(layer.shape, chain, scope, transpose=einsum == "oi")
        data_slot = 1 if slot == 0 else 0
        layer.input_name = node.input[data_slot] if len(node.input) > data_slot else None
        # (an Attention here is onnxruntime's: _role gives the default domain's no weight)
        layer.output_name = node.output[0] if node.op_type != "Attention" else None  # (not X W + b)
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "Attention") and len(node.input) > 2 and node.input[2]:
            layer.bias, layer.bias_adders = _constant(node.input[2], scope, producers), [node]
            if node.op_type == "Gemm":  # alpha A B + beta C = alpha (A B + (beta / alpha) C)
                alpha, beta = layer.attrs.get("alpha", 1.0), layer.attrs.get("beta", 1.0)
                layer.bias_scale = beta / alpha if alpha and beta else 1.0
                if not beta:
                    layer.bias = None  # C is not used
        elif node.op_type in ("MatMul", "Einsum", "Conv", "ConvTranspose"):  # a bias added next
            add, bias = _added_constant(node.output[0], scope, producers, consumers)
            reshaped = None if add is not None else _channel_reshape(layer, scope, producers, consumers)
            if reshaped is not None:  # tf2onnx: MatMul -> Reshape -> Add (a Dense on 3-D input)
                add, bias = _added_constant(reshaped[0], scope, producers, consumers)
                if bias is not None and _without_leading_ones(bias.dims) == reshaped[1]:
                    layer.channel_split = reshaped[1]
                    layer.bias, layer.output_name, layer.bias_adders = bias, add.output[0], [add]
            elif bias is not None and (_per_channel(bias.dims, layer) if layer.layout_op != "MatMul"
                                       else len(bias.dims) == 1 or list(bias.dims[1:]) == [1]):
                # (solve.bias_blocks decides whether a MatMul's is per output: (d_out, 1) on the left)
                layer.bias, layer.output_name, layer.bias_adders = bias, add.output[0], [add]
            elif add is None:
                fused, bias, part = _fused_bias(layer, scope, producers, consumers)
                if bias is not None:  # nothing after the fused op is linear in the layer's output
                    layer.bias, layer.output_name, layer.bias_adders = bias, None, [fused]
                    layer.bias_part = part
        fold_affine(layer, consumers, lambda name: _constant(name, scope, producers))
        users = _elementwise_users(layer.output_name, consumers)
        layer.relu = bool(users) and all(u is not None and _zero_below(u, scope, producers) for u in users)
        if layer.affine is not None and layer.bias is None:
            layer.relu = False  # the offset has nowhere to go: DC's ReLU objective would drop it
        if node.op_type == "Gemm" and layer.attrs.get("alpha", 1.0) <= 0 and layer.affine is None:
            layer.relu = False  # relu(alpha z) != alpha relu(z): DC's ReLU objective does not apply


def _zero_below(node, scope, producers) -> bool:
    """A Relu, or a Clip at 0 from below (ReLU6): DC's ReLU objective ignores what the layer
    outputs below 0, which these do too (above a Clip's max it still fits the values)."""
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip":
        return False
    if len(node.input) > 1:  # opset 11+: min and max are (optional) inputs
        bounds = []
        for name, absent in zip([*node.input[1:3], ""], (-np.inf, np.inf)):
            bound = _constant(name, scope, producers) if name else None
            if name and (bound is None or int(np.prod(bound.dims)) != 1):
                return False  # computed at run time (or not the scalar a Clip takes)
            bounds.append(absent if bound is None else float(tensor_to_array(bound).reshape(-1)[0]))
        low, high = bounds
    else:
        attrs = {a.name: attr_value(a) for a in node.attribute}
        low, high = attrs.get("min", -np.inf), attrs.get("max", np.inf)
    return low == 0 and high > 0


def _added_constant(name, scope, producers, consumers):
    """(the Add, the constant it adds) when a value's only consumer adds a constant to it."""
    users = consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != "Add" or consumers.used_otherwise(name):
        return None, None
    add = users[0]
    other = add.input[1] if add.input[0] == name else add.input[0]
    return add, _constant(other, scope, producers)


def _fused_bias(layer, scope, producers, consumers):
    """(the fused op, the bias it adds, the part of it that is the layer's or None) when a
    MatMul's output goes only to an onnxruntime fusion that adds a constant to it first
    (FUSED_BIAS): (C,), or MultiHeadAttention's [Q | K | V] biases; else (None, None, None)."""
    fused = _sole_user(layer, consumers)
    if fused is None or fused.domain != MS_DOMAIN or fused.op_type not in FUSED_BIAS:
        return None, None, None
    slots, bias_slot = FUSED_BIAS[fused.op_type]
    slot, channels = list(fused.input).index(layer.output_name), layer.operand_shape[-1]
    bias = (_constant(fused.input[bias_slot], scope, producers)
            if slot in slots and len(fused.input) > bias_slot and fused.input[bias_slot] else None)
    if bias is None or len(bias.dims) != 1:
        return None, None, None
    if fused.op_type != "MultiHeadAttention":
        return (fused, bias, None) if bias.dims[0] == channels else (None, None, None)
    # Q and K are as wide (the attention needs it), V's part comes last; a packed K | V or Q | K | V
    # output (2 or 3 parts in one MatMul) leaves no room for the other parts and is not taken
    size = int(bias.dims[0])
    start = slot * channels if slot < 2 else size - channels
    v = size - 2 * channels if slot < 2 else channels
    fits = v >= 1 and size - v >= 2 and (size - v) % 2 == 0
    return (fused, bias, (start, start + channels)) if fits else (None, None, None)


def _channel_reshape(layer, scope, producers, consumers):
    """(the Reshape's output, the trailing axes it splits the channels into) when a MatMul's
    output (..., C) goes only to a Reshape whose target shape ends in known sizes of product C.
    Reshaping keeps each element's flat index, so its channel (the index mod C) is the position
    within those axes: a constant of exactly their shape still adds one value per channel."""
    reshape = _sole_user(layer, consumers)
    if (reshape is None or reshape.op_type != "Reshape" or reshape.input[0] != layer.output_name
            or len(reshape.input) < 2):
        return None
    channels, split = layer.operand_shape[-1], ()
    for size in reversed(_trailing_sizes(reshape.input[1], scope, producers)):
        if math.prod(split) >= channels or size <= 0:  # 0 and -1 take sizes from the input
            break
        split = (size, *split)
    return (reshape.output[0], split) if math.prod(split) == channels else None


def _sole_user(layer, consumers):
    """The one node that reads a MatMul layer's output (a 2-D weight on the right, its layout
    known, the output no graph output; a node reading it twice is two uses), else None."""
    users = consumers.get(layer.output_name, [])
    if (layer.layout_op != "MatMul" or layer.weight_side != "right" or not layer.layout_known
            or len(layer.operand_shape) != 2 or len(users) != 1 or consumers.used_otherwise(layer.output_name)):
        return None
    return users[0]


def _trailing_sizes(name, scope, producers) -> list[int]:
    """The sizes known at the end of a shape value: all of a constant's, or those of a Concat's
    constant inputs after its last computed one (as tf2onnx builds a Tensordot's shape)."""
    tensor, node, _, _ = _walk_back(name, scope, producers, ("Identity", "Cast"))
    parts = [tensor] if tensor is not None else []
    if node is not None and node.op_type == "Concat":
        for part in reversed(node.input):
            tensor = _constant(part, scope, producers)
            if tensor is None:
                break
            parts.insert(0, tensor)
    return [int(v) for t in parts for v in tensor_to_array(t).reshape(-1)]


def _without_leading_ones(dims) -> tuple[int, ...]:
    dims = [int(d) for d in dims]
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


def _per_channel(dims, layer) -> bool:
    """A constant a Conv's output (N, C, ...) adds per channel: (1, C, 1, ...), as paddle2onnx
    writes it (solve.bias_blocks takes that form; a (C,) would add along the last axis)."""
    operand, dims = layer.operand_shape, [int(d) for d in dims]
    channels = operand[0] if layer.op == "Conv" else operand[1] * int(layer.attrs.get("group", 1))
    return len(dims) == len(operand) and dims[1] == channels and sum(dims) == channels + len(dims) - 1


class _Consumers(dict):
    """{value name: the nodes that use it}; and the values used otherwise: as the graph's
    outputs, or inside the subgraphs of its nodes (If / Loop bodies read outer values)."""

    def __init__(self, graph_outputs):
        super().__init__()
        self.graph_outputs = set(graph_outputs)
        self.used_in_subgraphs: set[str] = set()
        self.rank = lambda name: None  # a value's rank where known (affine.Ranks)

    def used_otherwise(self, name: str) -> bool:
        return name in self.graph_outputs or name in self.used_in_subgraphs


def _outer_names(node) -> set[str]:
    """The values of the graphs around `node` that its subgraphs (at any depth) read."""
    names: set[str] = set()
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            defined = ({i.name for i in body.input} | {t.name for t in body.initializer}
                       | {o for n in body.node for o in n.output})
            used = {i for n in body.node for i in n.input if i}.union(*map(_outer_names, body.node))
            names |= used - defined
    return names


def _elementwise_users(name, consumers: _Consumers) -> list:
    """The nodes a value reaches through ops that commute with an elementwise ReLU (Identity,
    Transpose, Reshape ...: paddle2onnx puts an Identity before each Relu); None where it is a
    graph output, or a pass-through's result that no node uses."""
    users = [None] if consumers.used_otherwise(name) else []
    for user in consumers.get(name, []):
        if user.op_type in PASS_THROUGH and user.input[0] == name:
            users += _elementwise_users(user.output[0], consumers) or [None]
        else:
            users.append(user)
    return users


def _use_label(op: str, node: str) -> str:
    return node if node.startswith(f"{op}:") else f"{op} {node}"  # an unnamed node is Mul:out


def _add_once(uses: list[str], use: str) -> None:
    if use not in uses:
        uses.append(use)


def _role(node, slot, scope, producers) -> str | None:
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        return "weight" if slot == 1 else "bias" if slot == 2 else None
    if op == "MatMul":
        other = node.input[1 - slot]
        if slot == 0 and _trace_const(other, scope, producers):
            return None  # both sides constant: a constant subexpression, not a layer
        return "weight"
    if op == "Gemm":
        if slot == 2:
            return "bias"
        if slot == 0 and _trace_const(node.input[1], scope, producers):
            return None  # B is the weight; A constant too would be a folded constant
        return "weight"
    if op == "Gather":
        return "embedding" if slot == 0 else None
    if node.domain == MS_DOMAIN and op == "Attention":  # input @ weight (1) + bias (2): packed Q | K | V
        return "weight" if slot == 1 else "bias" if slot == 2 else None
    if node.domain == MS_DOMAIN and op == "EmbedLayerNormalization":  # word, position, segment tables
        return "embedding" if slot in (2, 3, 4) else "norm" if slot in (5, 6) else None
    if op == "Einsum":
        return "weight" if einsum_weight(node, slot) else "other"
    if op in QUANTIZED_WEIGHT_SLOTS:
        return "quantized" if slot in QUANTIZED_WEIGHT_SLOTS[op] else None
    if op in RECURRENT_OPS:
        return "recurrent" if slot in (1, 2) else "bias" if slot == 3 else None
    if op in NORM_OPS:
        return "norm"
    return "other"


def _walk_back(name, scope, producers, through=PASS_THROUGH + SLICING):
    """Follow `through` ops back from the value `name`: (the constant reached or None, the node
    that stopped the walk or None, the nodes passed, the last name)."""
    chain = []
    while name not in scope:
        node = producers.get(name)
        if node is None or node.op_type not in through:
            return None, node, chain, name
        chain.append(node)
        name = node.input[0]
    return scope[name], None, chain, name


def _trace_const(name, scope, producers) -> bool:
    return _walk_back(name, scope, producers)[0] is not None


def _constant(name, scope, producers):
    """The constant behind value-preserving ops only (a bias must keep its layout)."""
    return _walk_back(name, scope, producers, ("Identity", "Cast"))[0]
