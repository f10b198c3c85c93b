"""Measure a model on sample data: top-1 accuracy against labels, fidelity to a reference model.

Fidelity compares one output of the model (the first, or the one named) with the reference's
output of that name (by default its first), sample by sample. Only running statistics are kept,
except for embedding models (2-D float output, no labels), whose outputs are kept to compare
nearest neighbours across the whole data set. Each model gets the data cast to its own input
types, in batches of its own fixed batch size where its inputs fix one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.data import (
    LABELS_KEY,
    batch_rows,
    check_against_model,
    check_count,
    fixed_batch,
    iter_batches,
    load_samples,
    num_samples,
)
from onnxprune.errors import OnnxPruneError
from onnxprune.external_session import session_for
from onnxprune.modelio import check_model_file, no_relative_data
from onnxprune.report import plural, progress_counter
from onnxprune.runtime import (
    check_device,
    device_note,
    make_session,
    provider_name,
    run,
    session_inputs,
)
from onnxprune.verify import output_change

# Rows of the similarity matrix computed at once when finding nearest neighbours.
_NEIGHBOUR_BLOCK = 512


def evaluate(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    data: str | os.PathLike | Mapping[str, np.ndarray],
    *,
    batch_size: int = 64,
    reference: str | os.PathLike | bytes | onnx.ModelProto | None = None,
    device: str = "auto",
    output: str | None = None,
    progress: bool = True,
) -> dict:
    """Run ``model`` over ``data`` and return its metrics as a JSON-ready dict.

    ``data``: a path, or a mapping of arrays (or of lists) keyed by input name.
    ``output``: the output to measure, by name (default: the model's first output); the
    reference's output of that name is compared with it (by default its first output).
    ``accuracy`` needs labels in [0, classes) and a 2-D (samples, classes) output; the fidelity
    metrics (``mean_cosine``, ``max_abs_diff``, ``top1_agreement`` for 2-D outputs, and
    ``retrieval_agreement`` for unlabelled 2-D float outputs) need a ``reference`` model.
    """
    check_device(device)
    check_count("batch size", batch_size)
    _check_file(model, "model")  # before the data is read: a typo in a path fails at once
    if reference is not None:
        _check_file(reference, "reference model")
    raw = dict(data) if isinstance(data, Mapping) else load_samples(data)
    measured = _Model.open(model, device, output, raw, "model")
    ref = None
    if reference is not None:
        ref = _Model.open(reference, device, output, raw, "reference model")
    samples = measured.samples
    if ref is not None and num_samples(ref.samples) != num_samples(samples):
        raise OnnxPruneError(
            f"the data holds {plural(num_samples(samples), 'sample')} for the model's inputs but "
            f"{num_samples(ref.samples)} for the reference's"
        )
    labels = samples.get(LABELS_KEY)
    if num_samples(samples) == 0:
        raise OnnxPruneError("the data holds no samples")
    if labels is None and ref is None:
        raise OnnxPruneError(
            f"the data has no '{LABELS_KEY}' array; give a reference model to measure fidelity"
        )
    out_shape = next(o.shape for o in measured.session.get_outputs() if o.name == measured.output)
    if labels is not None and ref is None and len(out_shape) != 2:
        raise _not_a_classifier(measured, out_shape)

    started = time.perf_counter()
    keep_embeddings = labels is None  # nearest-neighbour agreement is for embedding models
    stats, ref_stats, fidelity = _run_all(measured, ref, batch_size, progress, keep_embeddings)
    result: dict = {
        "samples": num_samples(samples),
        "provider": provider_name(measured.session),
        "output": measured.output,
    }
    if labels is not None:
        if stats.is_2d:
            result["accuracy"] = stats.correct / len(labels)
            if ref_stats is not None:
                result["reference_accuracy"] = ref_stats.correct / len(labels)
        elif ref is None:
            raise _not_a_classifier(measured, stats.example_shape)
    if fidelity is not None:
        result.update(fidelity.metrics())
    note = device_note(device)
    if note:
        result["notes"] = [note]
    result["wall_s"] = round(time.perf_counter() - started, 3)
    return result


@dataclass
class _Model:
    """A session with the output measured, the data cast to its inputs, and its fixed batch."""

    session: ort.InferenceSession
    output: str
    samples: dict[str, np.ndarray]
    fixed_batch: int | None

    @classmethod
    def open(cls, model, device: str, output: str | None, raw: Mapping, which: str) -> _Model:
        """`which`: "model" or "reference model", named in errors where both could be meant."""
        what = "" if which == "model" else f"{which}: "
        try:
            session = _session(model, device)
        except OnnxPruneError as e:
            raise OnnxPruneError(f"{which}: {e}") from None
        names = [o.name for o in session.get_outputs()]
        if output is not None and output not in names:
            raise OnnxPruneError(f"{what}the model has no output '{output}' (its outputs: "
                                 f"{', '.join(names)})")
        measured = output or names[0]
        if next(o.type for o in session.get_outputs() if o.name == measured) == "tensor(bfloat16)":
            raise OnnxPruneError(f"{what}output '{measured}' is bfloat16, which onnxruntime's "
                                 "Python API cannot return: eval cannot measure it")
        try:
            inputs = session_inputs(session)
            samples = check_against_model(raw, inputs)
        except OnnxPruneError as e:
            raise OnnxPruneError(f"{what}{e}") from None
        return cls(session, measured, samples, fixed_batch(inputs))

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The measured output for a batch; a fixed batch size is met by cutting the batch and
        padding the last piece, whose padded rows are cut off the output again."""
        rows = batch_rows(batch)
        size = self.fixed_batch or rows
        parts = []
        for start in range(0, rows, size):
            piece = {k: v[start:start + size] if v.ndim else v for k, v in batch.items()}
            out = np.asarray(run(self.session, [self.output], _pad(piece, size))[0])
            parts.append(out[:min(size, rows - start)] if self.fixed_batch else out)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _not_a_classifier(model: _Model, shape) -> OnnxPruneError:
    others = [o.name for o in model.session.get_outputs() if o.name != model.output]
    hint = f" or choose another output ({', '.join(others)})" if others else ""
    return OnnxPruneError(
        f"labels need a (samples, classes) output but '{model.output}' has shape "
        f"{tuple(shape)}; give a reference model to measure fidelity instead{hint}"
    )


def format_metrics(d: Mapping) -> str:
    """Human-readable, one metric per line."""
    rows = []
    for key in ("accuracy", "reference_accuracy", "mean_cosine", "top1_agreement",
                "retrieval_agreement", "max_abs_diff"):
        if d.get(key) is not None:
            rows.append((key.replace("_", " "), f"{d[key]:.6g}" if key == "max_abs_diff"
                         else f"{d[key]:.4f}"))
    if d.get("nonfinite_samples"):
        n = d["nonfinite_samples"]
        rows.append(("WARNING", f"{plural(n, 'sample')} {'has' if n == 1 else 'have'} NaN or "
                                "infinite outputs where the reference's are finite"))
    rows.append(("samples", str(d.get("samples"))))
    if d.get("output") is not None:
        rows.append(("output", str(d["output"])))
    rows.append(("provider", str(d.get("provider"))))
    rows.extend(("note", note) for note in d.get("notes", ()))
    if "wall_s" in d:
        rows.append(("time", f"{d['wall_s']:.1f} s"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


class _OutputStats:
    """Running statistics of one model's measured output, fed batch by batch."""

    def __init__(self, labels: np.ndarray | None, output: str):
        self.labels = labels
        self.output = output
        self.correct = 0
        self.seen = 0
        self.example_shape: tuple[int, ...] | None = None
        self.is_2d = False

    def add(self, batch_out: np.ndarray, rows: int) -> None:
        if batch_out.ndim == 0 or batch_out.shape[0] != rows:
            raise OnnxPruneError(
                f"output '{self.output}' has shape {batch_out.shape} for a batch of "
                f"{plural(rows, 'sample')}; it must have one row per sample"
            )
        if self.example_shape is None:
            self.example_shape = batch_out.shape
            self.is_2d = batch_out.ndim == 2
            if self.labels is not None and self.is_2d:
                self._check_label_range(batch_out.shape[1])
        if self.labels is not None and self.is_2d:
            predicted = np.argmax(batch_out, axis=1)
            self.correct += int(np.sum(predicted == self.labels[self.seen:self.seen + rows]))
        self.seen += rows

    def _check_label_range(self, classes: int) -> None:
        """Labels counted from 1, or -1 for 'unknown', would silently score as wrong."""
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= classes:
            raise OnnxPruneError(
                f"labels range {low}..{high} but output '{self.output}' has {classes} classes: "
                f"labels must be class indices 0..{classes - 1}"
            )


def _run_all(model: _Model, ref: _Model | None, batch_size, progress, keep_embeddings):
    """Run the model (and reference) over all samples, feeding each batch's outputs to stats."""
    labels = model.samples.get(LABELS_KEY)
    # a fixed batch dimension sets the batch size; a reference fixing another cuts it again
    batch_size = model.fixed_batch or (ref.fixed_batch if ref else None) or batch_size
    stats = _OutputStats(labels, model.output)
    ref_stats = _OutputStats(labels, ref.output) if ref else None
    fidelity = _Fidelity(keep_embeddings, model.output) if ref else None
    ref_batches = iter_batches(ref.samples, batch_size) if ref else None
    with progress_counter(progress, "evaluate", "sample", num_samples(model.samples)) as bar:
        for batch in iter_batches(model.samples, batch_size):
            rows = batch_rows(batch)
            out = model.run(batch)
            stats.add(out, rows)
            if ref:
                ref_out = ref.run(next(ref_batches))
                ref_stats.add(ref_out, rows)
                fidelity.add(out, ref_out)
            bar.update(rows)
    return stats, ref_stats, fidelity


def _check_file(model, which: str) -> None:
    """A model path that is missing, a folder or not a regular file fails in prune's words,
    naming which model, not with onnxruntime's NO_SUCHFILE / INVALID_PROTOBUF."""
    if isinstance(model, (str, os.PathLike)):
        check_model_file(Path(model), which)


def _session(model, device: str) -> ort.InferenceSession:
    """A path, bytes, or a ModelProto (a pruned result may refer to its data files by absolute
    path, which onnxruntime takes only through session_for)."""
    if isinstance(model, onnx.ModelProto):
        return session_for(no_relative_data(model, "the model"), device)
    return make_session(model, device)


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    rows = batch_rows(batch)
    if rows == size:
        return batch
    # Repeat the last sample; its outputs are cut off again after the run.
    return {k: np.concatenate([v, np.repeat(v[-1:], size - rows, axis=0)]) if v.ndim else v
            for k, v in batch.items()}


class _Fidelity:
    """Per-sample agreement between model and reference outputs, accumulated over batches."""

    def __init__(self, keep_embeddings: bool, output: str):
        self.keep_embeddings = keep_embeddings
        self.output = output
        self.cosine_sum = 0.0
        self.top1_agree = 0
        self.max_abs_diff = 0.0
        self.finite_values = 0  # (model, reference) output pairs both finite
        self.nonfinite_samples = 0
        self.count = 0
        self.is_2d = False
        self.embeddings: list[np.ndarray] = []
        self.ref_embeddings: list[np.ndarray] = []

    def add(self, out: np.ndarray, ref: np.ndarray) -> None:
        if out.shape != ref.shape:
            raise OnnxPruneError(
                f"output '{self.output}' shapes differ: model {out.shape}, reference {ref.shape}"
            )
        a = out.reshape(len(out), -1).astype(np.float64)
        b = ref.reshape(len(ref), -1).astype(np.float64)
        # NaN / inf where the reference is finite: the pruned model broke on that sample. Such
        # rows count as orthogonal, and the largest change is taken over the finite values.
        broken, largest, finite_values = output_change(b, a)
        self.nonfinite_samples += int(np.count_nonzero(broken.any(axis=1)))
        self.finite_values += finite_values
        self.max_abs_diff = max(self.max_abs_diff, largest)
        with np.errstate(invalid="ignore", over="ignore"):
            self.cosine_sum += float(np.sum(np.nan_to_num(_row_cosine(a, b), nan=0.0)))
        self.is_2d = out.ndim == 2
        if self.is_2d:
            self.top1_agree += int(np.sum(np.argmax(out, axis=1) == np.argmax(ref, axis=1)))
            if self.keep_embeddings and np.issubdtype(out.dtype, np.floating):
                self.embeddings.append(np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0))
                self.ref_embeddings.append(b)
        self.count += len(out)

    def metrics(self) -> dict:
        n = max(self.count, 1)
        # no finite value to compare: no largest change to report (0 would read as identical)
        no_change = self.nonfinite_samples and not self.finite_values
        result = {"mean_cosine": self.cosine_sum / n,
                  "max_abs_diff": None if no_change else self.max_abs_diff,
                  "nonfinite_samples": self.nonfinite_samples}
        if self.is_2d:
            result["top1_agreement"] = self.top1_agree / n
            if self.embeddings and self.count >= 2:
                same = (_nearest_neighbours(np.concatenate(self.embeddings))
                        == _nearest_neighbours(np.concatenate(self.ref_embeddings)))
                result["retrieval_agreement"] = float(np.mean(same))
        return result


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per row; two all-zero rows count as identical, one as orthogonal."""
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(na * nb > 0, dot / (na * nb), 0.0)
    return np.where(both_zero, 1.0, cos)


def _nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar OTHER row (ties: lowest index)."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.where(norms > 0, norms, 1.0)
    nearest = np.empty(len(unit), dtype=np.int64)
    for start in range(0, len(unit), _NEIGHBOUR_BLOCK):
        sim = unit[start:start + _NEIGHBOUR_BLOCK] @ unit.T
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf  # a sample is not its own neighbour
        nearest[start:start + len(sim)] = np.argmax(sim, axis=1)
    return nearest
