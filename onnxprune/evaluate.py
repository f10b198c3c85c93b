"""Measure a model on sample data: top-1 accuracy against labels, fidelity to a reference model.

Fidelity compares one output of the model (the first, or the one named) with the reference's
output of that name (by default its first), sample by sample. The output is a tensor, or a
classifier's per-class scores as a sequence of maps (skl2onnx's ZipMap), taken as a (samples,
classes) array in sorted class order. A 1-D integer output is a classifier's predicted labels:
accuracy and fidelity count equal labels. Only running statistics are kept, except for embedding
models (2-D float tensor output, no labels), whose outputs are kept to compare nearest
neighbours across the whole data set. Each model gets the data cast to its own input types, in
batches of its own fixed batch size where its inputs fix one.

This module opens the models, checks the data, runs onnxruntime batch by batch and assembles
the result; the metrics themselves are onnxprune.metrics' accumulators (pure numpy).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.data import (
    LABELS_KEY,
    MissingArrays,
    batch_rows,
    check_against_model,
    check_count,
    fixed_batch,
    iter_batches,
    num_samples,
)
from onnxprune.calibration.source import model_inputs, read_samples
from onnxprune.errors import OnnxPruneError
from onnxprune.external_session import session_for
from onnxprune.metrics import Fidelity, LabelAccuracy, classes_text
from onnxprune.modelio import check_model_source, no_relative_data
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
from onnxprune.verify import comparable


def evaluate(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    data,
    *,
    batch_size: int = 64,
    reference: str | os.PathLike | bytes | onnx.ModelProto | None = None,
    device: str = "auto",
    output: str | None = None,
    progress: bool = True,
) -> dict:
    """Run ``model`` over ``data`` and return its metrics as a JSON-ready dict.

    ``data``: a path, a mapping of arrays (or of lists) keyed by input name, an iterable of such
    batches or an object with get_next() (read whole).
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
    check_model_source(model, "model")  # before the data is read: a typo in a path fails at once
    if reference is not None:
        check_model_source(reference, "reference model")
    measured = _Model.open(model, device, output, "model")
    ref = None
    if reference is not None:
        ref = _Model.open(reference, device, output, "reference model")
    wanted = [name for m in (measured, ref) if m is not None for name, _, _ in m.inputs]
    try:
        raw, _ = read_samples(data, names=wanted)  # only the arrays the models take are read
    except MissingArrays as e:
        if ref is not None and not set(e.missing) & {name for name, _, _ in measured.inputs}:
            raise OnnxPruneError(f"reference model: {e}") from None
        raise
    for m in (measured, ref):
        if m is not None:
            m.take(raw)
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
    scored, ref_scored, fidelity = _run_all(measured, ref, batch_size, progress, keep_embeddings)
    result: dict = {
        "samples": num_samples(samples),
        "provider": provider_name(measured.session),
        "output": measured.output,
    }
    if scored is not None:
        if scored.accuracy is not None:
            result["accuracy"] = scored.accuracy
            if ref_scored is not None and ref_scored.accuracy is not None:
                result["reference_accuracy"] = ref_scored.accuracy
        elif ref is None:
            raise _not_a_classifier(measured, f"{scored.first_dtype} of shape {scored.first_shape}")
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
    inputs: list
    samples: dict[str, np.ndarray] | None = None  # set by take()
    # the classes of a map output, in column order; set by the first run
    classes: list | None = None
    which: str = "model"  # or "reference model", named in errors where both could be meant

    @property
    def arg(self) -> ort.NodeArg:
        return next(o for o in self.session.get_outputs() if o.name == self.output)

    @classmethod
    def open(cls, model, device: str, output: str | None, which: str) -> _Model:
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
        except OnnxPruneError as e:
            raise OnnxPruneError(f"{what}{e}") from None
        return cls(session, measured, inputs, which=which)

    def take(self, raw: Mapping) -> None:
        """The data, checked against and cast to this model's inputs."""
        try:
            self.samples = check_against_model(raw, self.inputs)
        except OnnxPruneError as e:
            raise OnnxPruneError(f"{'' if self.which == 'model' else self.which + ': '}{e}") from None

    @property
    def fixed_batch(self) -> int | None:
        return fixed_batch(self.inputs)

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

    def check_rows(self, out: np.ndarray, rows: int) -> None:
        """The metrics take an output as one row per sample of the batch it came from."""
        if out.ndim == 0 or out.shape[0] != rows:
            raise OnnxPruneError(
                f"output '{self.output}' has shape {out.shape} for a batch of "
                f"{plural(rows, 'sample')}; it must have one row per sample"
            )

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


def _run_all(model: _Model, ref: _Model | None, batch_size, progress, keep_embeddings):
    """Run the model (and reference) over all samples, feeding each batch's outputs to the
    accumulators: (model's accuracy, reference's accuracy, fidelity), each None where not
    measured (no labels; no reference)."""
    labels = model.samples.get(LABELS_KEY)
    # a fixed batch dimension sets the batch size; a reference fixing another cuts it again
    batch_size = model.fixed_batch or (ref.fixed_batch if ref else None) or batch_size
    scored = LabelAccuracy(labels, model.output) if labels is not None else None
    ref_scored = LabelAccuracy(labels, ref.output) if labels is not None and ref else None
    fidelity = Fidelity(keep_embeddings, model.output) if ref else None
    ref_batches = iter_batches(ref.samples, batch_size) if ref else None
    with progress_counter(progress, "evaluate", "sample", num_samples(model.samples)) as bar:
        for batch in iter_batches(model.samples, batch_size):
            rows = batch_rows(batch)
            out = model.run(batch)
            model.check_rows(out, rows)
            if scored is not None:
                scored.add(out, model.classes)
            if ref:
                ref_out = ref.run(next(ref_batches))
                if ref.classes != model.classes:
                    raise OnnxPruneError(
                        f"output '{model.output}' has classes {classes_text(model.classes or [])} "
                        f"in the model but {classes_text(ref.classes or [])} in the reference")
                ref.check_rows(ref_out, rows)
                if ref_scored is not None:
                    ref_scored.add(ref_out, ref.classes)
                fidelity.add(out, ref_out)
            bar.update(rows)
    return scored, ref_scored, fidelity


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
