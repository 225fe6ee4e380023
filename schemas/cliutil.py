"""Small command-line helpers shared by the labeler and trainer CLIs (stdlib only; matplotlib lazily for plots)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from schemas.errors import LabelSetError

# Errors that are the user's to fix (bad values, bad label sets, unreachable or
# unreadable storage, also after retries): one line, no traceback (unless --debug).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, LabelSetError, OSError)


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as JSON when they can be (true, 3, {...})."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@contextlib.contextmanager
def remote_code_guard(model: str) -> Iterator[None]:
    """Turn transformers' refusal of a model's own code into a one-line error that names the flag."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise ValueError(
                f"{model} needs its own Python code to load; it was not run. Pass --trust-remote-code if you trust it"
            ) from e
        raise


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(fn: Callable[[], int], debug: bool, prog: str) -> int:
    """Run a CLI body; user errors become ``prog: error: <one line>`` and exit code 2."""
    try:
        return fn()
    except USER_ERRORS as e:
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def pyplot(path: str) -> Any:
    """matplotlib's pyplot on the file backend, after checking ``path`` names a PNG.

    Imported here, lazily, so neither matplotlib nor a display is needed
    unless a plot is asked for.
    """
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"plot {path}: expected a .png file name")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("plotting needs matplotlib: pip install 'softlabels[plot]'") from e
    return plt


def save_png(fig: Any, path: str) -> None:
    """Write and close a figure; an unwritable path is a one-line error."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise ValueError(f"plot {path}: cannot write ({e.strerror or e})") from e
    finally:
        plt.close(fig)
    logging.getLogger(__name__).info("wrote %s", path)
