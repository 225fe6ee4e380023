"""TrainConfig: everything one training run needs, validated at construction.

Filled from the defaults below, then a YAML file (``softlabels train --config``), then
the flags given. Imports neither torch nor transformers, so ``--help`` and a bad
setting answer at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from softlabels.schemas.errors import UserError

LOSSES = ("tail-kl", "topk-kl", "reverse-kl", "tail-sampled", "ce")


@dataclass(frozen=True)
class TrainConfig:
    labels: str
    output: str
    student: str = "tiny"
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    loss: str = "tail-kl"
    alpha: float = 1.0  # weight of the KD term; (1 - alpha) goes to CE on true tokens
    temperature: float = 1.0
    seed: int = 0
    eval_fraction: float = 0.05
    eval_every: int = 0  # 0: only before and after training
    eval_batches: int | None = 50
    head_chunk: int = 1024
    num_workers: int = 0
    device: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    metrics: str | None = None  # JSONL path (default: OUTPUT/metrics.jsonl)
    checkpoint_every: int = 0  # 0: no checkpoints
    checkpoint_dir: str | None = None  # local path or URL (default: OUTPUT/checkpoints)
    resume: bool = False  # continue from the latest checkpoint, if there is one
    shuffle_window: int = 2  # shards shuffled together (the shuffle buffer)
    prefetch: int = 2  # shards read ahead in the background
    top_k: int | None = None  # read-time truncation to k' < the set's k
    skip_corrupt: bool = False
    allow_vocab_mismatch: bool = False
    plot: str | None = None  # PNG of the loss and eval curves, drawn at the end
    log_samples: bool = False  # write the sample keys each rank trained on (tests, audits)
    trust_remote_code: bool = False  # a hub student's own modeling code runs only if asked

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "head_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every", "num_workers", "checkpoint_every", "prefetch"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.loss not in LOSSES:
            raise UserError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "tail-sampled" and self.top_k is not None:
            raise UserError("--loss tail-sampled cannot use --top-k: the stored tail draws never saw the entries k' drops")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio must be in [0, 1] (a share of the peak lr), got {self.min_lr_ratio!r}")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr!r}")
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0, got {self.temperature!r}")
        if self.plot is not None and not self.plot.lower().endswith(".png"):
            raise UserError(f"plot {self.plot}: expected a .png file name")

    def redacted(self) -> dict[str, Any]:
        d = asdict(self)
        d["storage_options"] = {k: "***" for k in self.storage_options}
        return d
