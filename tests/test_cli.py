"""The command line through click's runner: the main job, and one clear line for each bad input."""
from __future__ import annotations

import json
import os

import onnx
import pytest
from click.testing import CliRunner

import builders
from onnxprune.cli import main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(builders.mlp_gemm(), path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments, code=1):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_prune_default_output_report_and_json(model_path, tmp_path):
    result = run(model_path, "--sparsity", "0.9", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    out = tmp_path / "mlp.pruned.onnx"
    assert out.exists()
    assert "sparsity 90.00%" in result.output and "verified in onnxruntime" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["zeros"] == round(0.9 * report["prunable_params"])
    assert report["method"] == "global-mt" and len(report["layers"]) == 2


def test_prune_subcommand_quiet_and_options(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    result = run("prune", model_path, "-s", "0.5", "-m", "layer", "-o", out, "--quiet",
                 "--storage", "sparse", "--dim", "batch=4")
    assert result.exit_code == 0 and result.output == ""
    assert len(onnx.load(out).graph.sparse_initializer) in (1, 2) or out.exists()


def test_help_lists_every_option():
    text = run("prune", "--help").output
    for option in ("--sparsity", "--method", "--output", "--min-keep", "--mt-variant", "--include",
                   "--exclude", "--storage", "--force", "--no-verify", "--dim", "--device",
                   "--report", "--quiet", "default: global-mt"):
        assert option in text
    assert "onnxprune MODEL --sparsity" in run("--help").output


def test_missing_file(tmp_path):
    assert_one_line_error(run(tmp_path / "nope.onnx", "-s", "0.5"), "no such file")


def test_directory_as_model(tmp_path):
    assert_one_line_error(run(tmp_path, "-s", "0.5"), "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(model_path):
    model_path.chmod(0)
    assert_one_line_error(run(model_path, "-s", "0.5"), "cannot read")


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("hello, this is not a model\n")
    assert_one_line_error(run(path, "-s", "0.5"), "not an ONNX model")


def test_truncated(model_path):
    data = model_path.read_bytes()
    model_path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run(model_path, "-s", "0.5"), "not an ONNX model")


def test_missing_and_truncated_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(builders.mlp_gemm(), path, save_as_external_data=True, location="w.bin",
              size_threshold=0)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[:100])
    assert_one_line_error(run(path, "-s", "0.5"), "truncated", "w.bin")
    (tmp_path / "w.bin").unlink()
    assert_one_line_error(run(path, "-s", "0.5"), "missing", "w.bin")


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_sparsity_out_of_range(model_path, value):
    assert_one_line_error(run(model_path, "-s", value), "sparsity must be in [0, 1)")


@pytest.mark.parametrize("value, message", [
    ("0.5,abc", "expects numbers"), ("0.5,,0.7", "expects numbers"), ("0.5,", "expects numbers"),
    ("", "expects numbers"), ("0.7,0.5", "must be increasing"), ("0.5,0.5", "must be increasing")])
def test_malformed_sparsity_lists(model_path, value, message):
    assert_one_line_error(run(model_path, "-s", value), message)


@pytest.mark.parametrize("option, name, message", [
    ("--report", "nodir/r.json", "folder of the report does not exist"),
    ("--report", ".", "is a folder"),
    ("--report", "mlp.onnx", "would overwrite a model"),
    ("--plot", "nodir/p.png", "folder of the plot does not exist")])
def test_bad_report_or_plot_path_fails_before_any_output(model_path, tmp_path, option, name, message):
    before = model_path.read_bytes()
    extra = ["-m", "ltp", "--calib", "random"] if option == "--plot" else []
    assert_one_line_error(run(model_path, "-s", "0.5", *extra, option, tmp_path / name), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]
    assert model_path.read_bytes() == before


def test_report_may_not_replace_a_trail_output_or_the_plot(model_path, tmp_path):
    trail = run(model_path, "-s", "0.5,0.9", "-o", tmp_path / "out.onnx", "--report", tmp_path / "out.s0.5.onnx")
    assert_one_line_error(trail, "would overwrite a model")
    same = run(model_path, "-s", "0.5", "-m", "ltp", "--calib", "random", "--plot", tmp_path / "p.png",
               "--report", tmp_path / "p.png")
    assert_one_line_error(same, "both as --report and as --plot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]


def test_callers_handling_clicks_exceptions_still_get_them(model_path):
    import click

    with pytest.raises(click.UsageError):
        main([str(model_path), "-m", "magnitude"], standalone_mode=False)


@pytest.mark.parametrize("args", [["-m", "magnitude"], ["--storage", "csr"], ["--bogus"]])
def test_command_line_mistakes_are_one_line_with_exit_code_2(model_path, args):
    result = run(model_path, "-s", "0.5", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error: "), result.output
    assert "onnxprune prune --help" in lines[0]


def test_no_prunable_weights(tmp_path):
    path = tmp_path / "int.onnx"
    onnx.save(builders.int_weights(), path)
    assert_one_line_error(run(path, "-s", "0.5"), "no prunable weights")


def test_infeasible_min_threshold(model_path):
    result = run(model_path, "-s", "0.99", "--min-keep", "10")
    assert_one_line_error(result, "--min-keep")
    assert not (model_path.parent / "mlp.pruned.onnx").exists()


def test_output_rules(model_path, tmp_path):
    assert_one_line_error(run(model_path, "-s", "0.5", "-o", tmp_path / "no" / "dir.onnx"),
                          "does not exist")
    assert_one_line_error(run(model_path, "-s", "0.5", "-o", model_path, "--force"),
                          "refusing to overwrite the input")
    assert_one_line_error(run(model_path, "-s", "0.5", "-o", tmp_path), "is a directory")
    (tmp_path / "taken.onnx").write_bytes(b"x")
    assert_one_line_error(run(model_path, "-s", "0.5", "-o", tmp_path / "taken.onnx"),
                          "already exists", "--force")
    assert run(model_path, "-s", "0.5", "-o", tmp_path / "taken.onnx", "--force").exit_code == 0
    assert onnx.load(tmp_path / "taken.onnx").graph.node


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(model_path, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(run(model_path, "-s", "0.5", "-o", locked / "o.onnx"), "cannot write")


def test_bad_dim_and_leftover_files(model_path, tmp_path):
    assert_one_line_error(run(model_path, "-s", "0.5", "--dim", "batch"), "--dim")
    assert_one_line_error(run(model_path, "-s", "0.5", "--dim", "seq=8"), "--dim seq", "theirs: batch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]  # no partial output
    shown = run(model_path, "-s", "0.5", "--dim", "batch=4", "-o", tmp_path / "d.onnx")
    assert "verified in onnxruntime (CPU; batch=4, set with --dim)" in shown.output


def test_eval_command_accuracy_and_json(model_path, tmp_path):
    import numpy as np

    x = np.random.default_rng(0).standard_normal((10, 20)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x, labels=np.zeros(10, np.int64))
    result = run("eval", model_path, "--data", tmp_path / "d.npz", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["samples"] == 10 and 0 <= metrics["accuracy"] <= 1
    np.savez(tmp_path / "bad.npz", x=x)
    assert_one_line_error(run("eval", model_path, "--data", tmp_path / "bad.npz"), "'input'")


def test_sigterm_mid_run_leaves_no_staged_output(tmp_path, monkeypatch):
    import importlib
    import os
    import signal

    prune_module = importlib.import_module("onnxprune.prune")  # the package exports prune()

    path = tmp_path / "ext.onnx"
    onnx.save(builders.mlp_gemm(), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    finish = prune_module._finish

    def killed_while_writing(*args, **kwargs):  # the output is staged beside its target by now
        assert any(p.name.startswith(".onnxprune-") for p in tmp_path.iterdir())
        os.kill(os.getpid(), signal.SIGTERM)
        return finish(*args, **kwargs)

    monkeypatch.setattr(prune_module, "_finish", killed_while_writing)
    previous = signal.getsignal(signal.SIGTERM)
    result = run(path, "-s", "0.5", "-o", tmp_path / "out.onnx")
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler was for that run only
    assert_one_line_error(result, "terminated; no partial output was left", code=143)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "w.bin"]


def test_the_command_runs_outside_the_main_thread(model_path):
    import threading

    results = []
    worker = threading.Thread(target=lambda: results.append(run(model_path, "-s", "0.5", "-q")))
    worker.start()
    worker.join()
    assert results[0].exit_code == 0, results[0].output


@pytest.mark.parametrize("args, message", [
    (["--calib", "random"], "--calib is used by dc, ltp and --refit"),
    (["-m", "global", "--mt-variant", "waterfill"], "--mt-variant sets the Minimum Threshold"),
    (["-m", "layer", "--min-keep", "1"], "--min-keep sets the Minimum Threshold"),
])
def test_options_the_method_would_ignore_are_errors(model_path, args, message):
    assert_one_line_error(run(model_path, "-s", "0.5", *args), message)


def test_an_interrupted_trail_names_the_levels_it_wrote(model_path, tmp_path, monkeypatch):
    import importlib

    prune_module = importlib.import_module("onnxprune.prune")
    finish, calls = prune_module._finish, []

    def interrupted_at_the_second_level(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return finish(*args, **kwargs)

    monkeypatch.setattr(prune_module, "_finish", interrupted_at_the_second_level)
    result = run(model_path, "-s", "0.5,0.7,0.9", "-o", tmp_path / "t.onnx")
    first = tmp_path / "t.s0.5.onnx"
    assert_one_line_error(result, "interrupted; no partial output was left",
                          f"levels written and complete: {first}", code=130)
    assert sorted(p.name for p in tmp_path.glob("t*")) == ["t.s0.5.onnx"]


def test_special_files_are_never_replaced_or_read(model_path, tmp_path):
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for args in (["-o", fifo, "--force"], ["--report", fifo]):
        assert_one_line_error(run(model_path, "-s", "0.5", *args), str(fifo), "not a regular file")
        assert fifo.is_fifo()
    assert_one_line_error(run(fifo, "-s", "0.5"), "not a regular file")  # would block reading


def test_include_and_exclude_repeat_and_must_match(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    result = run(model_path, "-s", "0.5", "-o", out, "--exclude", r"^0\.weight", "--exclude",
                 r"^2\.weight", "--include", "bias", "--report", tmp_path / "r.json")
    pruned = [row["name"] for row in json.loads((tmp_path / "r.json").read_text())["layers"]]
    assert result.exit_code == 0 and pruned == ["0.bias", "2.bias"], result.output
    assert_one_line_error(run(model_path, "-s", "0.5", "-o", tmp_path / "p.onnx", "--exclude", "classifer"),
                          "--exclude 'classifer' matches no tensor")


def test_repeated_options_are_usage_errors_and_values_are_not_options(model_path, tmp_path):
    for args in (["-s", "0.5", "-s", "0.6"], ["-s0.5", "--sparsity=0.6"], ["-qs", "0.5", "-s", "0.7"]):
        result = run(model_path, *args)
        assert result.exit_code == 2 and "-s/--sparsity given more than once" in result.output
    # values that look like options are values (click reads them so)
    result = run(model_path, "-s", "0.5", "-o", tmp_path / "-s.onnx", "--exclude", "-s", "-q")
    assert "given more than once" not in result.output and "--exclude '-s' matches no" in result.output
    assert_one_line_error(run("help"), "help: no such file, nor a command (prune, eval)")
    assert run(model_path, "-s", "0.5", "-h", "-s", "0.6").exit_code == 0  # help wins
    assert_one_line_error(run(model_path, "-s", "0.5", "--exclude", "bias", "-o", tmp_path / "b.onnx"),
                          "--exclude 'bias' matches no tensor name, node name or op type of this "
                          "model's pruned weights")  # biases are not pruned: nothing to exclude


def _external(tmp_path, data_name):
    model = builders.mlp_gemm()
    onnx.save(model, tmp_path / "in.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_name, size_threshold=0)
    return tmp_path / "in.onnx"


def test_a_report_named_like_the_inputs_data_file_is_refused(tmp_path):
    src = _external(tmp_path, "weights.bin")
    before = (tmp_path / "weights.bin").read_bytes()
    result = run(str(src), "-s", "0.5", "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "weights.bin"))
    assert_one_line_error(result, "report would overwrite the input model or its data")
    assert (tmp_path / "weights.bin").read_bytes() == before


def test_a_trail_level_whose_data_file_is_the_inputs_is_refused_before_any_work(tmp_path):
    src = _external(tmp_path, "out.s0.7.onnx.data")
    result = run(str(src), "-s", "0.5,0.7", "-o", str(tmp_path / "out.onnx"), "--force")
    assert_one_line_error(result, "refusing to overwrite the input model or its data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.s0.7.onnx.data"]


def test_a_dangling_link_or_a_planted_temporary_report_is_not_followed(model_path, tmp_path):
    (tmp_path / "out.onnx").symlink_to(tmp_path / "nowhere")
    assert_one_line_error(run(str(model_path), "-s", "0.5", "-o", str(tmp_path / "out.onnx")), "already exists")
    assert (tmp_path / "out.onnx").is_symlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".r.json.tmp").symlink_to(victim)  # the fixed temporary name reports once used
    result = run(str(model_path), "-s", "0.5", "-o", str(tmp_path / "o2.onnx"), "--report", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious" and not (tmp_path / "r.json").is_symlink()
    assert json.loads((tmp_path / "r.json").read_text())["method"] == "global-mt"
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's mode


@pytest.mark.parametrize("case, fragment", [
    ("short raw_data", "its data does not fit its type"),
    ("huge dims", "its data does not fit its type"),
    ("no data type", "has no known data type (0)"),
    ("not utf-8", "not valid UTF-8"),
    ("link loop", "cannot be resolved"),
    ("long output name", "not a usable output path"),
])
def test_a_malformed_model_or_path_is_one_line_not_a_traceback(tmp_path, case, fragment):
    model = builders.mlp_gemm()
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2)
    if case == "short raw_data":
        weight.raw_data = weight.raw_data[:-1]
    elif case == "huge dims":
        weight.dims[0] = 2 ** 40
    elif case == "no data type":
        weight.data_type = 0
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    data = model.SerializeToString()
    if case == "not utf-8":
        model.producer_name = "PRODUCER"
        data = model.SerializeToString().replace(b"PRODUCER", b"PR\xe9DUCER")
    path.write_bytes(data)
    if case == "link loop":
        path.unlink()
        path.symlink_to(path)
    if case == "long output name":
        out = tmp_path / ("x" * 300 + ".onnx")
    assert_one_line_error(run(str(path), "-s", "0.5", "-o", str(out)), fragment)
    assert not any(p.name.startswith(("out", ".onnxprune")) for p in tmp_path.iterdir())
