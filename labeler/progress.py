"""Driver-side progress: a tqdm bar on a TTY, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total_units: int, total_tokens: int, every_s: float = 15.0) -> None:
        self.total_units, self.total_tokens = total_units, total_tokens
        self.units = self.tokens = 0
        self.t0 = self.last = time.time()
        self.every_s = every_s
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="labeling", dynamic_ncols=True)

    def update(self, tokens: int) -> None:
        self.units += 1
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(tokens)
            self.bar.set_postfix_str(f"units {self.units}/{self.total_units}")
            return
        now = time.time()
        if now - self.last >= self.every_s or self.units == self.total_units:
            self.last = now
            rate = self.tokens / max(1e-9, now - self.t0)
            eta = (self.total_tokens - self.tokens) / rate if rate > 0 else float("inf")
            log.info(
                "labeled %d/%d units, %d/%d tokens, %.0f tokens/s, ETA %.0f s",
                self.units, self.total_units, self.tokens, self.total_tokens, rate, eta,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
