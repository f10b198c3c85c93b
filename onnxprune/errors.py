"""User-facing errors: the CLI prints their message as one line, without a traceback."""


class OnnxPruneError(Exception):
    """A problem with the user's input or request (bad file, bad option, infeasible target)."""


class InfeasibleError(OnnxPruneError, ValueError):
    """The requested sparsity cannot be met under the given constraints."""
