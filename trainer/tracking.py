"""``--report-to``: the rows of metrics.jsonl, also sent to TensorBoard or Weights & Biases.

A tracker has two methods, ``log(row, step)`` and ``close()``. Each is imported only
when asked for; a missing package is named (with the extra that installs it) when the
config is built, before any data is read. Only rank 0 reports.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from softlabels.schemas.errors import UserError

REPORTERS = ("tensorboard", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Tracker(Protocol):
    def log(self, row: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def parse_report_to(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"tensorboard,wandb"``, ``["tensorboard", "wandb"]`` or ``"none"`` -> the trackers' names, in order.

    Raises:
        UserError: an unknown name, ``none`` beside a tracker, or a tracker whose package is not installed.
    """
    items = [value] if isinstance(value, str) else list(value or ())
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise UserError(f"report_to takes names ({', '.join(('none', *REPORTERS))}), got {item!r}")
        names += [n.strip() for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("none", *REPORTERS)]
    if unknown:
        raise UserError(f"--report-to takes none, {', '.join(REPORTERS)}; not {', '.join(unknown)}")
    if "none" in names and set(names) != {"none"}:
        raise UserError(f"--report-to none cannot go with {', '.join(n for n in names if n != 'none')}")
    names = list(dict.fromkeys(n for n in names if n != "none"))
    for name in names:
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            raise UserError(f"--report-to {name} needs the {_PACKAGE[name]} package: "
                            f"pip install {_PACKAGE[name] if name == 'wandb' else repr('softlabels[track]')}")
    return tuple(names)


def flatten(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as scalars: nested evaluations become ``eval/ce``, ``eval/kl``, ...; ``step`` is left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in flatten(value).items()})
        elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def check_trackers(report_to: tuple[str, ...], output: Path) -> None:
    """Refuse, before any data is read or step taken, a tracker that could not write: a file where
    ``--report-to tensorboard`` needs the folder ``OUTPUT/tensorboard`` (or ``OUTPUT`` itself). Creates nothing.

    Raises:
        UserError: naming the file in the way.
    """
    if "tensorboard" not in report_to:
        return
    for path in (output, output / "tensorboard"):
        if path.exists() and not path.is_dir():
            raise UserError(f"--report-to tensorboard: {path} is a file, not a directory (TensorBoard writes to "
                            "OUTPUT/tensorboard): move it, or use another --output")


class TensorBoard:
    """Scalars under ``logdir``; on a resume, steps past the checkpoint (from the interrupted run) are purged."""

    def __init__(self, logdir: Path, resumed_at: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.writer = SummaryWriter(str(logdir), purge_step=resumed_at + 1 if resumed_at else None)
        except OSError as e:  # a file in the way (appeared since check_trackers), no permission, a full disk
            raise UserError(f"--report-to tensorboard: cannot write to {logdir} ({e.strerror or e})") from e

    def log(self, row: dict[str, float], step: int) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # like metrics.jsonl: a crash loses no finished step

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A W&B run: project from ``WANDB_PROJECT`` (default softlabels), named after the output directory."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "softlabels"), name=name, config=config)

    def log(self, row: dict[str, float], step: int) -> None:
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every tracker asked for, as one; empty (and free) when none was."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.trackers:
            flat = flatten(row)
            for t in self.trackers:
                t.log(flat, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_trackers(report_to: tuple[str, ...], rank: int, output: Path, config: dict[str, Any],
                  resumed_at: int = 0) -> Trackers:
    """The trackers of ``--report-to`` for this rank (none but on rank 0); TensorBoard writes to OUTPUT/tensorboard."""
    if rank != 0:
        return Trackers([])
    made: list[Tracker] = []
    for name in report_to:
        if name == "tensorboard":
            made.append(TensorBoard(output / "tensorboard", resumed_at))
        elif name == "wandb":
            made.append(Wandb(output.resolve().name, config))
    return Trackers(made)
