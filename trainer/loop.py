"""The training loop, written out plainly: AdamW, warmup + cosine, clipping, accumulation."""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.data import LabelDataset, collate
from trainer.evaluate import _move, evaluate
from trainer.losses import LOSSES, chunked_loss
from trainer.student import build_student

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "head_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

    def redacted(self) -> dict[str, Any]:
        d = asdict(self)
        d["storage_options"] = {k: "***" for k in self.storage_options}
        return d


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a student on a label set; returns a summary with eval before/after."""
    log.info("training config: %s", cfg.redacted())
    seed_everything(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_ds = LabelDataset(cfg.labels, cfg.storage_options, "train", cfg.eval_fraction, cfg.seed, epochs=None)
    eval_ds = LabelDataset(train_ds.labels, split="eval", eval_fraction=cfg.eval_fraction, shuffle=False)
    model, tokenizer = build_student(cfg.student, train_ds.labels, cfg.seed)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("student %s: %.1fM parameters on %s", cfg.student, n_params / 1e6, device)

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = Path(cfg.metrics) if cfg.metrics else out / "metrics.jsonl"
    metrics = open(metrics_path, "a")

    def record(row: dict[str, Any]) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    before = evaluate(model, eval_ds, cfg.batch_size, cfg.eval_batches, cfg.head_chunk)
    record({"step": 0, "eval": before})
    log.info("eval before training: %s", _fmt(before))

    loader = iter(
        DataLoader(train_ds, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers)
    )
    body, head = model.get_decoder(), model.get_output_embeddings()
    model.train()
    t0 = time.time()
    tokens = 0
    bar = _bar(cfg.steps)
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = _move(next(loader), device)
            with autocast:
                hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                loss, parts = chunked_loss(hidden, head, cfg.loss, batch, cfg.temperature, cfg.alpha, cfg.head_chunk)
            (loss / cfg.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        row = {"step": step + 1, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm), **parts_sum}
        row["tokens"] = tokens
        row["elapsed_s"] = time.time() - t0
        record(row)
        bar.update(row)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            ev = evaluate(model, eval_ds, cfg.batch_size, cfg.eval_batches, cfg.head_chunk)
            record({"step": step + 1, "eval": ev})
            log.info("eval at step %d: %s", step + 1, _fmt(ev))
    bar.close()
    train_s = time.time() - t0
    after = evaluate(model, eval_ds, cfg.batch_size, cfg.eval_batches, cfg.head_chunk)
    record({"step": cfg.steps, "eval": after})
    metrics.close()
    log.info("eval after training: %s", _fmt(after))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "softlabels_train.json").write_text(json.dumps({"config": cfg.redacted(), "label_set": {
        "url": train_ds.labels.url, "tokenizer_fingerprint": train_ds.manifest.tokenizer.fingerprint,
        "teacher": train_ds.manifest.teacher.id, "top_k": train_ds.manifest.top_k}}, indent=2) + "\n")
    return {
        "output": str(out),
        "student": cfg.student,
        "parameters": n_params,
        "steps": cfg.steps,
        "train_tokens": tokens,
        "train_s": train_s,
        "before": before,
        "after": after,
    }


def _fmt(ev: dict[str, float]) -> str:
    return f"ce {ev['ce']:.3f}  kl {ev['kl']:.3f}  top1 {ev['top1']:.3f}  ({ev['positions']} positions)"


class _bar:
    """tqdm on a TTY; a log line every 10% of the steps otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0
        self.tqdm = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.tqdm = tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)

    def update(self, row: dict[str, Any]) -> None:
        self.n += 1
        if self.tqdm is not None:
            self.tqdm.update(1)
            self.tqdm.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
        elif self.n % max(1, self.total // 10) == 0 or self.n == self.total:
            log.info("step %d/%d loss %.4f lr %.2e", self.n, self.total, row["loss"], row["lr"])

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
