"""Command line: `onnxprune MODEL --sparsity S` (the prune command) plus subcommands."""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import click

from . import __version__, budget
from .errors import OnnxPruneError
from .modelio import check_model_file
from .writer import output_files
from .runtime import DEVICES
from .options import ALLOCATIONS, METHODS, MT_VARIANTS, STORAGES
from .prune import default_output, level_outputs, prune

MAIN_HELP = """Prune the weights of an ONNX model.

\b
  onnxprune MODEL --sparsity S [OPTIONS]     prune (same as `onnxprune prune ...`)
  onnxprune eval MODEL --data test.npz       accuracy / fidelity of a model

Run `onnxprune prune --help` for every pruning option."""


class _DefaultToPrune(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to `prune`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            if args[0].isidentifier() and not Path(args[0]).exists():  # `onnxprune help`
                raise click.ClickException(f"{args[0]}: no such file, nor a command "
                                           f"({', '.join(self.commands)})")  # exit 1, as for a file
            args = ["prune", *args]
        if args and args[0] in self.commands and not {"-h", "--help"} & set(args):  # help wins
            repeated = _repeated_option(self.commands[args[0]], args[1:])
            if repeated:
                raise click.UsageError(f"option {repeated} given more than once (it takes one value)", ctx)
        return super().parse_args(ctx, args)

    def main(self, *args, **kwargs):
        # click's usage errors are four lines; ours are one (exit code 2: a command-line mistake)
        if not kwargs.pop("standalone_mode", True):  # a caller handling click's exceptions
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except getattr(click.exceptions, "NoArgsIsHelpError", ()) as e:  # click >= 8.2
            click.echo(e.format_message())
            sys.exit(2)
        except click.UsageError as e:
            hint = f" (see `onnxprune {e.ctx.info_name} --help`)" if e.ctx and e.ctx.parent else ""
            click.echo(f"onnxprune: error: {e.format_message().rstrip('.')}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"onnxprune: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C outside a command's own handling
            click.echo("onnxprune: error: interrupted", err=True)
            sys.exit(130)


def _repeated_option(command: click.Command, args: list[str]) -> str | None:
    """The first one-value option given twice (click would silently keep the last one).
    Tokens are read as click reads them: an option's value is skipped, short flags bundle."""
    options = {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts}
    seen, tokens = set(), iter(args)
    for arg in tokens:
        if arg == "--":
            break
        if arg.startswith("--"):
            name, attached, _ = arg.partition("=")
            found = [(options.get(name), not attached)]
        elif arg.startswith("-") and len(arg) > 1:  # -s 0.5, -s0.5, -qs 0.5
            found = []
            for i, letter in enumerate(arg[1:], 1):
                param = options.get(f"-{letter}")
                found.append((param, i == len(arg) - 1))
                if param is None or not param.is_flag:
                    break  # the rest of the token is the option's value
        else:
            continue
        for param, value_follows in found:
            if param is None or param.is_flag:
                continue
            if value_follows:
                next(tokens, None)
            if not param.multiple:
                if param.name in seen:
                    return "/".join(param.opts)
                seen.add(param.name)
    return None


@click.group(cls=_DefaultToPrune, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxprune")
def main():
    pass


def _parse_dims(values) -> dict[str, int]:
    dims = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or not number.isdigit():  # prune() checks the size
            raise OnnxPruneError(f"--dim expects NAME=POSITIVE_INT, got '{value}'")
        dims[name] = int(number)
    return dims


@main.command("prune", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(readable=False, path_type=Path))  # errors: modelio
@click.option("-s", "--sparsity", "sparsity_text", required=True, metavar="S[,S...]",
              help="Fraction of prunable weights to set to zero, in [0, 1). Weights that are "
                   "already zero count. 0.9 keeps 10% (a 10x compression ratio). A list "
                   "(0.5,0.7,0.9) writes one model per level, OUTPUT-stem.s0.5.onnx etc., from "
                   "one load and one calibration pass.")
@click.option("-m", "--method", type=click.Choice(METHODS), default="global-mt", show_default=True,
              help="Data-free: layer: each layer loses its own smallest weights (hard "
                   "thresholding). global: the smallest weights of the whole model (Global MP). "
                   "global-mt: Global MP where every layer keeps at least --min-keep percent of "
                   "all prunable weights (no layer is emptied). Needs --calib: dc: per layer, "
                   "sparse weights that reproduce the dense layer's output on calibration data "
                   "(DC programming, FeTa), biases refitted. ltp: per-layer thresholds learned "
                   "by gradient descent on the layers' calibration reconstruction error plus a "
                   "soft L0 count (an LTP-style adaptation: no training), so the allocation "
                   "between layers is learned; then each layer's weights learn through the "
                   "soft mask within its budget (weighted by their inputs' strength) and the "
                   "top-k of them are kept (their learned values, or least-squares values with "
                   "--refit).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the pruned model.  [default: MODEL.pruned.onnx beside MODEL]")
@click.option("--min-keep", type=click.FloatRange(0, 100, max_open=True), default=0.05, show_default=True,
              help="global-mt: every layer keeps at least this PERCENT of ALL prunable weights "
                   "(a count, the same for every layer; 0.05 = 0.05%).")
@click.option("--mt-variant", type=click.Choice(MT_VARIANTS), default=MT_VARIANTS[0],
              show_default=True,
              help="global-mt: 'rescale' is the authors' allocation (rescale every layer's "
                   "sparsity, clamp, repeat); 'waterfill' keeps clamped layers at the minimum "
                   "and one global threshold for the rest.")
@click.option("--include", metavar="REGEX", multiple=True,
              help="Also prune tensors whose name, consumer node name or consumer op type "
                   "matches (e.g. 'Gather' for embedding tables, 'bias', 'LayerNormalization'). "
                   "Repeatable: any of them matches. A pattern matching nothing is an error.")
@click.option("--exclude", metavar="REGEX", multiple=True,
              help="Do not prune tensors whose name, consumer node name or consumer op type "
                   "matches (e.g. 'classifier|head', 'attention', 'ConvTranspose'). "
                   "Repeatable: any of them matches. A pattern matching no tensor that would be "
                   "pruned is an error.")
@click.option("--storage", type=click.Choice(STORAGES), default=STORAGES[0], show_default=True,
              help="dense: zeros stored in place (same layout, compresses well). sparse: ONNX "
                   "sparse_initializer (values + INT64 indices) where smaller. onnxruntime "
                   "densifies sparse tensors at load: smaller files, not faster inference.")
@click.option("--calib", metavar="PATH", default=None,
              help="Calibration data for dc, ltp and --refit: an .npz keyed by model input name "
                   "(first axis = samples), or a folder / glob of .npz or <input>.npy files. "
                   "'random' uses random inputs (for testing only; the report says so).")
@click.option("--calib-samples", type=click.IntRange(1), default=1024, show_default=True,
              help="Use at most this many calibration samples (a random subset, by --seed, "
                   "when the data holds more; a reader or iterable is read only this far).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Samples per onnxruntime run during calibration.")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default=ALLOCATIONS[0],
              show_default=True,
              help="dc only: how many weights each layer keeps: the global-mt allocation, the "
                   "same fraction in every layer, or the per-layer budgets ltp learns (then DC "
                   "solves each layer within them).")
@click.option("--refit", is_flag=True,
              help="After choosing which weights to keep, refit them and the layer's bias by "
                   "least squares so each layer reproduces its dense output on the calibration "
                   "data (needs --calib; not with dc, which fits the kept weights itself).")
@click.option("--sequential", is_flag=True,
              help="Calibration statistics of each layer come from the model with the earlier "
                   "layers already pruned (dc, ltp or --refit; one calibration pass per layer: "
                   "slower, and on the README's reference models not more accurate). "
                   "Default: all statistics from the dense model in one pass.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed for calibration subsampling and stochastic solvers.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (never the input).")
@click.option("--no-verify", is_flag=True,
              help="Skip running the output in onnxruntime (by default it is run once on "
                   "synthetic inputs and compared with the input model).")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N",
              help="Value for a symbolic input dimension during verification (default 1). Repeatable.")
@click.option("--device", type=click.Choice(DEVICES), default=DEVICES[0], show_default=True,
              help="onnxruntime execution provider: cuda when onnxruntime-gpu and a GPU are "
                   "present (auto), else cpu; the report says which ran.")
@click.option("--max-memory", default="1G", show_default=True, metavar="SIZE",
              help="Memory budget (e.g. 512M, 4G; K, M, G are binary: 1G = 1 GiB). Data-free "
                   "methods stream weights stored as external data in small chunks whatever "
                   "this is; the output is "
                   "run in onnxruntime only if its weights fit, sparse tensors (stored inline) "
                   "are limited to it, and calibration statistics larger than it are collected "
                   "in several passes, one group of layers at a time.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Also write the report as JSON to this file (for a list of levels: "
                   "{\"levels\": [one report per level]}).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="ltp: save a PNG of the learned-threshold objective per optimisation step "
                   "(needs matplotlib: pip install \".[plot]\").")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def prune_command(model, sparsity_text, method, output, min_keep, mt_variant, include, exclude,
                  calib, calib_samples, batch_size, allocation, refit, sequential, seed,
                  storage, force, no_verify, dims, device, max_memory, report_path, plot_path,
                  quiet):
    """Prune MODEL to the given sparsity and write MODEL.pruned.onnx (or --output)."""
    budget.keep_freed_memory()
    # kill, timeout, docker stop: clean up as for Ctrl-C (the handler stays for this run only;
    # Python lets only the main thread set one)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    levels: list[float] = []
    outputs: list[Path] = []
    stamps: dict[Path, int | None] = {}  # the outputs' modification times before the run
    try:
        levels = _parse_sparsity(sparsity_text)
        _check_unused_options(click.get_current_context(), method, refit)
        if plot_path is not None and method != "ltp":
            raise OnnxPruneError("--plot shows the LTP objective: use it with --method ltp")
        if plot_path is not None:
            from .plot import check_plotting
            check_plotting()  # before the work, not after it
        output = output or default_output(model)
        outputs = level_outputs(output, levels) if len(levels) > 1 else [output]
        _check_side_outputs(report_path, plot_path, model, outputs)
        stamps = {out: _stamp(out) for out in outputs}
        results = prune(model, levels if len(levels) > 1 else levels[0], method=method,
                        output=output, min_keep=min_keep, mt_variant=mt_variant,
                        include=list(include), exclude=list(exclude), calib=calib,
                        calib_samples=calib_samples, batch_size=batch_size, allocation=allocation,
                        refit=refit, sequential=sequential, seed=seed, storage_format=storage, force=force,
                        verify=not no_verify, dims=_parse_dims(dims), device=device,
                        progress=not quiet, max_memory=max_memory)
        results = results if isinstance(results, list) else [results]
        if plot_path is not None:
            from .plot import plot_ltp_objective

            plot_ltp_objective([r.report for r in results], plot_path)
        if report_path is not None:
            reports = [r.report.to_dict() for r in results]
            _write_json(report_path, reports[0] if len(reports) == 1 else {"levels": reports},
                        results[0].report.input_files)
    except OnnxPruneError as e:
        _fail(e)
    except KeyboardInterrupt as e:
        done = [str(out) for out in outputs if _stamp(out) not in (None, stamps.get(out))]
        _fail(f"{'terminated' if isinstance(e, _Terminated) else 'interrupted'}; no partial "
              "output was left" + (f"; levels written and complete: {', '.join(done)}" if done else ""),
              143 if isinstance(e, _Terminated) else 130)
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)
    if not quiet:
        click.echo("\n\n".join(r.report.format() for r in results))


def _parse_sparsity(text: str) -> list[float]:
    try:
        levels = [float(part) for part in text.split(",")]  # float("") fails: no empty entries
    except ValueError:
        raise OnnxPruneError(f"--sparsity expects numbers like 0.9 or 0.5,0.7,0.9, got '{text}'") from None
    return levels  # prune() checks their range and order


@main.command("eval", context_settings={"help_option_names": ["-h", "--help"]},
              short_help="Accuracy or fidelity of a model on a data set.")
@click.argument("model", type=click.Path(readable=False, path_type=Path))
@click.option("--data", "data_path", required=True, metavar="PATH",
              help="An .npz keyed by model input name (first axis = samples), with integer class "
                   "labels under 'labels' for accuracy; or a folder / glob of .npz / <input>.npy files.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="A reference model (e.g. the dense one): report fidelity to it: mean cosine "
                   "similarity of outputs, top-1 agreement, max abs difference, and for "
                   "embedding models nearest-neighbour retrieval agreement.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Samples per onnxruntime run (a model whose inputs fix the batch dimension "
                   "runs batches of that size).")
@click.option("--output", "output_name", metavar="NAME", default=None,
              help="The model output to measure, by name; a --reference is compared on its "
                   "output of the same name.  [default: the model's first output, compared with "
                   "the reference's first output]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime execution provider (cuda needs onnxruntime-gpu and a GPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_command(model, data_path, reference, batch_size, output_name, device, as_json, quiet):
    """Accuracy of MODEL on labelled data, or its fidelity to a --reference model."""
    from .evaluate import evaluate, format_metrics

    try:
        metrics = evaluate(model, data_path, batch_size=batch_size, reference=reference,
                           device=device, output=output_name, progress=not quiet and not as_json)
    except OnnxPruneError as e:
        _fail(e)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    click.echo(to_json(metrics) if as_json else format_metrics(metrics))


def _check_side_outputs(report: Path | None, plot: Path | None, model: Path, outputs: list[Path]) -> None:
    """Before any work, as the outputs are: a report or plot path that cannot be written or
    would replace a model (the input, an output of any level, their data files)."""
    check_model_file(model)  # a link loop fails here in words, not in resolve() below
    models = {Path(f).resolve() for out in [model, *outputs] for f in output_files(out, True)}
    if report is not None and plot is not None and report.resolve() == plot.resolve():
        raise OnnxPruneError(f"{report}: given both as --report and as --plot")
    for path, what in ((report, "report"), (plot, "plot")):
        if path is None:
            continue
        folder = path.resolve().parent
        if not folder.is_dir():
            raise OnnxPruneError(f"{path}: folder of the {what} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OnnxPruneError(f"{path}: folder of the {what} is not writable")
        if path.is_dir():
            raise OnnxPruneError(f"{path}: is a folder; the {what} needs a file name")
        if path.exists() and not path.is_file():  # /dev/null would be renamed over
            raise OnnxPruneError(f"{path}: not a regular file; the {what} needs a file path")
        if path.resolve() in models:
            raise OnnxPruneError(f"{path}: the {what} would overwrite a model or its data")


def to_json(data) -> str:
    """Strict JSON (NaN and infinities, which it has no literals for, become null)."""
    def finite(x):
        if hasattr(x, "dtype") and hasattr(x, "item") and not hasattr(x, "__len__"):
            x = x.item()  # a numpy scalar
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return [finite(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(finite(data), indent=2, default=str, allow_nan=False)


def _check_unused_options(ctx: click.Context, method: str, refit: bool) -> None:
    """Options given on the command line that this method would ignore (the library takes
    them silently, so that one call can loop over methods)."""
    given = {name for name in ("calib", "min_keep", "mt_variant")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if "calib" in given and method not in ("dc", "ltp") and not refit:
        raise OnnxPruneError(f"--calib is used by dc, ltp and --refit; method '{method}' uses "
                             "no calibration data")
    for name in sorted(given & {"min_keep", "mt_variant"}):
        if method in ("layer", "global"):
            raise OnnxPruneError(f"--{name.replace('_', '-')} sets the Minimum Threshold of "
                                 f"global-mt (and of dc's and ltp's allocations); method "
                                 f"'{method}' has none")


def _write_json(path: Path, data: dict, inputs: list[str]) -> None:
    if path.resolve() in {Path(f).resolve() for f in inputs}:  # a data file under any name
        raise OnnxPruneError(f"{path}: the report would overwrite the input model or its data; "
                             "not written (the pruned model was)")
    tmp = None
    try:  # a unique temporary name: a planted file or link of a fixed name is never followed
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(to_json(data) + "\n")
            umask = os.umask(0o22)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        raise OnnxPruneError(f"{path}: cannot write report ({e.strerror})") from None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so that staged outputs are removed."""


def _terminate(signum, frame):
    raise _Terminated


def _stamp(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _fail(error, code: int = 1) -> None:
    """One line on stderr. Exit code 1; 130 / 143 after Ctrl-C / SIGTERM, as shells report them."""
    click.echo(f"onnxprune: error: {error}", err=True)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
