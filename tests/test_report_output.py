"""What a person sees: the per-layer table and summary lines, and the progress bars on stderr."""
from __future__ import annotations

import io
import itertools
import sys

import numpy as np
import onnx
import pytest
import tqdm.std
from onnx import TensorProto, helper, numpy_helper

from onnxprune.report import LayerRow, PruneReport, progress_bar, progress_counter


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def slow_clock(monkeypatch):
    """tqdm's clock, 10 s further on at every reading: any delay or redraw interval has passed."""
    ticks = itertools.count(step=10.0)
    monkeypatch.setattr(tqdm.std, "time", lambda: next(ticks))


def _row(name, params, zeros_after, note=""):
    return LayerRow(name, "MatMul", [params], "float32", params, 0, zeros_after, note=note)


def _table(report: PruneReport) -> list[str]:
    lines = report.format().splitlines()
    return lines[:lines.index("")]


# --- progress bars


def test_a_bar_is_drawn_at_its_start_and_after_every_step(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar((x for x in "abc"), True, "calibrating", "batch", total=3)
    assert "calibrating" in terminal.getvalue() and "0/3" in terminal.getvalue()
    for done, _ in enumerate(bar):
        # when step done+1 starts, the `done` finished steps show (a stale count misleads
        # through a long step)
        assert f"{done}/3" in terminal.getvalue().split("\r")[-1]
    terminal.seek(0), terminal.truncate()
    progress_bar(["w1", "w2"], True, "pruning", "tensor")  # a list knows its length
    assert "0/2" in terminal.getvalue()


def test_bars_stay_off_a_redirected_stderr(monkeypatch, slow_clock):
    log = io.StringIO()  # `2>log`: not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    assert list(progress_bar(range(5), True, "pruning", "tensor")) == list(range(5))
    with progress_counter(True, "evaluate", "sample", 5) as bar:
        bar.update(5)
    assert log.getvalue() == ""


def test_progress_off_is_silent_and_leaves_the_items_alone(monkeypatch, slow_clock):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    items = [1, 2]
    assert progress_bar(items, False, "pruning", "tensor") is items
    with progress_counter(False, "evaluate", "sample", 2) as bar:
        bar.update(2)
    assert terminal.getvalue() == ""


# --- the table


def test_sparsity_columns_are_labelled_and_right_aligned():
    report = PruneReport("global-mt", 0.5, layers=[_row("a", 1000, 0), _row("b", 1000, 916)])
    over, head, rule, *rows = _table(report)
    assert head.split() == ["tensor", "op", "shape", "params", "before", "after"]
    # one "sparsity" label over the before and after columns
    start, end = head.index("before"), len(head)
    assert over.strip() == "sparsity" and start <= over.index("sparsity") and len(over) <= end
    assert rows[0].endswith("0.0%   0.0%") and rows[1].endswith("0.0%  91.6%")
    assert len({len(line) for line in (head, rule, *rows)}) == 1


def test_the_rule_under_notes_is_as_wide_as_the_longest_note():
    note = "pruned by magnitude: no calibration statistics for this tensor inside a subgraph body"
    report = PruneReport("dc", 0.5, layers=[_row("a", 10, 5, note), _row("b", 10, 5)])
    over, head, rule, *rows = _table(report)
    assert head.split()[-1] == "note"
    assert rule.split()[-1] == "-" * len(note)
    assert rows[0].endswith(note) and rows[0].index(note) == head.index("note")
    assert rows[1].endswith("50.0%")  # no trailing spaces where there is no note


def test_summary_names_refit_and_reads_cleanly():
    report = PruneReport("global-mt", 0.5, refit=True, layers=[_row("head", 10, 5)],
                         skipped=[{"name": "embed", "op": "Gather",
                                   "reason": "embedding table (use --include)"}],
                         calibration={"samples": 1, "provider": "CPU", "seconds": 0.5})
    text = report.format()
    assert "method global-mt + refit: 5 of 10 prunable weights" in text
    assert "), 1 tensor\n" in text
    assert "skipped embed: embedding table (use --include)" in text
    assert "calibration: 1 sample on CPU" in text
    assert "((" not in text and "))" not in text
    assert PruneReport("global-mt", 0.5).to_dict()["refit"] is False


def test_collapsed_tables_stay_aligned():
    report = PruneReport("layer", 0.5, layers=[_row(f"w{i}", 100, i) for i in range(10)])
    lines = report.format(max_rows=4).splitlines()
    table = lines[1:lines.index("")]
    assert "6 more" in table[4]
    assert len({len(line) for line in table if "more" not in line}) == 1


# --- onnxruntime's messages in the verification note


def test_a_too_new_ir_version_is_said_in_words(tmp_path):
    from onnxprune import prune

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 14  # onnxruntime 1.31 reads at most 13
    path = tmp_path / "ir14.onnx"
    onnx.save(model, path)
    note = prune(path, 0.5, method="layer").report.verification["note"]
    assert "unsupported model IR version 14" in note and "onnxruntime::" not in note


def test_generated_tensor_names_are_shown_by_their_node():
    from onnxprune.report import shown_name

    assert shown_name("onnx::MatMul_7", "/fc/MatMul", "MatMul") == "/fc/MatMul"
    assert shown_name("val_82", "/bert.encoder.layer.0/linear", "MatMul") == "/bert.encoder.layer.0/linear"
    assert shown_name("W", "/MatMul", "MatMul") == "W"  # a root module's parameter keeps its name
    assert shown_name("onnx::LSTM_117", "/lstm/LSTM", "LSTM") == "/lstm/LSTM (onnx::LSTM_117)"
    assert shown_name("onnx::MatMul_7", "", "MatMul") == "onnx::MatMul_7"
