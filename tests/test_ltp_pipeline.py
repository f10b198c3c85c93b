"""LTP and --refit through the pipeline: exact levels, trails, MT floor, plot, real data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

import builders
from onnxprune import prune
from onnxprune.cli import main
from onnxprune.evaluate import evaluate
from onnxprune.methods import ltp
from onnxprune.methods.magnitude import cap_zero_counts, min_keep_count

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_cap_zero_counts_keeps_the_total_and_the_floor():
    sizes = [144, 4608, 5120]
    m = min_keep_count(sum(sizes), 1.0)  # 98 weights per layer
    capped = cap_zero_counts([143, 4156, 4586], sizes, 1.0)
    assert sum(capped) == 143 + 4156 + 4586
    assert all(n - z >= m for n, z in zip(sizes, capped))
    assert cap_zero_counts([10, 20, 30], sizes, 0.05) == [10, 20, 30]  # nothing to clamp


def test_total_l0_prices_every_weight_the_same():
    """A tiny layer with informative inputs is not emptied under the 'total' normalisation."""
    rng = np.random.default_rng(0)
    small, big = rng.standard_normal((1, 4, 8)), rng.standard_normal((1, 64, 256))
    grams = [np.eye(8)[None] * 100.0, np.eye(256)[None]]
    target = round(0.9 * (small.size + big.size))
    layer_form = ltp.learn_thresholds([small, big], grams, target, l0="layer")
    total_form = ltp.learn_thresholds([small, big], grams, target, l0="total")
    assert sum(total_form.zeros) == sum(layer_form.zeros) == target
    assert total_form.zeros[0] < layer_form.zeros[0]


def test_ltp_trail_is_exact_and_monotone(tmp_path):
    data = {"input": np.random.default_rng(2).standard_normal((128, 20)).astype(np.float32)}
    results = prune(builders.mlp_gemm(), [0.5, 0.7, 0.9], method="ltp", calib=data,
                    output=tmp_path / "t.onnx", verify=False)
    assert [Path(f).name for r in results for f in r.report.output_files] == [
        "t.s0.5.onnx", "t.s0.7.onnx", "t.s0.9.onnx"]
    previous = None
    for r in results:
        assert r.report.zeros == round(r.report.target_sparsity * r.report.params)
        zeros = [row.zeros_after for row in r.report.layers]
        if previous:
            assert all(a >= b for a, b in zip(zeros, previous))
        previous = zeros
        assert r.report.ltp["objective"] and "global-mt" in r.report.layers[0].note


def test_ltp_plot_and_report(tmp_path):
    import onnx

    onnx.save(builders.mlp_gemm(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", input=np.random.default_rng(3).standard_normal((64, 20)).astype(np.float32))
    result = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "-s", "0.6", "-m", "ltp", "--calib",
                                       str(tmp_path / "c.npz"), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "global-mt" in result.output and "uniform 60.0%" in result.output


def test_refit_and_ltp_on_the_animal_cnn(tmp_path):
    calib = dict(np.load(MODELS / "animal_calib.npz"))
    test = {k: v[:500] for k, v in np.load(MODELS / "animal_test.npz").items()}
    accuracy = {}
    for name, kwargs in {"global-mt": {}, "global-mt+refit": {"refit": True},
                         "ltp+refit": {"method": "ltp", "refit": True}}.items():
        out = tmp_path / f"{name}.onnx"
        prune(MODELS / "animal_cnn.onnx", 0.9, calib=calib, calib_samples=256, output=out,
              verify=False, **kwargs)
        accuracy[name] = evaluate(out, test, progress=False)["accuracy"]
    assert accuracy["global-mt+refit"] > accuracy["global-mt"] + 0.2, accuracy
    assert accuracy["ltp+refit"] > accuracy["global-mt"] + 0.2, accuracy


def test_dc_within_the_learned_allocation(tmp_path):
    data = {"input": np.random.default_rng(4).standard_normal((128, 20)).astype(np.float32)}
    model = builders.mlp_gemm()
    learned = prune(model, [0.6, 0.8], method="ltp", calib=data, verify=False)
    solved = prune(model, [0.6, 0.8], method="dc", allocation="ltp", calib=data, verify=False)
    mt = prune(model, [0.6, 0.8], method="dc", calib=data, verify=False)
    for a, b, c in zip(learned, solved, mt):
        counts = [row.zeros_after for row in b.report.layers]
        assert counts == [row.zeros_after for row in a.report.layers]  # LTP's budgets, exactly
        assert counts != [row.zeros_after for row in c.report.layers]  # not global-mt's
        assert b.report.ltp["objective"] and all(row.note for row in b.report.layers)
    result = CliRunner().invoke(main, ["prune", "--help"])
    assert "ltp learns" in " ".join(result.output.split())


def test_sequential_with_a_learned_allocation():
    # ltp learns its allocation from the dense model's statistics (one pass), then each layer's
    # weights from the model as pruned so far (one pass per layer)
    data = {"input": np.random.default_rng(4).standard_normal((128, 20)).astype(np.float32)}
    for method, allocation, refit in (("ltp", "global-mt", True), ("ltp", "global-mt", False),
                                      ("dc", "ltp", False)):
        kw = dict(method=method, allocation=allocation, calib=data, refit=refit, verify=False)
        seq = prune(builders.mlp_gemm(), 0.8, sequential=True, **kw)
        one = prune(builders.mlp_gemm(), 0.8, **kw)
        assert seq.report.calibration["passes"] == 1 + len(seq.report.layers)
        assert [r.zeros_after for r in seq.report.layers] == [r.zeros_after for r in one.report.layers]
        w = {t.name: t for t in seq.model.graph.initializer}
        v = {t.name: t for t in one.model.graph.initializer}
        first, last = seq.report.layers[0].name, seq.report.layers[-1].name
        assert w[first].SerializeToString() == v[first].SerializeToString()  # same statistics
        assert w[last].SerializeToString() != v[last].SerializeToString()  # from the pruned model
