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
rounds     on-policy rounds: the student writes, the teacher labels    ``[labeler,trainer]``
plot       a training run's loss and eval curves                       ``[plot]``
=========  ==========================================================  ===================

Parsing imports no torch, transformers or Ray: ``--help`` and bad flags answer at once,
and a command whose extra is not installed says which one to install.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from softlabels import __version__
from softlabels.common.cli import run_main, setup_logging
from softlabels.common.malloc import keep_freed_memory


def build_parser() -> argparse.ArgumentParser:
    from softlabels import convert, rounds
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
    rounds.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand; returns the exit code.

    SIGTERM (preemption: Kubernetes, schedulers) unwinds the command, so that claims are
    released, Ray shuts down and nothing half-written is published, and the exit code is 143
    as a killed process's would be.
    """
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    keep_freed_memory()  # a CPU step's large tensors are reused, not page-faulted afresh (common/malloc.py)
    prog = f"softlabels {args.command}"
    terminated: list[int] = []

    def on_sigterm(signum: int, frame: object) -> None:
        terminated.append(signum)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = run_main(lambda: args.handler(args), args.debug, prog)
    except BaseException:
        if not terminated:
            raise
        # What the unwinding became on its way out is the SIGTERM's doing, not a bug: Python runs signal
        # handlers inside Ray's ray.get/ray.wait too (their C++ wait loop checks for signals), and Ray
        # turns a SystemExit raised there into SystemExit(1); a driver waiting on a teacher is there
        # nearly always. Other libraries may wrap it likewise.
        logging.getLogger(__name__).debug("unwound after SIGTERM", exc_info=True)
        code = 143
    if terminated and code != 0:  # a command that finished its work all the same says so (0)
        print(f"{prog}: stopped by SIGTERM", file=sys.stderr)
        return 143
    return code


if __name__ == "__main__":
    sys.exit(main())
