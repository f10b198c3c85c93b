"""Reading data sets (.npz, .npy, directories, globs), checking them against a model, batching."""

import io
import struct
import zipfile

import numpy as np
import pytest

from onnxprune import data
from onnxprune.data import check_against_model, iter_batches, load_samples
from onnxprune.errors import OnnxPruneError

# (name, dtype, shape) as the evaluator derives it from an onnxruntime session.
IMAGE = ("image", np.dtype(np.float32), ["batch", 3, 4])
TOKENS = ("tokens", np.dtype(np.int64), [None, 5])


def make_samples(n=6, labels=True):
    rng = np.random.default_rng(0)
    samples = {
        "image": rng.standard_normal((n, 3, 4)).astype(np.float32),
        "tokens": rng.integers(0, 100, (n, 5)),
    }
    if labels:
        samples["labels"] = np.arange(n) % 3
    return samples


def test_npz_file_round_trip(tmp_path):
    samples = make_samples()
    np.savez(tmp_path / "d.npz", **samples)
    loaded = load_samples(tmp_path / "d.npz")
    assert set(loaded) == {"image", "tokens", "labels"}
    for key in samples:
        np.testing.assert_array_equal(loaded[key], samples[key])


def test_directory_of_npy_files_is_memory_mapped(tmp_path):
    samples = make_samples()
    for key, arr in samples.items():
        np.save(tmp_path / f"{key}.npy", arr)
    loaded = load_samples(str(tmp_path))
    assert isinstance(loaded["image"], np.memmap)
    np.testing.assert_array_equal(loaded["tokens"], samples["tokens"])
    np.testing.assert_array_equal(loaded["labels"], samples["labels"])


def test_npz_slices_concatenate_in_sorted_filename_order(tmp_path):
    samples = make_samples(n=6)
    # Written out of order: part_b holds the last samples, so sorting must put part_a first.
    np.savez(tmp_path / "part_b.npz", **{k: v[4:] for k, v in samples.items()})
    np.savez(tmp_path / "part_a.npz", **{k: v[:4] for k, v in samples.items()})
    (tmp_path / "notes.txt").write_text("ignored")
    for spec in (tmp_path, f"{tmp_path}/part_*.npz"):
        loaded = load_samples(spec)
        for key in samples:
            np.testing.assert_array_equal(loaded[key], samples[key])


def test_glob_selects_only_matching_files(tmp_path):
    np.savez(tmp_path / "calib_0.npz", image=np.zeros((2, 3, 4), np.float32))
    np.savez(tmp_path / "calib_1.npz", image=np.ones((3, 3, 4), np.float32))
    np.savez(tmp_path / "test_0.npz", image=np.full((5, 3, 4), 7, np.float32))
    loaded = load_samples(str(tmp_path / "calib_*.npz"))
    assert loaded["image"].shape == (5, 3, 4)
    assert loaded["image"].sum() == 3 * 12


def test_npz_slices_with_different_keys_are_rejected(tmp_path):
    np.savez(tmp_path / "a.npz", image=np.zeros((2, 3, 4)))
    np.savez(tmp_path / "b.npz", pixels=np.zeros((2, 3, 4)))
    with pytest.raises(OnnxPruneError, match="b.npz holds arrays"):
        load_samples(tmp_path)


def test_nothing_to_read_is_an_error(tmp_path):
    with pytest.raises(OnnxPruneError, match="no such file"):
        load_samples(tmp_path / "missing_*.npz")
    with pytest.raises(OnnxPruneError, match="holds no .npz or .npy"):
        load_samples(tmp_path)


def test_valid_samples_pass_and_float64_is_cast_to_float32():
    samples = make_samples()
    samples["image"] = samples["image"].astype(np.float64)
    checked = check_against_model(samples, [IMAGE, TOKENS])
    assert checked["image"].dtype == np.float32
    assert checked["tokens"].dtype == np.int64
    np.testing.assert_array_equal(checked["labels"], samples["labels"])


def test_missing_input_names_the_input_and_the_keys_found():
    samples = make_samples()
    del samples["tokens"]
    with pytest.raises(OnnxPruneError) as err:
        check_against_model(samples, [IMAGE, TOKENS])
    message = str(err.value)
    assert "'tokens'" in message and "image, labels" in message and "\n" not in message


def test_wrong_rank_is_an_error():
    samples = make_samples()
    samples["image"] = samples["image"].reshape(6, 12)
    with pytest.raises(OnnxPruneError, match=r"input 'image'.*rank 2.*rank 3"):
        check_against_model(samples, [IMAGE, TOKENS])


def test_wrong_fixed_dimension_is_an_error():
    samples = make_samples()
    samples["image"] = np.zeros((6, 3, 5), np.float32)
    with pytest.raises(OnnxPruneError, match=r"input 'image'.*axis 2 must be 4"):
        check_against_model(samples, [IMAGE, TOKENS])


@pytest.mark.parametrize("value, given", [(np.nan, np.float32), (np.inf, np.float32), (1e300, np.float64)])
def test_non_finite_float_data_is_an_error(value, given):
    samples = make_samples()
    samples["image"] = samples["image"].astype(given)
    samples["image"][2, 1, 3] = value  # 1e300: finite as float64, inf once cast to float32
    with pytest.raises(OnnxPruneError, match=r"input 'image': data holds 1 NaN or infinite"):
        check_against_model(samples, [IMAGE, TOKENS])


def test_fixed_batch_dimension_is_not_compared_with_the_sample_count():
    fixed_batch = ("image", np.dtype(np.float32), [1, 3, 4])
    checked = check_against_model(make_samples(n=6, labels=False), [fixed_batch])
    assert checked["image"].shape == (6, 3, 4)


def test_float_data_for_int_input_is_an_error():
    samples = make_samples()
    samples["tokens"] = samples["tokens"].astype(np.float32)
    expected = "input 'tokens': data is float32 but the model expects int64"
    with pytest.raises(OnnxPruneError, match=expected):
        check_against_model(samples, [IMAGE, TOKENS])


def test_int_data_for_float_input_is_an_error():
    samples = make_samples()
    samples["image"] = np.zeros((6, 3, 4), np.int32)
    expected = "input 'image': data is int32 but the model expects float32"
    with pytest.raises(OnnxPruneError, match=expected):
        check_against_model(samples, [IMAGE, TOKENS])


def test_int_values_that_do_not_fit_a_narrower_input_are_an_error():
    narrow = ("tokens", np.dtype(np.int8), [None, 5])
    samples = make_samples(labels=False)
    checked = check_against_model({"tokens": samples["tokens"] % 100}, [narrow])
    assert checked["tokens"].dtype == np.int8
    with pytest.raises(OnnxPruneError, match="does not fit"):
        check_against_model({"tokens": samples["tokens"] + 200}, [narrow])


def test_sample_count_mismatch_is_an_error():
    samples = make_samples()
    samples["tokens"] = samples["tokens"][:5]
    expected = r"number of samples \(image: 6, tokens: 5, labels: 6\)"
    with pytest.raises(OnnxPruneError, match=expected):
        check_against_model(samples, [IMAGE, TOKENS])


def test_labels_count_mismatch_and_non_integer_labels_are_errors():
    samples = make_samples()
    samples["labels"] = samples["labels"][:4]
    with pytest.raises(OnnxPruneError, match="labels: 4"):
        check_against_model(samples, [IMAGE, TOKENS])
    samples["labels"] = np.zeros(6, np.float32)
    with pytest.raises(OnnxPruneError, match="1-D integer"):
        check_against_model(samples, [IMAGE, TOKENS])


def test_iter_batches_covers_every_sample_once_and_excludes_labels():
    samples = make_samples(n=7)
    batches = list(iter_batches(samples, 3))
    assert [len(b["image"]) for b in batches] == [3, 3, 1]
    assert all(set(b) == {"image", "tokens"} for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches]), samples["tokens"])


def test_iter_batches_limit_and_bad_batch_size():
    samples = make_samples(n=7)
    assert [len(b["image"]) for b in iter_batches(samples, 4, limit=5)] == [4, 1]
    assert list(iter_batches(samples, 4, limit=0)) == []
    with pytest.raises(OnnxPruneError, match="at least 1"):
        list(iter_batches(samples, 0))


def test_a_file_that_is_not_an_npz_is_one_clear_error(tmp_path):
    bad = tmp_path / "d.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(OnnxPruneError, match=r"d.npz: not an .npz file \(a zip of .npy arrays"):
        load_samples(bad)


# Hostile data files: each must end in one OnnxPruneError line, before any large allocation.

def npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npy_header(shape, payload=b"", extra=""):
    """A .npy file's bytes whose header declares `shape` of float32, whatever data follows."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, {extra}}}".encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload


def write_npz(path, members, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    return path


X = np.arange(32 * 16, dtype=np.float32).reshape(32, 16)


def assert_one_line_error(spec, pattern, **kwargs):
    with pytest.raises(OnnxPruneError, match=pattern) as err:
        load_samples(spec, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_npz_members_not_named_are_never_decompressed(tmp_path):
    # "unused" declares 64 TiB: reading it, or even allocating for it, would fail
    path = write_npz(tmp_path / "d.npz", {"X.npy": npy_bytes(X),
                                          "unused.npy": npy_header((2**40, 16)),
                                          "labels.npy": npy_bytes(np.arange(32))})
    loaded = load_samples(path, names=["X"])
    assert set(loaded) == {"X", "labels"}  # labels come along when present
    np.testing.assert_array_equal(loaded["X"], X)
    with pytest.raises(OnnxPruneError, match=r"'absent' \(arrays found: X, labels, unused\)"):
        load_samples(path, names=("X", "absent"))  # named with what the file holds, unread
    assert_one_line_error(path, "member 'unused.npy': truncated")  # names=None reads all


def test_names_select_npy_files_and_npz_slices(tmp_path):
    np.save(tmp_path / "X.npy", X)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    loaded = load_samples(tmp_path, names=["X"])
    assert set(loaded) == {"X"} and isinstance(loaded["X"], np.memmap)
    for f in tmp_path.iterdir():
        f.unlink()
    write_npz(tmp_path / "a.npz", {"X.npy": npy_bytes(X[:10]), "big.npy": npy_header((2**40,))})
    write_npz(tmp_path / "b.npz", {"X.npy": npy_bytes(X[10:]), "big.npy": npy_header((2**40,))})
    np.testing.assert_array_equal(load_samples(tmp_path, names=["X"])["X"], X)
    write_npz(tmp_path / "c.npz", {"X.npy": npy_bytes(X)})  # lacks "big": slices must agree
    assert_one_line_error(tmp_path, "c.npz holds arrays", names=["X"])


def test_npz_member_larger_than_available_memory_is_refused(tmp_path, monkeypatch):
    available = data._available_memory()
    assert available is None or available > 0
    path = write_npz(tmp_path / "d.npz", {"X.npy": npy_bytes(X)})
    monkeypatch.setattr(data, "_available_memory", lambda: 1024)  # X takes 2 KiB
    message = assert_one_line_error(path, r"d.npz: member 'X.npy': its header declares a "
                                          r"\(32, 16\) float32 array of 2.0 KiB, more than the "
                                          r"1.0 KiB of memory available", names=["X"])
    assert str(path) in message
    monkeypatch.setattr(data, "_available_memory", lambda: 4096)
    np.testing.assert_array_equal(load_samples(path)["X"], X)


def flip(raw, at):
    raw = bytearray(raw)
    raw[at] ^= 0xFF
    return bytes(raw)


def damaged_npz(tmp_path, kind):
    path = tmp_path / "d.npz"
    if kind == "starts with PK, not a zip":
        path.write_bytes(b"PK\x03\x04garbage" * 10)
    elif kind == "truncated":
        np.savez(path, X=X)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "bad CRC":
        raw = write_npz(path, {"X.npy": npy_bytes(X)}, zipfile.ZIP_STORED).read_bytes()
        path.write_bytes(flip(raw, raw.find(b"NUMPY") + 200))
    elif kind == "damaged compressed data":
        noise = np.random.default_rng(0).random(512)
        raw = write_npz(path, {"X.npy": npy_bytes(noise)}).read_bytes()
        path.write_bytes(flip(raw, raw.find(b"X.npy") + 40))
    elif kind == "encrypted":
        raw = bytearray(write_npz(path, {"X.npy": npy_bytes(X)}).read_bytes())
        raw[raw.find(b"PK\x03\x04") + 6] |= 1  # the encrypted flag, in both headers
        raw[raw.find(b"PK\x01\x02") + 8] |= 1
        path.write_bytes(bytes(raw))
    elif kind == "huge shape":
        write_npz(path, {"X.npy": npy_header((2**40, 16), b"\0" * 64)})
    elif kind == "header over numpy's limit":
        write_npz(path, {"X.npy": npy_header((32, 16), X.tobytes(), f"'pad': '{'x' * 20000}'")})
    elif kind == "not an array":
        write_npz(path, {"X.npy": b"hello, world"})
    elif kind == "object array":
        np.savez(path, X=np.array([{"a": 1}, None], dtype=object))
    return path


@pytest.mark.parametrize("kind, pattern", [
    ("starts with PK, not a zip", r"d.npz: not a valid .npz file: the zip is damaged or truncated"),
    ("truncated", r"d.npz: not a valid .npz file: the zip is damaged or truncated"),
    ("bad CRC", r"member 'X.npy': cannot read \(Bad CRC-32"),
    ("damaged compressed data", r"member 'X.npy': cannot read \("),
    ("encrypted", r"member 'X.npy' is encrypted"),
    ("huge shape", r"member 'X.npy': truncated, or not a valid .npy array \(its header declares "
                   r"a \(1099511627776, 16\) float32 array of 65536.00 GiB"),
    ("header over numpy's limit", r"member 'X.npy': cannot read \(Header info length \(\d+\) "
                                  r"is large and may not be safe to load securely.\)$"),
    ("not an array", r"member 'X.npy': cannot read \(the magic string is not correct"),
    ("object array", r"member 'X.npy': cannot read \(object arrays are not supported"),
])
def test_damaged_or_hostile_npz_is_one_clear_error(tmp_path, kind, pattern):
    assert_one_line_error(damaged_npz(tmp_path, kind), pattern)


def test_running_out_of_memory_while_reading_is_one_clear_error(tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(np.lib.format, "read_array", no_memory)
    path = write_npz(tmp_path / "d.npz", {"X.npy": npy_bytes(X)})
    assert_one_line_error(path, r"d.npz: member 'X.npy': not enough memory to read it")


@pytest.mark.parametrize("raw, pattern", [
    (npy_header((2**30, 16), b"\0" * 64), r"X.npy: truncated, or not a valid .npy file \(its "
                                          r"header declares a \(1073741824, 16\) float32 array"),
    (npy_bytes(X)[:-1], r"X.npy: truncated, or not a valid .npy file"),
    (npy_bytes(X)[:40], r"X.npy: cannot read \("),
    (b"\x93NUMPY\x03\x00" + npy_bytes(X)[8:], r"X.npy: .npy format version 3.0 is not supported"),
    (npy_header((32, 16), X.tobytes(), f"'pad': '{'x' * 20000}'"),
     r"X.npy: cannot read \(Header info length \(\d+\) is large and may not be safe to load "
     r"securely.\)$"),
    (npy_bytes(np.array([None, 1], dtype=object)), r"X.npy: cannot read \(object arrays are not"),
], ids=["declares more than it holds", "one byte short", "header cut short", "version 3.0",
        "header over numpy's limit", "object array"])
def test_damaged_npy_file_is_one_clear_error(tmp_path, raw, pattern):
    (tmp_path / "X.npy").write_bytes(raw)
    message = assert_one_line_error(tmp_path, pattern)
    if "truncated" in pattern:
        assert "object" not in message
