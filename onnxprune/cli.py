"""Command line: `onnxprune MODEL --sparsity S` (the prune command) plus subcommands."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import OnnxPruneError
from .prune import METHODS, default_output, prune

MAIN_HELP = """Prune the weights of an ONNX model.

\b
  onnxprune MODEL --sparsity S [OPTIONS]     prune (same as `onnxprune prune ...`)
  onnxprune eval MODEL --data test.npz       accuracy / fidelity of a model

Run `onnxprune prune --help` for every pruning option."""


class _DefaultToPrune(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to `prune`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToPrune, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxprune")
def main():
    pass


def _parse_dims(values) -> dict[str, int]:
    dims = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or not number.isdigit() or int(number) < 1:
            raise OnnxPruneError(f"--dim expects NAME=POSITIVE_INT, got '{value}'")
        dims[name] = int(number)
    return dims


@main.command("prune", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-s", "--sparsity", type=float, required=True,
              help="Fraction of prunable weights to set to zero, in [0, 1). Weights that are "
                   "already zero count. 0.9 keeps 10% (a 10x compression ratio).")
@click.option("-m", "--method", type=click.Choice(METHODS), default="global-mt", show_default=True,
              help="layer: each layer loses its own smallest weights (hard thresholding). "
                   "global: the smallest weights of the whole model (Global MP). "
                   "global-mt: Global MP where every layer keeps at least --min-keep percent "
                   "of all prunable weights (no layer is emptied).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the pruned model.  [default: MODEL.pruned.onnx beside MODEL]")
@click.option("--min-keep", type=float, default=0.05, show_default=True,
              help="global-mt: every layer keeps at least this PERCENT of ALL prunable weights "
                   "(a count, the same for every layer; 0.05 = 0.05%).")
@click.option("--mt-variant", type=click.Choice(["rescale", "waterfill"]), default="rescale",
              show_default=True,
              help="global-mt: 'rescale' is the authors' allocation (rescale every layer's "
                   "sparsity, clamp, repeat); 'waterfill' keeps clamped layers at the minimum "
                   "and one global threshold for the rest.")
@click.option("--include", metavar="REGEX", default=None,
              help="Also prune tensors whose name or consumer op type matches (e.g. 'Gather' "
                   "for embedding tables, 'bias', 'LayerNormalization').")
@click.option("--exclude", metavar="REGEX", default=None,
              help="Do not prune tensors whose name or consumer op type matches "
                   "(e.g. 'classifier|head', 'ConvTranspose').")
@click.option("--storage", type=click.Choice(["dense", "sparse"]), default="dense", show_default=True,
              help="dense: zeros stored in place (same layout, compresses well). sparse: ONNX "
                   "sparse_initializer (values + INT64 indices) where smaller. onnxruntime "
                   "densifies sparse tensors at load: smaller files, not faster inference.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (never the input).")
@click.option("--no-verify", is_flag=True,
              help="Skip running the output in onnxruntime (by default it is run once on "
                   "synthetic inputs and compared with the input model).")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N",
              help="Value for a symbolic input dimension during verification (default 1). Repeatable.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime execution provider: cuda when onnxruntime-gpu and a GPU are "
                   "present (auto), else cpu; the report says which ran.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Also write the report as JSON to this file.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def prune_command(model, sparsity, method, output, min_keep, mt_variant, include, exclude,
                  storage, force, no_verify, dims, device, report_path, quiet):
    """Prune MODEL to the given sparsity and write MODEL.pruned.onnx (or --output)."""
    try:
        output = output or default_output(model)
        result = prune(model, sparsity, method=method, output=output, min_keep=min_keep,
                       mt_variant=mt_variant, include=include, exclude=exclude,
                       storage_format=storage, force=force, verify=not no_verify,
                       dims=_parse_dims(dims), device=device, progress=not quiet)
        if report_path is not None:
            _write_json(report_path, result.report.to_dict())
    except OnnxPruneError as e:
        _fail(e)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written")
    if not quiet:
        click.echo(result.report.format())


def _write_json(path: Path, data: dict) -> None:
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(path)
    except OSError as e:
        raise OnnxPruneError(f"{path}: cannot write report ({e.strerror})") from None


def _fail(error) -> None:
    click.echo(f"onnxprune: error: {error}", err=True)
    sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
