"""Evaluation metrics folded batch by batch, pure numpy: accuracy of a classifier's output on
labels, and a model's fidelity to a reference model's output, sample by sample.

Only running sums are kept, except for embeddings (whose nearest neighbours are found across
the whole data set at the end). Outputs arrive as numpy arrays with one row per sample; a
classifier's per-class scores as a (samples, classes) array in sorted class order.
"""

from __future__ import annotations

import numpy as np

from onnxprune.errors import OnnxPruneError

# Rows of the similarity matrix computed at once when finding nearest neighbours.
_NEIGHBOUR_BLOCK = 512


def output_change(ref: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, float, int]:
    """How far a pruned model's output moved from the reference's, finite values only.

    (where out is NaN / inf but ref is finite, the largest |ref - out| over values finite in both,
    how many values are finite in both). Verification and eval both measure this way.
    """
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    ref_finite, out_finite = np.isfinite(ref), np.isfinite(out)
    both = ref_finite & out_finite
    with np.errstate(invalid="ignore", over="ignore"):
        largest = float(np.abs(ref - out)[both].max(initial=0.0))
    return ref_finite & ~out_finite, largest, int(np.count_nonzero(both))


def output_role(out: np.ndarray) -> str | None:
    """What a classifier's output holds: per-class "scores", predicted "labels", or neither."""
    if out.ndim == 2:
        return "scores"
    return "labels" if out.ndim == 1 and out.dtype.kind in "biu" else None


def classes_text(classes: list) -> str:
    """A map output's classes for a message: all of them, or the first two and the last."""
    shown = classes if len(classes) <= 10 else [*classes[:2], "...", classes[-1]]
    return ", ".join(map(str, shown))


class LabelAccuracy:
    """Top-1 accuracy of one model's output against integer labels, fed batch by batch.

    The first batch tells what the output holds (output_role): scores are compared by their
    argmax, predicted labels as they are; any other output counts nothing (accuracy None).
    """

    def __init__(self, labels: np.ndarray, output: str):
        self.labels = labels
        self.output = output  # its name, for messages
        self.correct = 0
        self.seen = 0
        self.role: str | None = None
        self.first_shape: tuple[int, ...] | None = None
        self.first_dtype: np.dtype | None = None

    def add(self, out: np.ndarray, classes: list | None = None) -> None:
        """`out`: the next rows of the output; `classes`: a map output's classes, in column
        order."""
        rows = len(out)
        if self.first_shape is None:
            self.first_shape, self.first_dtype = out.shape, out.dtype
            self.role = output_role(out)
            if self.role == "scores":
                self._check_label_range(out.shape[1], classes)
        if self.role is None:
            self.seen += rows
            return
        if self.role == "labels":
            predicted = out
        else:
            predicted = np.argmax(out, axis=1)
            if _class_values(classes):  # ZipMap's integer classes: compare labels with them
                predicted = np.asarray(classes)[predicted]
        self.correct += int(np.sum(predicted == self.labels[self.seen:self.seen + rows]))
        self.seen += rows

    @property
    def accuracy(self) -> float | None:
        """Correct predictions per label; None where the output is no classifier's."""
        return None if self.role is None else self.correct / len(self.labels)

    def _check_label_range(self, columns: int, classes: list | None) -> None:
        """Labels counted from 1, or -1 for 'unknown', would silently score as wrong."""
        low, high = int(self.labels.min()), int(self.labels.max())
        if _class_values(classes):
            if not np.all(np.isin(self.labels, classes)):
                raise OnnxPruneError(
                    f"labels range {low}..{high} but output '{self.output}' has classes "
                    f"{classes_text(classes)}: labels must be among them"
                )
        elif low < 0 or high >= columns:
            raise OnnxPruneError(
                f"labels range {low}..{high} but output '{self.output}' has {columns} classes: "
                f"labels must be class indices 0..{columns - 1}"
            )


def _class_values(classes: list | None) -> bool:
    """A map output keyed by integer classes, whose labels are the class values (string
    classes leave labels as indices into the sorted class names)."""
    return bool(classes) and all(isinstance(c, (int, np.integer)) for c in classes)


class Fidelity:
    """Per-sample agreement between a model's and a reference's outputs, fed batch by batch.

    Predicted labels (1-D integers) agree or not; other outputs are compared as flat rows
    (mean cosine, largest change, samples broken to NaN / inf), 2-D ones by their argmax too,
    and with ``keep_embeddings`` 2-D float ones by their nearest neighbours as well.
    """

    def __init__(self, keep_embeddings: bool, output: str):
        self.keep_embeddings = keep_embeddings
        self.output = output  # its name, for messages
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
        if output_role(out) == "labels" and output_role(ref) == "labels":
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
            self.cosine_sum += float(np.sum(np.nan_to_num(row_cosine(a, b), nan=0.0)))
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
                result["retrieval_agreement"] = retrieval_agreement(
                    np.concatenate(self.embeddings), np.concatenate(self.ref_embeddings))
        return result


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per row; two all-zero rows count as identical, one as orthogonal."""
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(na * nb > 0, dot / (na * nb), 0.0)
    return np.where(both_zero, 1.0, cos)


def retrieval_agreement(embeddings: np.ndarray, ref_embeddings: np.ndarray) -> float:
    """The share of samples whose nearest neighbour is the same under both embeddings."""
    return float(np.mean(nearest_neighbours(embeddings) == nearest_neighbours(ref_embeddings)))


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
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
