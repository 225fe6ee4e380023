"""What a training run shows as it goes: metrics.jsonl (and the --report-to trackers), eval lines, the progress bar."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from softlabels.trainer.tracking import Trackers

log = logging.getLogger(__name__)


class Metrics:
    """metrics.jsonl, each row also sent to the --report-to trackers; on resume, rows past the checkpoint
    (from the interrupted run) are dropped."""

    def __init__(self, path: Path, keep_until: int, tracker: Trackers | None = None) -> None:
        self.tracker = tracker or Trackers([])
        rows = []
        if keep_until and path.exists():
            for ln in path.read_text().splitlines():
                try:
                    if json.loads(ln)["step"] <= keep_until:
                        rows.append(ln)
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by the crash that interrupted the run
        if not keep_until and path.exists():
            path.unlink()
        if rows:
            path.write_text("\n".join(rows) + "\n")
        self.fh = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        self.tracker.log(row, row["step"])

    def close(self) -> None:
        self.fh.close()
        self.tracker.close()


def fmt_eval(ev: dict[str, float]) -> str:
    bpb = f"  bpb {ev['bpb']:.3f}" if ev.get("bpb") is not None else ""
    aligned = f", {100 * ev['aligned']:.1f}% aligned" if "aligned" in ev else ""
    return f"ce {ev['ce']:.3f}{bpb}  kl {ev['kl']:.3f}  top1 {ev['top1']:.3f}  ({ev['positions']} positions{aligned})"


class ProgressBar:
    """tqdm on a TTY; a log line every 10% of the steps otherwise (rank 0 only)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True) -> None:
        self.total, self.n, self.enabled = total, start, enabled
        self.tqdm = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.tqdm = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)

    def update(self, row: dict[str, Any]) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.update(1)
            self.tqdm.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
        elif self.n % max(1, self.total // 10) == 0 or self.n == self.total:
            log.info("step %d/%d loss %.4f lr %.2e", self.n, self.total, row["loss"], row["lr"])

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
