"""Command-line helpers shared by every ``softlabels`` subcommand (stdlib only).

* :func:`run_main` runs a command body: a :class:`~softlabels.schemas.errors.UserError`
  becomes one line and exit code 2; any other exception keeps its traceback (a bug).
* :func:`given_flags` collects the flags a command line gave, for
  :func:`softlabels.common.settings.resolve_settings` (defaults < ``--config`` file < flags).
* :func:`require_extra` says which ``pip install 'softlabels[...]'`` a command needs
  before it starts, instead of an ImportError midway.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from softlabels.schemas.errors import UserError


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as JSON when they can be (true, 3, {...})."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--storage-option expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def require_extra(extra: str, *modules: str) -> None:
    """Raise a UserError naming the extra to install if any of ``modules`` is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"this command needs {', '.join(missing)}: pip install 'softlabels[{extra}]'")


@contextlib.contextmanager
def remote_code_guard(model: str) -> Iterator[None]:
    """Turn transformers' refusals of a model into one-line user errors.

    A model that ships its own code names ``--trust-remote-code``; a model that
    is not there (no such directory, not in the local hub cache, no network)
    says so, instead of transformers' multi-line OSError.
    """
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise UserError(
                f"{model} needs its own Python code to load; it was not run. Pass --trust-remote-code if you trust it"
            ) from e
        raise
    except OSError as e:
        if isinstance(e, UserError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{model} cannot be loaded: {first}") from e


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def process_started() -> float:
    """When this process started (epoch seconds, to ~10 ms on Linux; else now): interpreter start-up included."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def run_main(fn: Callable[[], int], debug: bool, prog: str) -> int:
    """Run a command body; a UserError becomes ``prog: error: <one line>`` and exit code 2.

    Every other exception propagates with its traceback (Python exits 1): it is a bug
    to report, not the user's to fix. ``--debug`` shows user errors' tracebacks too.
    """
    try:
        return fn()
    except UserError as e:
        if debug:
            raise
        msg = _one_line(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    """The user-facing line of an error; for one re-raised from a DataLoader worker, the original's."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:  # torch's worker re-raise
        last = lines[-1].strip()
        return last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return lines[0]


def given_flags(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings a command line gave (flags left out stay out: their default is ``SUPPRESS``).

    ``--storage-option KEY=VALUE`` entries become ``storage_options``.
    """
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "json", "debug", "handler", *skip)}
    if "storage_option" in given:
        given["storage_options"] = parse_storage_options(given.pop("storage_option"))
    return given


def debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
