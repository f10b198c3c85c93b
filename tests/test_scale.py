"""Models with external data, pruned without loading their weights (issue 6).

Small models saved with size threshold 0 (every tensor external) take the same code paths as
multi-GB ones: mapped reads, the output's data file written tensor by tensor, checker by path.
"""
from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import builders
from onnxprune import OnnxPruneError, budget, prune
from onnxprune.cli import main
from onnxprune.mapped import MappedTensor, open_tensor
from onnxprune.methods import magnitude
from onnxprune.modelio import iter_tensors, load_model, tensor_to_array

ELEMS = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def stack(n_layers=4, width=32, elem=TensorProto.FLOAT, seed=0, ties=False):
    """MatMul + bias + Relu blocks; `ties` rounds weights so many magnitudes are equal."""
    rng = np.random.default_rng(seed)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    nodes, inits, x = [], [], "x"
    for i in range(n_layers):
        w = rng.standard_normal((width, width)) * (1 + i)
        w = np.round(w * 4) / 4 if ties else w
        inits += [numpy_helper.from_array(w.astype(dtype), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(width).astype(dtype), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
        x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return builders.make_model(nodes, [builders.vinfo("x", ["n", width], elem)],
                               [builders.vinfo("y", ["n", width], elem)], inits)


def save_external(model, path, location="weights.bin"):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the data of the model it is given
    onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return path


def tensors(path):
    model = onnx.load(path)
    dense = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sparse = {}
    for s in model.graph.sparse_initializer:
        values = numpy_helper.to_array(s.values)
        full = np.zeros(int(np.prod(s.dims)), values.dtype)
        full[numpy_helper.to_array(s.indices)] = values
        sparse[s.values.name] = full.reshape(tuple(s.dims))
    return dense, sparse


def assert_bitwise_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("elem", sorted(ELEMS))
@pytest.mark.parametrize("method", ["layer", "global", "global-mt"])
def test_external_output_equals_in_memory_path(tmp_path, method, elem):
    model = stack(elem=ELEMS[elem])
    src = save_external(model, tmp_path / "in.onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = tmp_path / "out.onnx"
    verify = elem != "bf16"  # onnxruntime has no bfloat16 kernels for these ops
    got = prune(src, 0.8, method=method, output=out, min_keep=1, verify=verify)
    ref = prune(model, 0.8, method=method, min_keep=1, verify=False)  # everything in memory
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    assert got.report.output_files == [str(out), str(out) + ".data"]
    saved = onnx.load(out, load_external_data=False)
    locations = {e.value for t in iter_tensors(saved) for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}  # every tensor, in the output's own data file
    expected = {t.name: numpy_helper.to_array(t) for t in ref.model.graph.initializer}
    dense, _ = tensors(out)
    assert dense.keys() == expected.keys()
    for name in expected:
        assert_bitwise_equal(dense[name], expected[name])
    assert [r.zeros_after for r in got.report.layers] == [r.zeros_after for r in ref.report.layers]
    assert not verify or got.report.verification["max_abs_diff"]  # run in onnxruntime by path
    onnx.checker.check_model(str(out))


def test_weights_stay_in_their_file_until_read(tmp_path):
    src = save_external(stack(), tmp_path / "in.onnx")
    loaded = load_model(src)
    assert loaded.data_files == [tmp_path / "weights.bin"]
    for tensor in iter_tensors(loaded.model):
        assert tensor.data_location == TensorProto.EXTERNAL and not tensor.raw_data
    w = tensor_to_array(loaded.model.graph.initializer[0])
    assert isinstance(w, MappedTensor) and not w.flags.writeable
    np.testing.assert_array_equal(w, numpy_helper.to_array(stack().graph.initializer[0]))


def test_mapped_slices_are_read_not_mapped(tmp_path):
    values = np.arange(10_000, dtype=np.float16)
    path = tmp_path / "t.bin"
    path.write_bytes(b"\xff" * 7 + values.tobytes())
    mapped = open_tensor(path, 7, np.float16, (100, 100))
    flat = mapped.reshape(-1)
    chunk = flat[1234:5678]
    assert type(chunk) is np.ndarray and chunk.flags.writeable  # a copy read with pread
    np.testing.assert_array_equal(chunk, values[1234:5678])
    np.testing.assert_array_equal(flat[9990:20000], values[9990:])
    np.testing.assert_array_equal(mapped[3, ::7], values.reshape(100, 100)[3, ::7])
    assert type(mapped == 0) is np.ndarray and int((mapped == 0).sum()) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_chunked_selection_over_mapped_tensors_equals_a_full_sort(tmp_path, dtype):
    rng = np.random.default_rng(1)
    arrays = [np.round(rng.standard_normal(n) * 8).astype(dtype) / 8 for n in (1000, 3001, 17, 2048)]
    path, offset, mapped = tmp_path / "w.bin", 0, []
    with open(path, "wb") as f:
        for a in arrays:
            f.write(a.astype(dtype).tobytes())
    for a in arrays:
        mapped.append(open_tensor(path, offset, dtype, a.shape))
        offset += a.nbytes
    flat = np.concatenate([np.abs(a.astype(np.float64)) for a in arrays])
    owner = np.concatenate([np.full(a.size, i) for i, a in enumerate(arrays)])
    order = np.lexsort((np.arange(flat.size), owner, flat))  # |w|, then array, then index
    for sparsity in (0.1, 0.5, 0.93):
        k = magnitude.target_zeros(flat.size, sparsity)
        expected = np.bincount(owner[order[:k]], minlength=len(arrays)).tolist()
        assert magnitude.global_ranking(mapped, sparsity, chunk_size=333).counts == expected


def test_sparse_external_reads_back_in_onnx_and_onnxruntime(tmp_path):
    model = stack(n_layers=3, width=48)
    src = save_external(model, tmp_path / "in.onnx")
    dense_out, sparse_out = tmp_path / "d.onnx", tmp_path / "s.onnx"
    prune(src, 0.9, method="global", output=dense_out)
    result = prune(src, 0.9, method="global", output=sparse_out, storage_format="sparse")
    dense, _ = tensors(dense_out)
    stored_dense, stored_sparse = tensors(sparse_out)  # onnx.load, external data included
    assert sorted(stored_sparse) == ["w0", "w1", "w2"]
    for name, value in {**stored_dense, **stored_sparse}.items():
        assert_bitwise_equal(value, dense[name])
    dense_bytes = sum(p.stat().st_size for p in (dense_out, tmp_path / "d.onnx.data"))
    assert result.report.output_bytes < 0.5 * dense_bytes
    x = np.random.default_rng(0).standard_normal((3, 48)).astype(np.float32)
    ys = [ort.InferenceSession(str(p)).run(None, {"x": x})[0] for p in (dense_out, sparse_out)]
    np.testing.assert_array_equal(ys[0], ys[1])
    onnx.checker.check_model(str(sparse_out))

    # sparse tensors are inline: past the inline limit (the budget) tensors stay dense
    capped = prune(src, 0.9, method="global", output=tmp_path / "c.onnx", storage_format="sparse",
                   max_memory=1500)
    assert any("stay dense" in note for note in capped.report.notes)
    c_dense, c_sparse = tensors(tmp_path / "c.onnx")
    assert 0 < len(c_sparse) < 3 and sorted({**c_dense, **c_sparse}) == sorted(dense)
    y = ort.InferenceSession(str(tmp_path / "c.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, ys[0])


def test_missing_or_truncated_data_file_is_a_clear_error(tmp_path):
    src = save_external(stack(), tmp_path / "in.onnx")
    data = (tmp_path / "weights.bin").read_bytes()
    (tmp_path / "weights.bin").write_bytes(data[:-1])
    with pytest.raises(OnnxPruneError, match=r"'weights.bin' is truncated \(tensor 'b3'"):
        prune(src, 0.5, output=tmp_path / "out.onnx")
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(OnnxPruneError, match="'weights.bin' for tensor 'w0' is missing"):
        prune(src, 0.5, output=tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]  # nothing left behind


@pytest.mark.parametrize("case", ["absolute", "dotdot", "link", "nul", "offset", "negative"])
def test_external_data_outside_the_model_folder_or_malformed_is_refused(tmp_path, case):
    # a hostile model must not make onnxprune read any file it can reach and copy it into the output
    (tmp_path / "m").mkdir()
    (tmp_path / "secret.bin").write_bytes(b"S" * 4096)
    src = save_external(stack(), tmp_path / "m" / "in.onnx")
    model = onnx.load(src, load_external_data=False)
    entries = model.graph.initializer[0].external_data
    location = next(e for e in entries if e.key == "location")
    offset = next((e for e in entries if e.key == "offset"), None) or entries.add(key="offset", value="0")
    if case == "absolute":
        location.value = str(tmp_path / "secret.bin")
    elif case == "dotdot":
        location.value = "../secret.bin"
    elif case == "link":
        (tmp_path / "m" / "link.bin").symlink_to(tmp_path / "secret.bin")
        location.value = "link.bin"
    elif case == "nul":
        location.value = "weights.bin\0x"
    else:
        offset.value = "abc" if case == "offset" else "-64"
    onnx.save(model, src)
    message = {"nul": "invalid external data entry", "offset": "invalid external data entry",
               "negative": "negative external data offset"}.get(case, "outside the model's folder")
    with pytest.raises(OnnxPruneError, match=message):
        prune(str(src), 0.5, output=tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.onnx.data").exists()


def test_tensors_sharing_bytes_in_the_data_file_are_pruned_each_on_its_own(tmp_path):
    # onnx.load accepts two external tensors at one offset: each must come out as it would inline
    src = save_external(stack(), tmp_path / "in.onnx")
    model = onnx.load(src, load_external_data=False)
    entries = {t.name: {e.key: e for e in t.external_data} for t in model.graph.initializer}
    for name in ("w1", "b0"):  # w1 reads w0's bytes; b0 reads w0's first ones
        entries[name]["offset"].value = entries["w0"]["offset"].value
    empty = numpy_helper.from_array(np.zeros((0,), np.float32), "empty")  # onnx.save puts an empty
    empty.data_location = TensorProto.EXTERNAL  # tensor at the next one's offset, with no bytes
    for key, value in (("location", "weights.bin"), ("offset", entries["b1"]["offset"].value), ("length", "0")):
        empty.external_data.add(key=key, value=value)
    empty.ClearField("raw_data")
    model.graph.initializer.append(empty)
    model.graph.output.append(builders.vinfo("empty", [0]))
    onnx.save(model, src)
    inline = onnx.load(src)  # what onnx reads: the reference
    for method in ("layer", "global-mt"):
        got = prune(str(src), 0.5, method=method, output=tmp_path / "out.onnx", force=True)
        want = prune(inline, 0.5, method=method)
        written = tensors(tmp_path / "out.onnx")[0]
        for t in want.model.graph.initializer:
            assert_bitwise_equal(written[t.name], numpy_helper.to_array(t))
        assert got.report.zeros == want.report.zeros


def test_a_full_disk_while_streaming_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from onnxprune import staging

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    src = save_external(stack(), tmp_path / "in.onnx")
    monkeypatch.setattr(staging, "write_all", full)
    with pytest.raises(OnnxPruneError, match="out.onnx: cannot write output \\(No space left on device\\)"):
        prune(str(src), 0.5, output=tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "weights.bin"]


def test_sparse_storage_that_empties_the_data_file_writes_none(tmp_path):
    src = save_external(stack(), tmp_path / "in.onnx")
    prune(str(src), 0.9, output=tmp_path / "out.onnx")  # an earlier run's data file
    got = prune(str(src), 0.9, output=tmp_path / "out.onnx", storage_format="sparse", include="^b", force=True)
    assert got.report.output_files == [str(tmp_path / "out.onnx")]
    assert not (tmp_path / "out.onnx.data").exists()  # not left beside it, unreferenced


def test_a_model_with_every_tensor_external_shape_inputs_too_calibrates_and_verifies(tmp_path):
    # torch's dynamo export saved with size_threshold=0: onnxruntime cannot load it by path, since
    # its shape inference reads Reshape's shape from the proto only
    rng = np.random.default_rng(50)
    model = builders.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])],
        [builders.vinfo("x", ["n", 16])], [builders.vinfo("y", ["n", 4, 4])],
        [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([-1, 4, 4], np.int64), "shape")])
    src = save_external(model, tmp_path / "in.onnx")
    with pytest.raises(Exception, match="Cannot parse data from external tensors"):
        ort.InferenceSession(str(src))  # the limit this works around
    got = prune(str(src), 0.5, method="dc", calib="random", output=tmp_path / "out.onnx")
    assert got.report.verification and got.report.verification.get("provider") == "CPU"
    want = prune(model, 0.5, method="dc", calib="random")
    assert_bitwise_equal(tensors(tmp_path / "out.onnx")[0]["w"], numpy_helper.to_array(want.model.graph.initializer[0]))


def test_a_model_in_the_hugging_face_cache_layout_loads(tmp_path):
    # snapshots/rev/model.onnx and its data are both links into blobs/: onnxruntime accepts it
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    save_external(stack(), blobs / "model.onnx", location="model.onnx_data")
    (snap / "model.onnx").symlink_to(blobs / "model.onnx")
    (snap / "model.onnx_data").symlink_to(blobs / "model.onnx_data")
    got = prune(str(snap / "model.onnx"), 0.5, output=tmp_path / "out.onnx")
    assert got.report.zeros > 0 and (tmp_path / "out.onnx.data").exists()


def test_peak_memory_is_the_largest_tensor_not_the_model(tmp_path):
    width, peaks = 256, {}  # tensors of 256 KiB; models of 6 and 24 MiB
    for n_layers in (24, 96):
        src = save_external(stack(n_layers, width), tmp_path / f"in{n_layers}.onnx")
        tracemalloc.start()
        try:
            prune(src, 0.9, method="global-mt", output=tmp_path / f"out{n_layers}.onnx", verify=False)
            peaks[n_layers] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    growth = 72 * width * width * 4  # 18 MiB more weights
    assert peaks[96] - peaks[24] < growth / 16, peaks
    assert peaks[96] < 96 * width * width * 4 / 6, peaks


def test_verification_is_skipped_with_a_note_over_the_budget(tmp_path):
    src = save_external(stack(), tmp_path / "in.onnx")
    result = prune(src, 0.5, output=tmp_path / "out.onnx", max_memory="4K")
    assert result.report.verification is None
    assert any(note.startswith("not verified in onnxruntime") for note in result.report.notes)
    assert "--max-memory" in result.report.format()
    assert (tmp_path / "out.onnx.data").exists()
    assert budget.parse_size("1.5G") == 3 << 29 and budget.parse_size("512MiB") == 1 << 29
    assert [budget.describe(n) for n in (500, 100 << 10, 5 << 20, 20 << 20, 3 << 30)] == [
        "500 bytes", "100 KiB", "5.0 MiB", "20 MiB", "3.00 GiB"]
    with pytest.raises(OnnxPruneError, match="--max-memory"):
        budget.parse_size("lots")


def test_cli_max_memory_option(tmp_path):
    src = save_external(stack(), tmp_path / "in.onnx")
    ok = CliRunner().invoke(main, [str(src), "-s", "0.5", "--max-memory", "256M"])
    assert ok.exit_code == 0 and "verified in onnxruntime" in ok.output, ok.output
    bad = CliRunner().invoke(main, [str(src), "-s", "0.5", "--max-memory", "big", "--force"])
    assert bad.exit_code == 1 and "--max-memory expects a size" in bad.output


def test_trail_over_external_data_equals_in_memory_trail(tmp_path):
    model = stack()
    src = save_external(model, tmp_path / "in.onnx")
    got = prune(src, [0.5, 0.9], method="global", output=tmp_path / "t.onnx")
    refs = prune(model, [0.5, 0.9], method="global", verify=False)
    for level, ref, result in zip(("0.5", "0.9"), refs, got):
        dense, _ = tensors(tmp_path / f"t.s{level}.onnx")
        for t in ref.model.graph.initializer:
            assert_bitwise_equal(dense[t.name], numpy_helper.to_array(t))
        # every level reads the input, not the level before it
        assert [r.zeros_before for r in result.report.layers] == [r.zeros_before for r in ref.report.layers]


@pytest.mark.parametrize("sequential", [False, True])
def test_calibration_reads_external_weights_in_place(tmp_path, sequential):
    model = stack(n_layers=3, width=16)
    src = save_external(model, tmp_path / "in.onnx")
    calib = {"x": np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)}
    # a budget below two layers' statistics: without --sequential, one pass per layer
    got = prune(src, 0.6, method="dc", calib=calib, output=tmp_path / "out.onnx",
                sequential=sequential, max_memory=60_000)
    assert sequential or got.report.calibration["passes"] == 3
    ref = prune(model, 0.6, method="dc", calib=calib, verify=False, sequential=sequential)
    dense, _ = tensors(tmp_path / "out.onnx")
    for t in ref.model.graph.initializer:
        assert_bitwise_equal(dense[t.name], numpy_helper.to_array(t))
    assert got.report.calibration["samples"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "out.onnx.data",
                                                          "weights.bin"]


def test_a_failed_check_leaves_no_output(tmp_path, monkeypatch):
    import importlib

    pipeline = importlib.import_module("onnxprune.prune")  # the module, not the function
    src = save_external(stack(), tmp_path / "in.onnx")

    def refuse(*args, **kwargs):
        raise OnnxPruneError("refused")

    monkeypatch.setattr(pipeline, "compare_models", refuse)
    with pytest.raises(OnnxPruneError, match="refused"):
        prune(src, 0.5, output=tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "weights.bin"]


def test_checker_by_path_blames_the_output_only_when_the_input_passes(tmp_path):
    from onnxprune.writer import check_by_path

    good = save_external(stack(n_layers=1), tmp_path / "good.onnx", location="good.bin")
    broken = stack(n_layers=1)
    broken.graph.node[0].input[0] = "nowhere"  # an input no node produces
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(broken.SerializeToString())
    assert check_by_path(good, reference=bad) is None
    with pytest.raises(OnnxPruneError, match="fails the ONNX checker"):
        check_by_path(bad, reference=good)
    assert "rejects the input model too" in check_by_path(bad, reference=bad)


def test_without_in_memory_data_files_or_kernel_copies(tmp_path, monkeypatch):
    import os

    from onnxprune import external_session

    monkeypatch.setattr(external_session, "_IN_MEMORY_FILES", False)  # older onnxruntime
    monkeypatch.delattr(os, "copy_file_range", raising=False)  # not Linux
    model = stack(n_layers=2, width=16)
    src = save_external(model, tmp_path / "in.onnx")
    calib = {"x": np.random.default_rng(3).standard_normal((32, 16)).astype(np.float32)}
    prune(src, 0.6, method="dc", calib=calib, output=tmp_path / "out.onnx")
    ref = prune(model, 0.6, method="dc", calib=calib, verify=False)
    dense, _ = tensors(tmp_path / "out.onnx")
    for t in ref.model.graph.initializer:
        assert_bitwise_equal(dense[t.name], numpy_helper.to_array(t))


def test_pages_read_through_the_map_can_be_dropped(tmp_path):
    psutil = pytest.importorskip("psutil")
    from onnxprune.mapped import drop_resident_pages

    size = 32 << 20
    (tmp_path / "w.bin").write_bytes(np.ones(size // 4, np.float32).tobytes())
    mapped = open_tensor(tmp_path / "w.bin", 0, np.float32, (size // 4,))
    rss = psutil.Process().memory_info().rss
    assert float(np.asarray(mapped).sum()) == size // 4  # every page touched through the map
    touched = psutil.Process().memory_info().rss
    drop_resident_pages(keep=(str(tmp_path / "w.bin"), 0))  # the one in use stays
    assert psutil.Process().memory_info().rss > touched - size / 4
    drop_resident_pages()
    assert touched - rss > size / 2 and psutil.Process().memory_info().rss < touched - size / 2
    np.testing.assert_array_equal(mapped[:5], 1)  # still readable


def test_a_model_onnxruntime_cannot_run_is_pruned_with_a_note(tmp_path):
    # onnxruntime's CPU build has no bfloat16 MatMul: neither the input nor the output runs
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((8, 8)).astype(ml_dtypes.bfloat16)
    init = numpy_helper.from_array(w.view(np.uint16), "w")
    init.data_type = TensorProto.BFLOAT16
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 8])], [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = prune(model, 0.5, output=tmp_path / "out.onnx")
    assert "input model does not run here either" in result.report.verification["note"]
    assert "verification: not run in onnxruntime" in result.report.format()
    assert (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("method", ["layer", "global", "global-mt"])
def test_streamed_chunks_with_ties_across_them_equal_the_in_memory_path(tmp_path, monkeypatch, method):
    # chunks of 100 weights (tensors of 4,096): cuts, ties and threads cross chunk boundaries
    monkeypatch.setattr(magnitude, "CHUNK", 100)
    model = stack(n_layers=3, width=64, ties=True)
    src = save_external(model, tmp_path / "in.onnx")
    got = prune(src, 0.6, method=method, output=tmp_path / "out.onnx", min_keep=1, verify=False)
    ref = prune(model, 0.6, method=method, min_keep=1, verify=False)
    dense, _ = tensors(tmp_path / "out.onnx")
    for t in ref.model.graph.initializer:
        assert_bitwise_equal(dense[t.name], numpy_helper.to_array(t))
    assert [(r.zeros_before, r.zeros_after) for r in got.report.layers] == \
        [(r.zeros_before, r.zeros_after) for r in ref.report.layers]


@pytest.mark.parametrize("external", [True, False])
def test_output_written_in_small_pieces_is_bit_for_bit_the_same(tmp_path, monkeypatch, external):
    # one big write call per chunk made the kernel's copy slow (wire.write_all); pieces of
    # 100 bytes cross element, chunk and tensor boundaries. The input's data file holds the
    # tensors in the reverse of the layers' order; inline weights of 1 MB take write_streamed.
    import os

    from onnxprune import wire

    monkeypatch.setattr(wire, "WRITE_PIECE", 100)
    monkeypatch.setattr(magnitude, "CHUNK", 1000)
    model = stack(n_layers=3, width=64 if external else 512)
    ref = prune(model, 0.7, min_keep=1, verify=False)
    inits = list(model.graph.initializer)[::-1]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    src = save_external(model, tmp_path / "in.onnx") if external else model
    sizes, pwrite = [], os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: sizes.append(len(data)) or pwrite(fd, data, at))
    prune(src, 0.7, output=tmp_path / "out.onnx", min_keep=1, verify=False)
    assert max(sizes) <= 100 and sum(sizes) >= 3 * (64 if external else 512) ** 2 * 4
    dense, _ = tensors(tmp_path / "out.onnx")
    for t in ref.model.graph.initializer:
        assert_bitwise_equal(dense[t.name], numpy_helper.to_array(t))


def test_an_external_scalar_tensor_comes_back_as_a_scalar(tmp_path):
    # y = x W + c, with c a 0-d tensor: an in-memory result loads it into the proto
    rng = np.random.default_rng(7)
    model = builders.make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "c"], ["y"])],
        [builders.vinfo("x", ["n", 8])], [builders.vinfo("y", ["n", 8])],
        [numpy_helper.from_array(builders.rand(rng, 8, 8), "w"),
         numpy_helper.from_array(np.array(1.5, np.float32), "c")])
    src = save_external(model, tmp_path / "in.onnx")
    got = prune(src, 0.5)
    ref = prune(model, 0.5)
    for a, b in zip(got.model.graph.initializer, ref.model.graph.initializer):
        assert_bitwise_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_calibration_over_external_data_with_subgraph_weights(tmp_path):
    # onnxruntime reads If-branch tensors from disk only: the in-memory session inlines them
    rng = np.random.default_rng(8)

    def branch(name):
        w = numpy_helper.from_array(builders.rand(rng, 8, 8), f"{name}_w")
        node = helper.make_node("MatMul", ["h", f"{name}_w"], [f"{name}_y"])
        return helper.make_graph([node], name, [], [builders.vinfo(f"{name}_y", ["n", 8])], [w])

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    model = builders.make_model(nodes, [builders.vinfo("x", ["n", 8])], [builders.vinfo("y", ["n", 8])],
                                [numpy_helper.from_array(builders.rand(rng, 8, 8), "w")])
    src = save_external(model, tmp_path / "in.onnx")
    before = (tmp_path / "weights.bin").read_bytes()
    calib = {"x": builders.rand(rng, 32, 8)}
    got = prune(src, 0.5, method="dc", calib=calib, output=tmp_path / "out.onnx")
    ref = prune(model, 0.5, method="dc", calib=calib, verify=False)
    out = onnx.load(tmp_path / "out.onnx")
    got_tensors = {t.name: numpy_helper.to_array(t) for t in iter_tensors(out)}
    for t in iter_tensors(ref.model):
        assert_bitwise_equal(got_tensors[t.name], numpy_helper.to_array(t))
    assert any("(inside a subgraph)" in note for note in got.report.notes)
    assert (tmp_path / "weights.bin").read_bytes() == before


def test_an_in_memory_model_with_relative_data_locations_is_a_clear_error(tmp_path):
    src = save_external(stack(), tmp_path / "in.onnx")
    unloaded = onnx.load(src, load_external_data=False)
    for model in (unloaded, unloaded.SerializeToString()):
        with pytest.raises(OnnxPruneError, match="weights.bin.*pass the model's file path"):
            prune(model, 0.5)


def test_the_in_memory_session_inlines_every_subgraph_tensor_and_restores_the_proto(tmp_path):
    # Constant weights in the main graph and several weights per If branch: which tensors are
    # inlined must not depend on protobuf's object ids (they are reused)
    from onnxprune.external_session import make_external_session

    rng = np.random.default_rng(11)

    def branch(name, n=4):
        nodes = [helper.make_node("MatMul", ["h" if i == 0 else f"{name}_y{i - 1}", f"{name}_w{i}"],
                                  [f"{name}_y{i}"]) for i in range(n)]
        weights = [numpy_helper.from_array(builders.rand(rng, 8, 8), f"{name}_w{i}") for i in range(n)]
        return helper.make_graph(nodes, name, [], [builders.vinfo(f"{name}_y{n - 1}", ["n", 8])], weights)

    nodes = [helper.make_node("Constant", [], [f"c{i}"], value=numpy_helper.from_array(builders.rand(rng, 8, 8)))
             for i in range(3)]
    nodes += [helper.make_node("MatMul", ["x", "w"], ["a"])]
    nodes += [helper.make_node("MatMul", ["a", f"c{i}"], [f"k{i}"]) for i in range(3)]
    nodes += [helper.make_node("Sum", ["k0", "k1", "k2"], ["h"]),
              helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True))),
              helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    model = builders.make_model(nodes, [builders.vinfo("x", ["n", 8])], [builders.vinfo("y", ["n", 8])],
                                [numpy_helper.from_array(builders.rand(rng, 8, 8), "w")])
    loaded = load_model(save_external(model, tmp_path / "m.onnx")).model
    before = loaded.SerializeToString()
    x = builders.rand(rng, 2, 8)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(make_external_session(loaded).run(None, {"x": x})[0], expected, rtol=1e-5)
    assert loaded.SerializeToString() == before

