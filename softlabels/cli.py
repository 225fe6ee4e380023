"""The ``softlabels`` command (also ``python -m softlabels``): one entry point, a subcommand per job.

=========  ==========================================================  ===================
command    what                                                        needs
=========  ==========================================================  ===================
label      run a teacher over a corpus once; write a label set (Ray)   ``[labeler]``
inspect    manifest summary and label statistics of a label set        (core)
convert    re-encode a label set (e.g. compact -> fp16), resumable     (core)
train      train a student from a label set                            ``[trainer]``
eval       held-out CE, KL to the teacher, top-1 agreement             ``[trainer]``
export     quantize a student to an int8 ONNX model                    ``[export]``
compare    teacher and students side by side: size, speed, quality     ``[trainer]``
plot       a training run's loss and eval curves                       ``[plot]``
=========  ==========================================================  ===================

Parsing imports no torch, transformers or Ray: ``--help`` and bad flags answer at once,
and a command whose extra is not installed says which one to install.
"""

from __future__ import annotations

import argparse
import signal
import sys

from softlabels import __version__
from softlabels.common.cli import run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from softlabels import convert
    from softlabels.labeler import cli as labeler_cli
    from softlabels.trainer import cli as trainer_cli

    p = argparse.ArgumentParser(
        prog="softlabels",
        description="Offline soft labels for knowledge distillation: label once with a teacher, train many students.",
    )
    p.add_argument("--version", action="version", version=f"softlabels {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    labeler_cli.register(sub)
    convert.register(sub)
    trainer_cli.register(sub)
    return p


def _on_sigterm(signum: int, frame: object) -> None:
    # Preemption (Kubernetes, schedulers) sends SIGTERM: unwind, so that claims are released,
    # Ray shuts down and nothing half-written is published; exit 143 as a killed process would.
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return run_main(lambda: args.handler(args), args.debug, f"softlabels {args.command}")


if __name__ == "__main__":
    sys.exit(main())
