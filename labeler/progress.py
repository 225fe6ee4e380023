"""Driver-side progress: a tqdm bar on a TTY, periodic log lines otherwise.

The plan streams in while labeling runs (blocks are tokenized in parallel),
so the total is an estimate until planning ends: tokens planned so far,
scaled by the fraction of the corpus read. Units skipped by a resume count
as done but not toward tokens/s.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


def _duration(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, every_s: float = 15.0, tty: bool | None = None, what: str = "tokens") -> None:
        self.what = what  # what is counted: tokens, or (--generate-with) responses
        self.units_planned = self.tokens_planned = 0
        self.read_fraction = 0.0
        self.plan_final = False
        self.units_done = self.tokens_done = self.resumed = self.labeled = self.generated = 0
        self.t0 = self.last = time.time()
        self.every_s = every_s
        self.bar = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=1, unit="tok", unit_scale=True, desc="labeling", dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} " + ("tok" if what == "tokens" else what)
                + " [{elapsed}{postfix}]",
            )

    # -- events --------------------------------------------------------------
    def planned(self, tokens: int, read_fraction: float) -> None:
        self.units_planned += 1
        self.tokens_planned += tokens
        self.read_fraction = read_fraction

    def plan_complete(self) -> None:
        self.plan_final = True
        self._show(force=True)

    def done(self, tokens: int, resumed: bool = False, generated: int = 0) -> None:
        """A unit committed (``tokens`` labeled; ``generated``: of them, response tokens a generator wrote)."""
        self.units_done += 1
        self.generated += generated
        self.tokens_done += tokens
        if resumed:
            self.resumed += 1
        else:
            self.labeled += tokens
        self._show(force=self.plan_final and self.units_done == self.units_planned)

    # -- figures ---------------------------------------------------------------
    @property
    def total_tokens(self) -> int:
        """Exact once planning is complete; before that, extrapolated from the corpus read so far."""
        if self.plan_final or self.read_fraction <= 0:
            return max(self.tokens_planned, self.tokens_done)
        return max(self.tokens_done, int(self.tokens_planned / min(1.0, self.read_fraction)))

    @property
    def rate(self) -> float:
        return self.labeled / max(1e-9, time.time() - self.t0)

    @property
    def eta_s(self) -> float:
        rate = self.rate
        return (self.total_tokens - self.tokens_done) / rate if rate > 0 else float("inf")

    def status(self) -> str:
        units = f"{self.units_done}/{self.units_planned}{'' if self.plan_final else '+'} units"
        resumed = f", {self.resumed} resumed" if self.resumed else ""
        generated = (f", {self.generated / max(1e-9, time.time() - self.t0):,.1f} generated tokens/s"
                     if self.generated else "")
        return f"{units}{resumed}, {self.rate:,.{0 if self.what == 'tokens' else 2}f} {self.what}/s{generated}, ETA {_duration(self.eta_s)}"

    def _show(self, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.total = max(1, self.total_tokens)
            self.bar.n = self.tokens_done
            self.bar.set_postfix_str(self.status(), refresh=True)
            return
        now = time.time()
        if force or now - self.last >= self.every_s:
            self.last = now
            approx = "" if self.plan_final else "~"
            log.info("labeled %s/%s%s %s: %s", f"{self.tokens_done:,}", approx, f"{self.total_tokens:,}", self.what,
                     self.status())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
