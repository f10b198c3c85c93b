"""The per-layer report: a table for people, a dict / JSON for machines."""
from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass, field

from .graph import RECURRENT_OPS


@dataclass
class LayerRow:
    name: str
    op: str
    shape: list[int]
    dtype: str
    params: int
    zeros_before: int
    zeros_after: int
    graph: str = ""  # subgraph path, "" for the main graph
    note: str = ""
    node: str = ""  # the node that uses it (a readable name where the tensor's is generated)

    @property
    def sparsity_before(self) -> float:
        return self.zeros_before / self.params if self.params else 0.0

    @property
    def sparsity_after(self) -> float:
        return self.zeros_after / self.params if self.params else 0.0


@dataclass
class PruneReport:
    method: str
    target_sparsity: float
    refit: bool = False  # --refit: kept weights re-solved on the calibration data
    layers: list[LayerRow] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    input_bytes: int = 0
    input_files: list[str] = field(default_factory=list)  # the model file and its data files, as read
    output_bytes: int = 0  # dense storage (or what was written)
    sparse_output_bytes: int = 0  # with --storage sparse (measured if written, else estimated)
    storage: str = "dense"
    output_files: list[str] = field(default_factory=list)
    verification: dict | None = None
    calibration: dict | None = None
    ltp: dict | None = None  # learned thresholds, lambda and objective trajectory
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def zeros(self) -> int:
        return sum(r.zeros_after for r in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for row, layer in zip(d["layers"], self.layers):
            row["sparsity_before"] = layer.sparsity_before
            row["sparsity_after"] = layer.sparsity_after
        d.update(prunable_params=self.params, zeros=self.zeros, sparsity=self.sparsity)
        return d

    def format(self, max_rows: int | None = None) -> str:
        notes = any(r.note for r in self.layers)
        head = ("tensor", "op", "shape", "params", "before", "after") + (("note",) if notes else ())
        rows = [(_label(r), r.op,
                 "x".join(map(str, r.shape)) or "scalar", f"{r.params:,}",
                 _pct(r.sparsity_before), _pct(r.sparsity_after)) + ((r.note,) if notes else ())
                for r in self.layers]
        if max_rows is not None and len(rows) > max_rows:
            hidden = len(rows) - max_rows
            rows = (rows[:max_rows // 2] + [("...", f"{hidden} more") + ("",) * (len(head) - 2)]
                    + rows[-(max_rows - max_rows // 2):])
        # names are cut at 60 characters; the note column, the last, runs as long as its notes
        widths = [max(len(str(x)) for x in col) if i == _NOTE else min(max(len(str(x)) for x in col), 60)
                  for i, col in enumerate(zip(head, *rows))]
        fmt = lambda row: "  ".join(  # noqa: E731
            str(c).rjust(w) if i in _RIGHT else str(c) if i == _NOTE else _clip(str(c), w).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        # one label over the two sparsity columns keeps them narrow
        span = widths[_BEFORE] + 2 + widths[_BEFORE + 1]
        over = (" " * (sum(widths[:_BEFORE]) + 2 * _BEFORE) + "sparsity".center(span)).rstrip()
        lines = [over, fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        lines.append("")
        lines.append(f"method {self._method_label()}: {self.zeros:,} of {self.params:,} prunable weights "
                     f"are zero, sparsity {_pct(self.sparsity, 2)} (target {_pct(self.target_sparsity, 2)}), "
                     f"{plural(len(self.layers), 'tensor')}")
        by_reason: dict[str, list[str]] = {}
        for s in self.skipped:
            by_reason.setdefault(s["reason"], []).append(shown_name(s["name"], s.get("node", ""), s["op"]))
        for reason, names in by_reason.items():  # a reason may hold brackets and colons: it goes last
            lines.append("skipped " + ", ".join(names[:6])
                         + (f" and {len(names) - 6} more" if len(names) > 6 else "") + f": {reason}")
        sizes = f"file size: input {_mb(self.input_bytes)}, output {_mb(self.output_bytes)} ({self.storage})"
        if self.storage == "dense" and self.sparse_output_bytes:
            sizes += f", about {_mb(self.sparse_output_bytes)} with --storage sparse"
        lines.append(sizes)
        if self.calibration:
            c = self.calibration
            lines.append(f"calibration: {plural(c.get('samples'), 'sample')}"
                         f"{' (RANDOM, as asked)' if c.get('random') else ''} "
                         f"on {c.get('provider')}, {c.get('seconds', 0):.1f} s"
                         + (f" in {c['passes']} passes (layer groups within --max-memory)"
                            if c.get("groups", 1) > 1 else ""))
        if self.verification and self.verification.get("provider") is None:
            lines.append(f"verification: {self.verification['note']}")
        elif self.verification:
            v = self.verification
            diffs = ", ".join(f"{k} {x:.3g}" for k, x in v.get("max_abs_diff", {}).items())
            sizes = ", ".join(f"{k}={n}" for k, n in (v.get("symbolic_dims") or {}).items())
            lines.append(f"verified in onnxruntime ({v.get('provider')}"
                         + (f"; {sizes}, set with --dim" if sizes else "") + "): "
                         + (f"max abs output change vs input model: {diffs}" if diffs else "runs")
                         + (f"; {v['note']}" if v.get("note") else ""))
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.output_files:
            lines.append("wrote " + ", ".join(self.output_files))
        return "\n".join(lines)

    def _method_label(self) -> str:
        sequential = bool(self.calibration and self.calibration.get("sequential"))
        return self.method + (" + refit" if self.refit else "") + (", sequential" if sequential else "")


_BEFORE, _RIGHT, _NOTE = 4, {3, 4, 5}, 6  # table columns: sparsity before, right-aligned, note


def plural(n, noun: str) -> str:
    """`n noun`, with an s unless n is 1."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _label(row: LayerRow) -> str:
    """The tensor's name, or its node's (shown_name), under its subgraph's path; the JSON
    keeps both names."""
    name = shown_name(row.name, row.node, row.op)
    return name if not row.graph else f"{row.graph}/{name.lstrip('/')}"


def shown_name(name: str, node: str, op: str = "") -> str:
    """The node's label where an exporter generated the tensor's name (onnx::MatMul_733,
    dynamo's val_82), with the name too for a recurrent node's W, R and B."""
    if not node or not (name.startswith("onnx::") or not name or re.fullmatch(r"val_\d+", name)):
        return name
    return f"{node} ({name})" if op in RECURRENT_OPS and name else node


def progress_bar(items, enabled: bool, label: str, unit: str, total: int | None = None):
    """`items`, with a progress bar on stderr when enabled and stderr is a terminal; `total`:
    how many items there are, where `items` cannot tell (a generator)."""
    if not enabled:
        return items
    # every finished step drawn at once (mininterval 0): a stale count would sit on screen through
    # the next step, which may be the one that takes a minute
    return _bar(items, label, unit, total, mininterval=0)


def progress_counter(enabled: bool, label: str, unit: str, total: int | None = None):
    """A bar advanced by `.update(n)` (use it as a context manager), shown as progress_bar's is."""
    return _bar(None, label, unit, total, disable=not enabled)


def _bar(items, label: str, unit: str, total: int | None, disable: bool = False, **kwargs):
    """Drawn at once, at 0 of total, so a slow first step shows; not at all where stderr is
    redirected to a file (disable=None), which redraws and cursor moves would fill."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=label, unit=unit, leave=False, file=sys.stderr,
                disable=True if disable else None, **kwargs)
