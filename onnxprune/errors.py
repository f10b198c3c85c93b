"""User-facing errors: the CLI prints their message as one line, without a traceback."""


class OnnxPruneError(Exception):
    """A problem with the user's input or request (bad file, bad option, infeasible target)."""


class InfeasibleError(OnnxPruneError, ValueError):
    """The requested sparsity cannot be met under the given constraints."""


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (onnxruntime often puts the useful part, such as
    "index: 0 Got: 32 Expected: 1", on the lines after the first)."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
