"""Measure a model on sample data: top-1 accuracy against labels, fidelity to a reference model.

Fidelity compares one output of the model (the first, or the one named) with the reference's
output of that name (by default its first), sample by sample. The output is a tensor, or a
classifier's per-class scores as a sequence of maps (skl2onnx's ZipMap), taken as a (samples,
classes) array in sorted class order. A 1-D integer output is a classifier's predicted labels:
accuracy and fidelity count equal labels. Only running statistics are kept, except for embedding
models (2-D float tensor output, no labels), whose outputs are kept to compare nearest
neighbours across the whole data set. Each model gets the data cast to its own input types, in
batches of its own fixed batch size where its inputs fix one.
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
from onnxprune.calibration.source import model_inputs
from onnxprune.errors import OnnxPruneError
from onnxprune.external_session import session_for
from onnxprune.modelio import check_model_file, no_relative_data
from onnxprune.report import plural, progress_counter
from onnxprune.runtime import (
    ORT_TYPES,
    check_device,
    device_note,
    make_session,
    provider_name,
    run,
    session_inputs,
)
from onnxprune.verify import comparable, output_change

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
    ``accuracy`` needs labels and a classifier's output: 2-D (samples, classes) scores, whose
    argmax is compared with labels in [0, classes) (with the class values of a map output whose
    classes are integers), or 1-D integer predicted labels, compared with the labels as they are.
    The fidelity metrics (``mean_cosine``, ``max_abs_diff``, ``top1_agreement`` for 2-D outputs,
    ``retrieval_agreement`` for unlabelled 2-D float tensor outputs, ``label_agreement`` for 1-D
    integer outputs) need a ``reference`` model.
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
    if labels is not None and ref is None and not _may_be_classifier(measured.arg):
        shape = tuple(measured.arg.shape)
        raise _not_a_classifier(measured, f"{_tensor_type(measured.arg.type)} of shape {shape}")

    started = time.perf_counter()
    # nearest-neighbour agreement is for embedding models, not for a classifier's scores
    keep_embeddings = labels is None and not _is_map(measured.arg.type)
    stats, ref_stats, fidelity = _run_all(measured, ref, batch_size, progress, keep_embeddings)
    result: dict = {
        "samples": num_samples(samples),
        "provider": provider_name(measured.session),
        "output": measured.output,
    }
    if labels is not None:
        if stats.role is not None:
            result["accuracy"] = stats.correct / len(labels)
            if ref_stats is not None and ref_stats.role is not None:
                result["reference_accuracy"] = ref_stats.correct / len(labels)
        elif ref is None:
            found = f"{stats.example_dtype} of shape {stats.example_shape}"
            raise _not_a_classifier(measured, found)
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
    # the classes of a map output, in column order; set by the first run
    classes: list | None = None

    @property
    def arg(self) -> ort.NodeArg:
        return next(o for o in self.session.get_outputs() if o.name == self.output)

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
        kind = next(o.type for o in session.get_outputs() if o.name == measured)
        others = [o.name for o in session.get_outputs()
                  if o.name != measured and _measurable(o.type)]
        hint = f"; choose another output ({', '.join(others)})" if others else ""
        if kind == "tensor(bfloat16)":
            raise OnnxPruneError(f"{what}output '{measured}' is bfloat16, which onnxruntime's "
                                 f"Python API cannot return: eval cannot measure it{hint}")
        if not _measurable(kind):
            raise OnnxPruneError(f"{what}eval cannot measure output '{measured}' of type {kind}: "
                                 "it measures tensors, and sequences of maps (a classifier's "
                                 f"per-class scores){hint}")
        try:
            inputs = _inputs(session, model)
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
            out = self._as_array(run(self.session, [self.output], _pad(piece, size))[0])
            parts.append(out[:min(size, rows - start)] if self.fixed_batch else out)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _as_array(self, value) -> np.ndarray:
        """A sequence of maps as a (samples, classes) array; its classes must stay the same
        from batch to batch, or columns of different batches would mean different classes."""
        out = comparable(value)
        if out is None:
            raise OnnxPruneError(f"output '{self.output}' holds values eval cannot compare as "
                                 "numbers (such as maps whose classes differ between samples)")
        if isinstance(value, list):
            classes = sorted(value[0])
            if self.classes is None:
                self.classes = classes
            elif classes != self.classes:
                raise OnnxPruneError(f"output '{self.output}': the classes of its maps change "
                                     "from batch to batch")
        return out


def _measurable(onnx_type: str) -> bool:
    """Numeric tensors, and a classifier's per-class scores as a sequence of maps."""
    return _is_map(onnx_type) or (onnx_type in ORT_TYPES and onnx_type != "tensor(bfloat16)")


def _is_map(onnx_type: str) -> bool:
    return onnx_type.startswith("seq(map(")


def _is_integer(onnx_type: str) -> bool:
    return onnx_type.startswith(("tensor(int", "tensor(uint")) or onnx_type == "tensor(bool)"


def _tensor_type(onnx_type: str) -> str:
    return onnx_type.removeprefix("tensor(").removesuffix(")")


def _is_classifier(arg: ort.NodeArg) -> bool:
    """Declared as a classifier's scores (2-D, or a map) or predicted labels (1-D integers)."""
    rank = len(arg.shape)
    return _is_map(arg.type) or _measurable(arg.type) and (
        rank == 2 or rank == 1 and _is_integer(arg.type))


def _may_be_classifier(arg: ort.NodeArg) -> bool:
    """An undeclared rank (shape [], as for a scalar) is judged on the first batch's output."""
    return _is_classifier(arg) or _measurable(arg.type) and not arg.shape


def _not_a_classifier(model: _Model, found: str) -> OnnxPruneError:
    """Names only the outputs labels can be measured on (so that one's error never points
    back at this one)."""
    others = [o.name for o in model.session.get_outputs()
              if o.name != model.output and _is_classifier(o)]
    hint = f" or choose another output ({', '.join(others)})" if others else ""
    return OnnxPruneError(
        f"labels need a (samples, classes) output of scores or a (samples,) output of integer "
        f"labels, but '{model.output}' is {found}; give a reference model to measure fidelity "
        f"instead{hint}"
    )


def _inputs(session: ort.InferenceSession, model) -> list[tuple]:
    """session_inputs, with shape None (any rank) for an input the model declares without a
    shape: onnxruntime reports [] for it, as for a scalar, so only the model tells them apart."""
    inputs = session_inputs(session)
    if not any(shape == [] for _, _, shape in inputs):
        return inputs
    unshaped = _unshaped_inputs(model)
    return [(name, dtype, None if name in unshaped else shape) for name, dtype, shape in inputs]


def _unshaped_inputs(model) -> set[str]:
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        proto = onnx.load_from_string(bytes(model))
    else:  # only the graph is needed: the weights stay in their data files
        proto = onnx.load(os.fspath(model), load_external_data=False)
    return {name for name, _, dims in model_inputs(proto) if dims is None}


def format_metrics(d: Mapping) -> str:
    """Human-readable, one metric per line."""
    rows = []
    for key in ("accuracy", "reference_accuracy", "mean_cosine", "top1_agreement",
                "label_agreement", "retrieval_agreement", "max_abs_diff"):
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
        self.example_dtype: np.dtype | None = None
        self.role: str | None = None  # "scores", "labels", or None: not a classifier's output

    def add(self, batch_out: np.ndarray, rows: int, classes: list | None = None) -> None:
        """`classes`: a map output's classes, in column order."""
        if batch_out.ndim == 0 or batch_out.shape[0] != rows:
            raise OnnxPruneError(
                f"output '{self.output}' has shape {batch_out.shape} for a batch of "
                f"{plural(rows, 'sample')}; it must have one row per sample"
            )
        if self.example_shape is None:
            self.example_shape, self.example_dtype = batch_out.shape, batch_out.dtype
            self.role = _role(batch_out)
            if self.labels is not None and self.role == "scores":
                self._check_label_range(batch_out.shape[1], classes)
        if self.labels is None or self.role is None:
            self.seen += rows
            return
        if self.role == "labels":
            predicted = batch_out
        else:
            predicted = np.argmax(batch_out, axis=1)
            if _class_values(classes):  # ZipMap's integer classes: compare labels with them
                predicted = np.asarray(classes)[predicted]
        self.correct += int(np.sum(predicted == self.labels[self.seen:self.seen + rows]))
        self.seen += rows

    def _check_label_range(self, columns: int, classes: list | None) -> None:
        """Labels counted from 1, or -1 for 'unknown', would silently score as wrong."""
        low, high = int(self.labels.min()), int(self.labels.max())
        if _class_values(classes):
            if not np.all(np.isin(self.labels, classes)):
                raise OnnxPruneError(
                    f"labels range {low}..{high} but output '{self.output}' has classes "
                    f"{_classes_text(classes)}: labels must be among them"
                )
        elif low < 0 or high >= columns:
            raise OnnxPruneError(
                f"labels range {low}..{high} but output '{self.output}' has {columns} classes: "
                f"labels must be class indices 0..{columns - 1}"
            )


def _role(out: np.ndarray) -> str | None:
    """What a classifier's output holds: per-class "scores", predicted "labels", or neither."""
    if out.ndim == 2:
        return "scores"
    return "labels" if out.ndim == 1 and out.dtype.kind in "biu" else None


def _classes_text(classes: list) -> str:
    shown = classes if len(classes) <= 10 else [*classes[:2], "...", classes[-1]]
    return ", ".join(map(str, shown))


def _class_values(classes: list | None) -> bool:
    """A map output keyed by integer classes, whose labels are the class values (string
    classes leave labels as indices into the sorted class names)."""
    return bool(classes) and all(isinstance(c, (int, np.integer)) for c in classes)


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
            stats.add(out, rows, model.classes)
            if ref:
                ref_out = ref.run(next(ref_batches))
                if ref.classes != model.classes:
                    raise OnnxPruneError(
                        f"output '{model.output}' has classes {_classes_text(model.classes or [])} "
                        f"in the model but {_classes_text(ref.classes or [])} in the reference")
                ref_stats.add(ref_out, rows, ref.classes)
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
        self.label_agree = 0
        self.is_labels = False
        self.embeddings: list[np.ndarray] = []
        self.ref_embeddings: list[np.ndarray] = []

    def add(self, out: np.ndarray, ref: np.ndarray) -> None:
        if out.shape != ref.shape:
            raise OnnxPruneError(
                f"output '{self.output}' shapes differ: model {out.shape}, reference {ref.shape}"
            )
        self.count += len(out)
        if _role(out) == "labels" and _role(ref) == "labels":
            # predicted labels: the same or not (a cosine of label numbers means nothing)
            self.is_labels = True
            self.label_agree += int(np.sum(out == ref))
            return
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

    def metrics(self) -> dict:
        n = max(self.count, 1)
        if self.is_labels:
            return {"label_agreement": self.label_agree / n}
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
