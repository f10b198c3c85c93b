"""tools/benchmark.py: the --quick smoke run writes its three outputs with the expected rows; the
rank statistics, the depth count and the README splice are right on small known cases."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import benchmark  # noqa: E402
from onnxprune.graph import find_layers  # noqa: E402
import benchmark_report  # noqa: E402


def test_quick_run_writes_tables_plot_and_rows(tmp_path):
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((tmp_path / "benchmark.json").read_text())
    quick = benchmark.QUICK
    rows = result["rows"]
    assert result["settings"]["models"] == list(quick["models"])
    assert [r["method"] for r in rows if r["tool"] == "dense"] == ["dense"]
    for method in quick["methods"]:
        trail = [r for r in rows if r["tool"] == "onnxprune" and r["method"] == method]
        assert [r["target_sparsity"] for r in trail] == list(quick["sparsities"])
        assert all(r["ok"] and 0 <= r["metrics"]["accuracy"] <= 1 for r in trail)
        # one prune() call for all levels: the same trail time, split evenly
        assert len({r["trail_wall_s"] for r in trail}) == 1
        assert all(r["trail_levels"] == len(quick["sparsities"]) for r in trail)
        for r in trail:
            assert abs(r["achieved_sparsity"] - r["target_sparsity"]) < 1e-3
            assert sum(layer["zeros"] for layer in r["layers"]) == r["zeros"]
            assert r["peak_rss_mb"] >= r["imported_rss_mb"] > 0
    for name in quick["baselines"]:
        base = [r for r in rows if r["tool"] == "onnxsim" and r["method"] == name]
        assert [r["target_sparsity"] for r in base] == list(quick["sparsities"])
        for r in base:  # onnxsim is an optional extra: without it the rows say so
            assert r["ok"] or "onnxsim" in r["error"]
    study = result["layer_study"]
    layers, _ = find_layers(onnx.load(benchmark.model_files(quick["models"][0]).model))
    assert [r["name"] for r in study["layers"]] == [layer.name for layer in layers]
    assert all(0 <= r["accuracy"] <= 1 for r in study["layers"])
    text = (tmp_path / "benchmark.md").read_text()
    assert f"## {quick['models'][0]}" in text and "## Findings" in text
    assert "| `global-mt` |" in text


def test_spearman_with_ties_and_permutation_p():
    x = np.array([1.0, 2.0, 2.0, 3.0])
    assert list(benchmark.ranks(x)) == [1.0, 2.5, 2.5, 4.0]
    assert benchmark.spearman(np.arange(6.0), np.arange(6.0) ** 3) == pytest.approx(1.0)
    assert benchmark.spearman(np.arange(6.0), -np.arange(6.0)) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) vs (2, 1, 4, 3): Pearson of the ranks
    assert benchmark.spearman(x, np.array([20.0, 10.0, 40.0, 30.0])) == pytest.approx(
        np.corrcoef([1, 2.5, 2.5, 4], [2, 1, 4, 3])[0, 1])
    assert np.isnan(benchmark.spearman(np.ones(5), np.arange(5.0)))
    # a perfect order of 7 items: only the identity permutation is as extreme (1/5040)
    assert benchmark.permutation_p(np.arange(7.0), np.arange(7.0), n=20000) < 0.002
    assert benchmark.permutation_p(np.arange(7.0), -np.arange(7.0), n=2000) == 1.0


def test_weight_layers_after_counts_the_longest_path():
    resnet = onnx.load(ROOT / "models" / "animal_resnet.onnx")
    names = [i.name for i in resnet.graph.initializer if i.name.endswith("conv.weight")
             or i.name == "fc.weight"]
    after = benchmark.weight_layers_after(resnet, names)
    assert after["fc.weight"] == 0
    assert after["stem.conv.weight"] == max(after.values())
    # a shortcut skips its block's two branch convs: fewer layers follow it than its first branch
    assert after["blocks.1.shortcut.conv.weight"] == after["blocks.1.branch2.conv.weight"]
    assert after["blocks.1.branch1.conv.weight"] == after["blocks.1.branch2.conv.weight"] + 1


def test_readme_section_is_replaced_between_the_markers():
    text = f"# t\n\n{benchmark_report.README_START}\nold\n{benchmark_report.README_END}\ntail\n"
    new = benchmark_report.replace_section(text, "table\n")
    assert new == f"# t\n\n{benchmark_report.README_START}\ntable\n{benchmark_report.README_END}\ntail\n"
    assert benchmark_report.replace_section(new, "again").count("table") == 0
    with pytest.raises(SystemExit):
        benchmark_report.replace_section("no markers", "x")


def test_merge_replaces_only_the_measured_rows_in_place():
    def row(model, method, s, value):
        return {"model": model, "method": method, "target_sparsity": s, "metrics": {"v": value}}

    old = {"command": "full", "environment": {"date": "d0"}, "wall_s": 600,
           "settings": {"only_at": {"a:x": [0.9], "b:x": [0.9]}}, "rows": [
        row("a", "dense", 0, 1), row("a", "x", 0.5, 1), row("a", "y", 0.5, 1),
        row("b", "dense", 0, 1), row("b", "x", 0.5, 1)]}
    new = {"command": "partial", "environment": {"date": "d1"}, "wall_s": 60,
           "settings": {"only_at": {"a:z": [0.5], "b:y": [0.5]}}, "rows": [
        row("a", "dense", 0, 2), row("a", "x", 0.5, 2), row("a", "x", 0.9, 2), row("a", "z", 0.5, 2)]}
    result = benchmark.merged(old, new)
    assert [(r["model"], r["method"], r["metrics"]["v"]) for r in result["rows"]] == [
        ("a", "dense", 1), ("a", "x", 2), ("a", "x", 2), ("a", "y", 1), ("a", "z", 2),
        ("b", "dense", 1), ("b", "x", 1)]
    assert result["updates"] == [{"command": "partial", "date": "d1", "wall_s": 60,
                                  "rows": ["a:x", "a:z"]}]
    assert result["command"] == "full"
    assert result["settings"]["only_at"] == {"b:x": [0.9], "a:z": [0.5]}
    # a later update of a:x keeps the one above only for the row it alone still stands for (a:z)
    again = dict(new, environment={"date": "d2"}, rows=[row("a", "x", 0.5, 3)])
    assert [u["date"] for u in benchmark.merged(result, again)["updates"]] == ["d1", "d2"]
    again["rows"].append(row("a", "z", 0.5, 3))
    assert [u["date"] for u in benchmark.merged(result, again)["updates"]] == ["d2"]


def test_calibration_draws_are_the_prefix_then_seeded_subsets():
    import calib_draws

    calib = {"input": np.arange(20, dtype=np.float32)[:, None], "labels": np.arange(20)}
    draws = calib_draws.draws(calib, 8, 3)
    assert len(draws) == 4 and all(set(d) == {"input"} for d in draws)  # labels never reach prune
    assert draws[0]["input"][:, 0].tolist() == list(range(8))  # the benchmark's samples
    picked = [tuple(d["input"][:, 0]) for d in draws[1:]]
    assert all(len(set(p)) == 8 and list(p) == sorted(p) for p in picked)  # no repeats, in order
    assert len(set(picked)) == 3  # each seed its own subset
    assert picked == [tuple(d["input"][:, 0]) for d in calib_draws.draws(calib, 8, 3)[1:]]
