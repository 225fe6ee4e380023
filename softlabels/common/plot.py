"""Plot helpers: matplotlib, imported lazily, on the file backend."""

from __future__ import annotations

import logging
from typing import Any

from softlabels.schemas.errors import UserError


def pyplot(path: str) -> Any:
    """matplotlib's pyplot on the file backend, after checking ``path`` names a PNG.

    Imported here, lazily, so neither matplotlib nor a display is needed
    unless a plot is asked for.
    """
    if not str(path).lower().endswith(".png"):
        raise UserError(f"plot {path}: expected a .png file name")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError("plotting needs matplotlib: pip install 'softlabels[plot]'") from e
    return plt


def save_png(fig: Any, path: str) -> None:
    """Write and close a figure; an unwritable path is a one-line error."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"plot {path}: cannot write ({e.strerror or e})") from e
    finally:
        plt.close(fig)
    logging.getLogger(__name__).info("wrote %s", path)
