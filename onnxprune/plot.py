"""PNG plots for reports (matplotlib is optional: `pip install matplotlib`)."""
from __future__ import annotations

from pathlib import Path

from .errors import OnnxPruneError


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OnnxPruneError("--plot needs matplotlib (pip install matplotlib)") from None


def plot_ltp_objective(reports, path: str | Path) -> None:
    """LTP's objective per Adam step (total reconstruction + L0 term), one line per level."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for report in reports:
        if report.ltp:
            ax.plot(report.ltp["objective"], label=f"sparsity {report.target_sparsity:g}")
    ax.set_xlabel("Adam step (final lambda)")
    ax.set_ylabel("objective R (sum over layers)")
    ax.set_title("LTP: learned thresholds")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise OnnxPruneError(f"{path}: cannot write plot ({e.strerror})") from None
    finally:
        plt.close(fig)
