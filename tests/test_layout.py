"""The block layout reproduces real layer outputs (torch / onnxruntime as references)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onnxprune.errors import OnnxPruneError
from onnxprune.layout import (_batched_rows, _matmul_activation, _matmul_batch, block_index,
                              block_shape, blocks_to_weight, input_rows, weight_blocks)

RNG = np.random.default_rng(1234)


def _randn(*shape):
    return RNG.standard_normal(shape)


def output_rows(y, op, attrs, weight_shape, weight_side="right"):
    """Reference: the layer's pre-bias output ``y`` as rows (k, n, d_out), paired row for row
    with ``input_rows`` (without ``max_positions``). Gemm: ``y = A' B'`` (before alpha/beta)."""
    y = np.asarray(y)
    shape = tuple(int(s) for s in weight_shape)
    k, d_out, _ = block_shape(shape, op, attrs, weight_side)
    if op in ("Conv", "ConvTranspose"):
        positions = y.reshape(y.shape[0], k, d_out, -1)  # (N, group, channel, position)
        return positions.transpose(1, 0, 3, 2).reshape(k, -1, d_out)
    if op == "Gemm":
        return (y.T if weight_side == "left" else y)[None]
    if len(shape) == 1:  # a vector weight is contracted away: restore its d_out = 1 axis
        y = y.reshape(1, 1) if y.ndim == 0 else y[..., None] if weight_side == "right" else y[..., None, :]
    elif y.ndim == len(shape) - 1:  # a vector input lost its single-row axis
        y = y[..., None, :] if weight_side == "right" else y[..., None]
    return _batched_rows(_matmul_activation(y, weight_side), _matmul_batch(shape))


def _check(x, w, op, attrs, y, side="right", rtol=1e-10, atol=1e-10):
    """rows @ blocks^T equals the real output, and the weight layout round-trips exactly."""
    rows = input_rows(x, op, attrs, w.shape, side)
    blocks = weight_blocks(w, op, attrs, side)
    assert blocks.shape == block_shape(w.shape, op, attrs, side)
    assert rows.shape[0] == blocks.shape[0] and rows.shape[2] == blocks.shape[2]
    predicted = np.einsum("knd,kod->kno", rows, blocks)
    np.testing.assert_allclose(predicted, output_rows(y, op, attrs, w.shape, side), rtol=rtol, atol=atol)
    _check_round_trip(w, op, attrs, side)
    return rows


def _check_round_trip(w, op, attrs, side="right"):
    blocks = weight_blocks(w, op, attrs, side)
    np.testing.assert_array_equal(blocks_to_weight(blocks, op, attrs, w.shape, side), w)
    index = block_index(w.shape, op, attrs, side)
    np.testing.assert_array_equal(np.sort(index.ravel()), np.arange(w.size))  # a permutation
    np.testing.assert_array_equal(w.ravel()[index], blocks)
    changed = w.copy()
    changed.flat[index] = blocks + 1.0  # how the lead writes new block values back
    np.testing.assert_array_equal(changed, w + 1.0)


def _torch_pad(x, head, tail):
    """Asymmetric zero padding (F.pad wants the last axis first)."""
    pairs = [p for h, t in zip(reversed(head), reversed(tail)) for p in (h, t)]
    return F.pad(x, pairs)


def _torch_conv(x, w, strides, dilations, pads, group):
    n = w.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    xt = _torch_pad(torch.from_numpy(x), pads[:n], pads[n:])
    return conv(xt, torch.from_numpy(w), stride=strides, dilation=dilations, groups=group).numpy()


def _torch_conv_transpose(x, w, strides, dilations, pads, group, output_padding):
    n = w.ndim - 2
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    full = conv_t(torch.from_numpy(x), torch.from_numpy(w), stride=strides, dilation=dilations, groups=group,
                  output_padding=output_padding).numpy()
    crop = tuple(slice(h, s - t) for s, h, t in zip(full.shape[2:], pads[:n], pads[n:]))
    return full[(slice(None), slice(None)) + crop]


CONV_CASES = [  # x shape, w shape, strides, dilations, pads, group
    ((2, 4, 11), (6, 2, 3), (2,), (2,), (1, 2), 2),
    ((2, 6, 9, 8), (4, 3, 3, 2), (2, 1), (1, 2), (1, 0, 2, 1), 2),
    ((1, 3, 7, 7), (3, 1, 3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 3),
    ((2, 5, 6, 5), (7, 5, 1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1),
    ((1, 2, 5, 6, 4), (4, 2, 2, 3, 2), (1, 2, 1), (2, 1, 1), (0, 1, 1, 1, 0, 0), 1),
]


@pytest.mark.parametrize("xs,ws,strides,dilations,pads,group", CONV_CASES)
def test_conv_rows_reproduce_torch(xs, ws, strides, dilations, pads, group):
    x, w = _randn(*xs), _randn(*ws)
    attrs = {"kernel_shape": list(ws[2:]), "strides": list(strides), "dilations": list(dilations),
             "pads": list(pads), "group": group}
    y = _torch_conv(x, w, strides, dilations, pads, group)
    rows = _check(x, w, "Conv", attrs, y)
    assert rows.dtype == np.float64
    assert rows.shape[1] == xs[0] * np.prod(y.shape[2:])


def test_conv_defaults_and_float32():
    x, w = _randn(2, 3, 5, 5).astype(np.float32), _randn(4, 3, 3, 3).astype(np.float32)
    y = F.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    rows = _check(x, w, "Conv", {}, y, rtol=1e-4, atol=1e-4)
    assert rows.dtype == np.float32


CONV_T_CASES = [  # x shape, w shape, strides, dilations, pads, group, output_padding
    ((2, 4, 6), (4, 3, 3), (2,), (1,), (1, 0), 2, (1,)),
    ((2, 4, 5, 4), (4, 2, 3, 2), (2, 3), (2, 1), (1, 0, 2, 1), 2, (1, 2)),
    ((1, 2, 3, 4, 3), (2, 3, 2, 2, 3), (2, 1, 2), (1, 1, 1), (0, 0, 0, 0, 0, 0), 1, (0, 0, 1)),
    ((1, 3, 5), (3, 2, 2), (2,), (1,), (2, 2), 1, (0,)),  # pads beyond the kernel: direct form crops
    ((2, 3, 4, 4), (3, 5, 3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, (0, 0)),
]


@pytest.mark.parametrize("xs,ws,strides,dilations,pads,group,output_padding", CONV_T_CASES)
def test_conv_transpose_rows_reproduce_torch(xs, ws, strides, dilations, pads, group, output_padding):
    x, w = _randn(*xs), _randn(*ws)
    attrs = {"strides": list(strides), "dilations": list(dilations), "pads": list(pads), "group": group,
             "output_padding": list(output_padding)}
    y = _torch_conv_transpose(x, w, strides, dilations, pads, group, output_padding)
    _check(x, w, "ConvTranspose", attrs, y)
    k, d_out, d_in = block_shape(ws, "ConvTranspose", attrs)
    assert (k, d_out, d_in) == (group, ws[1], ws[0] // group * int(np.prod(ws[2:])))


def test_conv_transpose_block_is_flipped_swapped_kernel():
    w = _randn(3, 2, 2, 3)
    blocks = weight_blocks(w, "ConvTranspose", {})
    expected = np.flip(w, axis=(2, 3)).transpose(1, 0, 2, 3).reshape(2, -1)
    np.testing.assert_array_equal(blocks[0], expected)


def test_im2col_gram_matches_torch_unfold():
    x, group = _randn(3, 4, 10, 9), 2
    kernel, stride, padding, dilation = (3, 2), (2, 1), (1, 2), (1, 2)
    attrs = {"strides": list(stride), "dilations": list(dilation), "pads": [*padding, *padding], "group": group}
    rows = input_rows(x, "Conv", attrs, (6, 2, *kernel))
    for g in range(group):
        cols = F.unfold(torch.from_numpy(x[:, 2 * g:2 * g + 2]), kernel, dilation=dilation, padding=padding,
                        stride=stride).numpy()
        flat = cols.transpose(0, 2, 1).reshape(-1, cols.shape[1])
        np.testing.assert_allclose(rows[g].T @ rows[g], flat.T @ flat, rtol=1e-12)
        assert rows.shape[1] == flat.shape[0]


def test_max_positions_subsamples_each_sample():
    x, w = _randn(3, 2, 8, 8), _randn(4, 2, 3, 3)
    full = input_rows(x, "Conv", {}, w.shape).reshape(1, 3, 36, 18)
    sub = input_rows(x, "Conv", {}, w.shape, max_positions=5, rng=np.random.default_rng(7))
    assert sub.shape == (1, 15, 18)
    for n in range(3):
        sample_rows = sub[0, 5 * n:5 * n + 5]
        match = np.flatnonzero((sample_rows[:, None, :] == full[0, n][None]).all(-1).any(0))
        assert match.size == 5  # five distinct positions of this very sample
        np.testing.assert_array_equal(full[0, n, match], sample_rows)  # kept in raster order
    again = input_rows(x, "Conv", {}, w.shape, max_positions=5, rng=np.random.default_rng(7))
    other = input_rows(x, "Conv", {}, w.shape, max_positions=5, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(sub, again)
    assert not np.array_equal(sub, other)
    np.testing.assert_array_equal(input_rows(x, "Conv", {}, w.shape, max_positions=36).reshape(full.shape), full)
    conv_t = input_rows(x, "ConvTranspose", {"strides": [2, 2]}, (2, 3, 3, 3), max_positions=4)
    assert conv_t.shape == (1, 12, 18)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("side", ["right", "left"])
def test_gemm(trans_a, trans_b, side):
    a, b = _randn(5, 4), _randn(4, 3)  # A' and B' as the node uses them
    a_stored, b_stored = (a.T if trans_a else a), (b.T if trans_b else b)
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": 2.0, "beta": 0.5}
    y = a @ b
    if side == "right":
        _check(a_stored, b_stored, "Gemm", attrs, y)
        assert block_shape(b_stored.shape, "Gemm", attrs) == (1, 3, 4)
    else:
        _check(b_stored, a_stored, "Gemm", attrs, y, side="left")
        assert block_shape(a_stored.shape, "Gemm", attrs, "left") == (1, 5, 4)


MATMUL_CASES = [  # x shape, w shape, side, expected (k, d_out, d_in)
    ((5, 4), (4, 3), "right", (1, 3, 4)),
    ((2, 5, 4), (4, 3), "right", (1, 3, 4)),
    ((4,), (4, 3), "right", (1, 3, 4)),
    ((2, 5, 4), (4,), "right", (1, 1, 4)),
    ((4,), (4,), "right", (1, 1, 4)),
    ((2, 3, 5, 4), (3, 4, 6), "right", (3, 6, 4)),
    ((3, 5, 4), (2, 3, 4, 6), "right", (6, 6, 4)),
    ((2, 1, 5, 4), (3, 4, 6), "right", (3, 6, 4)),
    ((2, 3, 5, 4), (1, 4, 6), "right", (1, 6, 4)),
    ((4,), (2, 4, 3), "right", (2, 3, 4)),
    ((4, 5), (3, 4), "left", (1, 3, 4)),
    ((2, 4, 5), (3, 4), "left", (1, 3, 4)),
    ((4, 5), (4,), "left", (1, 1, 4)),
    ((4,), (3, 4), "left", (1, 3, 4)),
    ((4,), (4,), "left", (1, 1, 4)),
    ((2, 4, 5), (2, 3, 4), "left", (2, 3, 4)),
    ((4, 5), (2, 3, 4), "left", (2, 3, 4)),
    ((4,), (2, 3, 4), "left", (2, 3, 4)),
]


@pytest.mark.parametrize("xs,ws,side,expected", MATMUL_CASES)
def test_matmul(xs, ws, side, expected):
    x, w = _randn(*xs), _randn(*ws)
    operands = (x, w) if side == "right" else (w, x)
    y = torch.matmul(*map(torch.from_numpy, operands)).numpy()
    assert block_shape(ws, "MatMul", {}, side) == expected
    _check(x, w, "MatMul", {}, y, side)


def test_batched_matmul_blocks_follow_weight_batch_index():
    x, w = _randn(5, 1, 3, 7, 4), _randn(2, 3, 4, 6)
    rows = input_rows(x, "MatMul", {}, w.shape)
    blocks = weight_blocks(w, "MatMul", {})
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(rows[3 * i + j], x[:, 0, j].reshape(35, 4))
            np.testing.assert_array_equal(blocks[3 * i + j], w[i, j].T)


def _ort_run(op, x, w, attrs):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


ORT_CASES = [  # op, x shape, w shape, attrs: auto_pad and output_shape as onnxruntime applies them
    ("Conv", (1, 2, 6, 7), (3, 2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("Conv", (1, 2, 6, 7), (3, 2, 3, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ("Conv", (1, 2, 6, 7), (3, 2, 2, 4), {"auto_pad": "SAME_UPPER"}),  # onnxruntime: no dilation with SAME
    ("Conv", (1, 2, 6, 7), (3, 2, 3, 3), {"auto_pad": "VALID", "strides": [2, 1]}),
    ("ConvTranspose", (1, 2, 5, 4), (2, 3, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("ConvTranspose", (1, 2, 5, 4), (2, 3, 3, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    ("ConvTranspose", (1, 2, 5, 4), (2, 3, 3, 2),
     {"auto_pad": "SAME_UPPER", "strides": [2, 3], "output_padding": [1, 0]}),
    ("ConvTranspose", (1, 2, 5, 4), (2, 3, 3, 3), {"auto_pad": "VALID", "strides": [2, 1]}),
    ("ConvTranspose", (1, 2, 5, 4), (2, 3, 3, 3), {"output_shape": [10, 8], "strides": [2, 2]}),
    ("ConvTranspose", (1, 2, 5, 4), (2, 3, 3, 3),
     {"output_shape": [8, 7], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("ConvTranspose", (1, 2, 5, 4), (2, 3, 3, 3),
     {"output_shape": [8, 7], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ("ConvTranspose", (1, 4, 5, 4), (4, 1, 3, 3), {"group": 2, "strides": [1, 2], "pads": [0, 1, 2, 0]}),
    # output_shape up to stride - 1 beyond the natural size (11, 9 here): zeros at the end
    ("ConvTranspose", (1, 2, 5, 4), (2, 3, 3, 3), {"output_shape": [12, 10], "strides": [2, 2]}),
    ("ConvTranspose", (1, 4, 5, 4), (4, 3, 3, 2), {"group": 2, "output_shape": [9, 9], "strides": [2, 2]}),
]


@pytest.mark.parametrize("op,xs,ws,attrs", ORT_CASES)
def test_padding_modes_match_onnxruntime(op, xs, ws, attrs):
    x, w = _randn(*xs).astype(np.float32), _randn(*ws).astype(np.float32)
    _check(x, w, op, attrs, _ort_run(op, x, w, attrs), rtol=1e-4, atol=1e-4)


def test_user_errors_are_clear():
    w = _randn(4, 2, 3, 3)
    with pytest.raises(OnnxPruneError, match="channels"):
        input_rows(_randn(1, 3, 5, 5), "Conv", {}, w.shape)
    with pytest.raises(OnnxPruneError, match="unsupported op"):
        weight_blocks(w, "Add", {})
    with pytest.raises(OnnxPruneError, match="right operand"):
        weight_blocks(w, "Conv", {}, "left")
    with pytest.raises(OnnxPruneError, match="group"):
        weight_blocks(w, "Conv", {"group": 3})
    with pytest.raises(OnnxPruneError, match="kernel extent"):
        input_rows(_randn(1, 2, 2, 2), "Conv", {}, w.shape)
    with pytest.raises(OnnxPruneError, match="broadcast"):
        input_rows(_randn(4, 5, 3), "MatMul", {}, (2, 3, 6))
    with pytest.raises(OnnxPruneError, match="output_shape"):
        input_rows(_randn(1, 2, 5), "ConvTranspose", {"output_shape": [20]}, (2, 3, 3))
    with pytest.raises(OnnxPruneError, match="blocks have shape"):
        blocks_to_weight(np.zeros((2, 2, 18)), "Conv", {}, w.shape)
