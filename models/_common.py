"""Shared helpers of the reference-model scripts: output folders, seeded data splits, training,
ONNX export and the checks that the exported model matches the torch one.

torch is a dev-only dependency: only these scripts (never the onnxprune package) import it.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

MODELS_DIR = Path(__file__).resolve().parent
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; 10 keeps older runtimes working too
QUICK_BATCHES = 3  # --quick: a few optimiser steps, enough for a runnable model

# Fixed split of animal-mnist (10,000 images, 1,000 per class), shared by all animal models.
ANIMAL_SPLIT = {"train": 7000, "calib": 1000, "test": 2000}
ANIMAL_SEED = 0
ANIMAL_PREPROCESSING = "float32 (N,1,28,28), pixel/255 in [0,1]"


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=None,
                        help="write every artefact into this folder (default: small, committed "
                             "files into models/, large ones into the cache folder)")
    parser.add_argument("--quick", action="store_true",
                        help="train on a few batches only (CI smoke build; accuracy irrelevant)")
    return parser.parse_args(argv)


def cache_dir() -> Path:
    """Where artefacts too large to commit go: $ONNXPRUNE_CACHE or ~/.cache/onnxprune/models."""
    env = os.environ.get("ONNXPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnxprune" / "models"


def output_dir(args: argparse.Namespace, committed: bool) -> Path:
    """--out wins; a quick build never overwrites the committed or cached full artefacts."""
    if args.out is not None:
        out = args.out
    elif args.quick:
        out = cache_dir() / "quick"
    else:
        out = MODELS_DIR if committed else cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_deterministic(seed: int) -> None:
    """Seed everything and train on one thread: results then do not depend on the core count,
    and small models train faster than with OpenMP threads competing for busy cores."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def stratified_split(labels: np.ndarray, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint index sets of the given sizes, each with (as near as possible) the class mix of
    `labels`. Sizes must add up to len(labels). The "train" split is in dataset order (what the
    committed models were trained on); the others stay in dealt order, so that any prefix of
    them (`--calib-samples N` takes the first N) covers every class: the datasets are stored
    class by class."""
    if sum(sizes.values()) != len(labels):
        raise ValueError(f"split sizes {sizes} do not add up to {len(labels)} samples")
    rng = np.random.default_rng(seed)
    # Shuffle within each class, then deal the classes round-robin: any prefix is near-stratified.
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rank = np.empty(len(labels))
    for members in per_class:
        rank[members] = (np.arange(len(members)) + rng.random()) / len(members)
    order = np.argsort(rank, kind="stable")
    splits, start = {}, 0
    for name, size in sizes.items():
        part = order[start:start + size]
        splits[name] = np.sort(part) if name == "train" else part
        start += size
    return splits


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 animal-mnist images as float32 (N, 1, 28, 28) in [0, 1], labels int64.

    Reads the package's two gzip pickles directly: its loader module imports tensorflow."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("animal-mnist is not installed: pip install --no-deps animal-mnist")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "Animal_MNIST"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return x, labels


def animal_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = load_animal_mnist()
    idx = stratified_split(y, ANIMAL_SPLIT, ANIMAL_SEED)
    return {name: (x[i], y[i]) for name, i in idx.items()}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_classifier(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int,
                     batch_size: int, lr: float, weight_decay: float, seed: int, quick: bool,
                     hflip: bool = False) -> float:
    """AdamW with a one-cycle schedule and cross-entropy; returns the training seconds.
    hflip: random horizontal flips (animal silhouettes face either way)."""
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-len(x) // batch_size)
    total = QUICK_BATCHES if quick else epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    start, step = time.perf_counter(), 0
    while step < total:
        for batch in np.array_split(rng.permutation(len(x)), steps_per_epoch):
            if step == total:
                break
            xb, yb = xt[batch], yt[batch]
            if hflip:
                flip = torch.from_numpy(rng.random(len(batch)) < 0.5)
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def torch_outputs(model: torch.nn.Module, *inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    parts = [model(*(torch.from_numpy(a[i:i + batch_size]) for a in inputs)).numpy()
             for i in range(0, len(inputs[0]), batch_size)]
    return np.concatenate(parts)


def onnx_outputs(path: Path, feeds: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """The model's first output on `feeds`, run in onnxruntime batch by batch."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    parts = [session.run(None, {k: v[i:i + batch_size] for k, v in feeds.items()})[0]
             for i in range(0, n, batch_size)]
    return np.concatenate(parts)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def export_onnx(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], path: Path,
                input_names: list[str], output_names: list[str], description: str) -> None:
    """Export with the TorchScript exporter (dynamo=False) at opset 17 with a dynamic batch axis.

    TrainingMode.PRESERVE on an eval-mode model exports inference graphs but skips the exporter's
    Conv+BatchNorm fusion, so BatchNormalization nodes stay visible, as in the torch model."""
    model.eval()
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but works
        torch.onnx.export(model, example_inputs, str(path), input_names=input_names,
                          output_names=output_names, opset_version=OPSET, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, dynamic_axes=axes)
        with torch.no_grad():
            outputs = model(*example_inputs)
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        raise RuntimeError(f"exporter wrote IR version {proto.ir_version} > {MAX_IR_VERSION}")
    _unshare_initializers(proto.graph)
    _name_anonymous_initializers(proto.graph)
    # The exporter can leave symbolic sizes on non-batch output axes; they are fixed.
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for value_info, tensor in zip(proto.graph.output, outputs):
        for dim, size in list(zip(value_info.type.tensor_type.shape.dim, tensor.shape))[1:]:
            dim.dim_value = size
    proto.doc_string = description
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _unshare_initializers(graph: onnx.GraphProto) -> None:
    """The exporter deduplicates initializers with equal values (Identity nodes or one tensor
    feeding several nodes). Give every use its own tensor so pruning one weight never changes
    another layer."""
    inits = {t.name: t for t in graph.initializer}

    def add_copy(source: str, name: str) -> None:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[source])
        copy.name = name
        graph.initializer.append(copy)
        inits[name] = copy

    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        add_copy(node.input[0], node.output[0])
        graph.node.remove(node)
    used: set[str] = set()
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in used:
                node.input[i] = f"{name}__{node.name or node.op_type}_{i}"
                add_copy(name, node.input[i])
            elif name in inits:
                used.add(name)


def _name_anonymous_initializers(graph: onnx.GraphProto) -> None:
    """Rename exporter-made tensors such as `onnx::MatMul_769` (transposed Linear weights) after
    their consumer and input slot, e.g. `bert.encoder.layer.0.attention.self.query.MatMul.B`."""
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        schema = onnx.defs.get_schema(node.op_type, OPSET, node.domain)
        for i, name in enumerate(node.input):
            if name.startswith("onnx::") and name in inits:
                slot = schema.inputs[min(i, len(schema.inputs) - 1)].name
                inits[name].name = f"{node.name.strip('/').replace('/', '.')}.{slot}"
                node.input[i] = inits[name].name


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    np.savez_compressed(path, **arrays)


def save_record(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")


def build_classifier(name: str, model: torch.nn.Module, data: dict[str, tuple[np.ndarray, np.ndarray]],
                     data_prefix: str, train_cfg: dict, preprocessing: str,
                     args: argparse.Namespace) -> dict:
    """Train an image classifier, export it to <out>/<name>.onnx, write the calibration and test
    splits (<data_prefix>_calib.npz / _test.npz, keys `input` and `labels`) and the record
    <name>.json. Fails if the ONNX model's test accuracy differs from the torch model's."""
    t0 = time.perf_counter()
    out = output_dir(args, committed=True)
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    train_s = train_classifier(model, x_train, y_train, quick=args.quick, **train_cfg)
    torch_acc = accuracy(torch_outputs(model, x_test), y_test)

    onnx_path = out / f"{name}.onnx"
    export_onnx(model, (torch.from_numpy(x_test[:2]),), onnx_path, ["input"], ["logits"],
                description=f"onnxprune reference model {name}; input: {preprocessing}")
    for split in ("calib", "test"):
        x, y = data[split]
        save_npz(out / f"{data_prefix}_{split}.npz", input=x, labels=y)
    onnx_acc = accuracy(onnx_outputs(onnx_path, {"input": x_test}), y_test)
    if onnx_acc != torch_acc:
        raise RuntimeError(f"{name}: ONNX accuracy {onnx_acc} != torch accuracy {torch_acc}")

    record = {
        "model": f"{name}.onnx",
        "calib": f"{data_prefix}_calib.npz",
        "test": f"{data_prefix}_test.npz",
        "quick": args.quick,
        "accuracy": onnx_acc,
        "torch_accuracy": torch_acc,
        "params": count_params(model),
        "splits": {k: len(v[1]) for k, v in data.items()},
        "input_shape": ["batch", *x_test.shape[1:]],
        "preprocessing": preprocessing,
        "train": dict(train_cfg),
        "train_time_s": round(train_s, 2),
        "build_time_s": round(time.perf_counter() - t0, 2),
        "onnx_bytes": onnx_path.stat().st_size,
        "opset": OPSET,
        "torch_version": torch.__version__,
    }
    save_record(out / f"{name}.json", record)
    print(f"{name}: accuracy {onnx_acc:.4f} (torch {torch_acc:.4f}), {record['params']} params, "
          f"trained in {train_s:.1f} s -> {onnx_path}")
    return record
