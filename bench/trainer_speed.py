"""Trainer step time: offline KD from stored labels vs CE alone vs online KD with the teacher.

Same student init (the built-in ``tiny``, ``softlabels.trainer.student.build_student``),
same batches (the first ``--batches`` batches of the train split, read with
``StatefulLoader`` as ``softlabels.trainer.loop.train`` does), one process, modes
interleaved round by round:

  ce       ``softlabels.trainer.loop.KDModule`` with ``loss="ce"``: cross-entropy on the
           true next tokens only (the floor: no teacher information at all);
  tail-kl  ``KDModule`` with ``loss="tail-kl"``: KL over the stored top-k +
           tail buckets (offline KD, what the trainer does by default);
  topk-kl  (optional) renormalized top-k KL;
  online   the teacher in memory: its forward under ``torch.inference_mode``
           producing the full ``[batch, seq, vocab]`` logits every step, then
           full-vocabulary KL(teacher || student) on the student's chunked,
           recomputed head (:class:`OnlineKD`, the same chunking as
           ``softlabels.trainer.losses.chunked_loss``).

A step is what ``softlabels.trainer.loop.train`` does per batch: forward, backward,
gradient clipping, AdamW step (same parameter groups and betas). Reported:
median step time over ``--repeats`` rounds (each round: every mode over every
batch, mode order rotated), tokens/s, ratios tail-kl/ce (issue target
<= 1.15) and online/tail-kl (the speedup of offline KD), and the peak RSS of
each mode, each measured in a fresh Python process so no mode sees another's
memory. Timings are reported, never asserted.

This file also holds the pieces the other trainer benchmarks reuse
(:func:`default_labels`, :func:`fixed_batches`, :func:`load_teacher`,
:class:`OnlineKD`, :func:`make_optimizer`, :func:`train_step`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
from softlabels.trainer.losses import label_positions

MODES = ("ce", "tail-kl", "topk-kl", "online")
LABELS_CMD = (".venv/bin/softlabels label --teacher smollm2-135m --corpus pydoc --output runs/bench-labels "
              "--top-k 64 --max-length 128 --limit 400 --shard-tokens 8192")


# -- pieces shared with loader.py and quality.py ------------------------------
def default_labels() -> str:
    """``runs/demo-full/labels`` (``make demo-full``'s 400 sequences) if it is complete (has a manifest), else ``runs/bench-labels``."""
    for rel in ("runs/demo-full/labels", "runs/bench-labels"):
        if (common.REPO / rel / "manifest.json").exists():
            return str(common.REPO / rel)
    return str(common.REPO / "runs/bench-labels")


def open_labels(url: str) -> Any:
    """Open a label set, or exit with the command that builds the default one."""
    from softlabels.schemas import open_label_set
    from softlabels.schemas.errors import MissingManifestError

    try:
        return open_label_set(url)
    except MissingManifestError as e:
        sys.exit(f"{e}\nbuild the benchmark label set first (2-3 min on CPU):\n  {LABELS_CMD}")


def fixed_batches(labels: Any, n: int, batch_size: int, seed: int = 0, eval_fraction: float = 0.05) -> list[dict]:
    """The first ``n`` training batches, read exactly as ``softlabels.trainer.loop.train`` reads them."""
    from softlabels.trainer.data import LabelDataset, StatefulLoader

    ds = LabelDataset(labels, split="train", eval_fraction=eval_fraction, seed=seed, epochs=None)
    loader = StatefulLoader(ds, batch_size)
    return [next(loader) for _ in range(n)]


def load_teacher(spec: str, vocab: int) -> Any:
    """The teacher as an HF causal LM (fp32, SDPA, eval mode): a built-in alias or an HF directory.

    Raises:
        ValueError: its vocabulary differs from the label set's.
    """
    from transformers import AutoModelForCausalLM

    from softlabels.labeler.builtin import BUILTIN_TEACHERS, builtin_teacher_dir

    path = builtin_teacher_dir(spec) if spec in BUILTIN_TEACHERS else spec
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = model.get_output_embeddings().weight.shape[0]
    if rows != vocab:
        raise ValueError(f"teacher {spec} has a vocabulary of {rows}, the label set {vocab}: not its teacher")
    return model


def _online_piece(head: torch.nn.Module, hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
    logq = torch.log_softmax(head(hc).float(), dim=-1)
    return F.kl_div(logq, tc, log_target=True, reduction="sum")


class OnlineKD(torch.nn.Module):
    """Online KD: the teacher in memory, full-vocabulary KL(teacher || student) per labeled position.

    The teacher runs under ``inference_mode`` and produces the full
    ``[batch, seq, vocab]`` logits, as a plain online-KD loop does. The
    student side is chunked and recomputed in backward exactly like
    ``softlabels.trainer.losses.chunked_loss`` (same ``chunk``), so the two KD modes
    differ only in where the teacher distribution comes from.
    ``teacher_s`` holds the seconds of the last teacher forward.
    """

    def __init__(self, model: torch.nn.Module, teacher: torch.nn.Module, chunk: int = 1024) -> None:
        super().__init__()
        self.model, self.chunk, self.teacher_s = model, chunk, 0.0
        self._teacher = [teacher]  # a list, so the teacher is no submodule (not trained, not in .parameters())

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        teacher = self._teacher[0]
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t_logp = torch.log_softmax(logits.float(), dim=-1)
            t_logp = t_logp.reshape(-1, t_logp.shape[-1])
        # Indexing outside inference mode yields a normal tensor, which autograd may save.
        t_logp = t_logp[batch["label_mask"].reshape(-1).nonzero().squeeze(-1)]
        self.teacher_s = time.perf_counter() - t0
        body, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        h = label_positions(hidden, batch)[0]
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], self.chunk):
            e = min(h.shape[0], s + self.chunk)
            if torch.is_grad_enabled():
                total = total + checkpoint(_online_piece, head, h[s:e], t_logp[s:e], use_reentrant=False)
            else:
                total = total + _online_piece(head, h[s:e], t_logp[s:e])
        loss = total / max(1, h.shape[0])
        return loss, {"kd": float(loss.detach())}


def quiet_hf() -> None:
    """No per-load progress bars from transformers in the benchmark's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def make_optimizer(model: Any, lr: float = 1e-3, weight_decay: float = 0.01) -> Any:
    """AdamW as ``softlabels.trainer.loop.train`` builds it: decay on matrices only, betas (0.9, 0.95)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )


def train_step(step_fn: Any, model: Any, opt: Any, batch: dict, clip: float = 1.0, sched: Any = None) -> float:
    """One optimizer step as ``softlabels.trainer.loop.train`` takes it (grad_accum 1, CPU); returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss, _ = step_fn(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


# -- this benchmark ------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default=None,
                   help=f"label set URL or path (default: runs/demo-full/labels if complete, else runs/bench-labels; "
                        f"build it with: {LABELS_CMD})")
    p.add_argument("--teacher", default="smollm2-135m",
                   help="teacher for online KD: built-in alias or HF directory (default: %(default)s)")
    p.add_argument("--modes", default="ce,tail-kl,online",
                   help=f"comma-separated, from {', '.join(MODES)} (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: %(default)s)")
    p.add_argument("--batches", type=int, default=3,
                   help="distinct batches, each timed once per round (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds, modes interleaved (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first (default: %(default)s)")
    p.add_argument("--head-chunk", type=int, default=1024, help="positions per LM-head chunk (default: %(default)s)")
    p.add_argument("--rss-steps", type=int, default=2,
                   help="steps each fresh process runs for the peak-RSS column; 0 skips it (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one mode's peak RSS
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.mode_list if m not in MODES]
    if bad or not args.mode_list:
        p.error(f"--modes: unknown {bad or args.modes!r}; choose from {', '.join(MODES)}")
    for name in ("batch_size", "batches", "repeats", "head_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.rss_steps < 0:
        p.error("--warmup and --rss-steps must be >= 0")
    args.labels = args.labels or default_labels()
    return args


def build_mode(mode: str, labels: Any, teacher: Any, head_chunk: int) -> tuple[Any, Any, Any]:
    """``(step module, student, optimizer)`` for one mode; every mode gets the same student init."""
    from softlabels.trainer.loop import KDModule, TrainConfig
    from softlabels.trainer.student import build_student

    model, _ = build_student("tiny", labels, seed=0)
    model.train()
    if mode == "online":
        fn = OnlineKD(model, teacher, head_chunk)
    else:
        fn = KDModule(model, TrainConfig(labels=labels.url, output="unused", loss=mode, head_chunk=head_chunk))
    return fn, model, make_optimizer(model)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args: argparse.Namespace) -> int:
    """One mode in this fresh process: a few steps, then print the peak RSS as JSON.

    The baseline is the RSS with torch, transformers and the trainer imported.
    """
    base = _rss_kib("VmRSS") * 1024
    labels = open_labels(args.labels)
    batches = fixed_batches(labels, args.batches, args.batch_size)
    teacher = load_teacher(args.teacher, labels.manifest.tokenizer.vocab_size) if args.child == "online" else None
    fn, model, opt = build_mode(args.child, labels, teacher, args.head_chunk)
    for i in range(args.warmup + args.rss_steps):
        train_step(fn, model, opt, batches[i % len(batches)])
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child
    # started from a big parent would report the parent's peak.
    peak = _rss_kib("VmHWM") * 1024
    print(json.dumps({"mode": args.child, "peak_rss": peak, "base_rss": base}))
    return 0


def peak_rss(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--labels", args.labels,
           "--teacher", args.teacher, "--batch-size", str(args.batch_size), "--batches", str(args.batches),
           "--warmup", str(args.warmup), "--rss-steps", str(args.rss_steps), "--head-chunk", str(args.head_chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-RSS run of {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, labels: Any) -> dict[str, Any]:
    """Interleaved step timings of every mode; returns per-mode seconds per round and teacher seconds."""
    batches = fixed_batches(labels, args.batches, args.batch_size)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    teacher = None
    if "online" in args.mode_list:
        teacher = load_teacher(args.teacher, labels.manifest.tokenizer.vocab_size)
    built = {m: build_mode(m, labels, teacher, args.head_chunk) for m in args.mode_list}
    n_student = sum(p.numel() for p in built[args.mode_list[0]][1].parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    t0 = time.perf_counter()
    for m, (fn, model, opt) in built.items():
        for i in range(args.warmup):
            train_step(fn, model, opt, batches[i % len(batches)])
    print(f"warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    per_round: dict[str, list[float]] = {m: [] for m in args.mode_list}  # mean step seconds per round
    teacher_s: list[float] = []
    for r in range(args.repeats):
        order = args.mode_list[r % len(args.mode_list):] + args.mode_list[: r % len(args.mode_list)]
        for m in order:
            fn, model, opt = built[m]
            times = []
            for b in batches:
                t = time.perf_counter()
                train_step(fn, model, opt, b)
                times.append(time.perf_counter() - t)
                if m == "online":
                    teacher_s.append(fn.teacher_s)
            per_round[m].append(sum(times) / len(times))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{m} {per_round[m][-1]:.2f} s" for m in args.mode_list),
              flush=True)
    return {"per_round": per_round, "teacher_s": teacher_s, "tokens_per_batch": tokens,
            "student_params": n_student, "teacher_params": n_teacher, "threads": torch.get_num_threads()}


def report(args: argparse.Namespace, labels: Any, res: dict[str, Any], rss: dict[str, dict[str, Any]]) -> None:
    m = labels.manifest
    per_round = res["per_round"]
    step = {k: common.median(v) for k, v in per_round.items()}
    tok = sum(res["tokens_per_batch"]) / len(res["tokens_per_batch"])
    print()
    print(f"device: {common.cpu_name()}, {res['threads']} torch threads; {common.versions()}")
    print(f"label set: {labels.url} (teacher {m.teacher.id}, top-{m.top_k} + tail, vocab {m.tokenizer.vocab_size:,})")
    teacher = f"; online teacher: {args.teacher}, {res['teacher_params'] / 1e6:.1f}M parameters, fp32"
    print(f"student: tiny, {res['student_params'] / 1e6:.1f}M parameters" + (teacher if res["teacher_params"] else ""))
    print(f"{args.batches} batches of {args.batch_size} sequences, {tok:,.0f} tokens per batch on average; "
          f"head chunk {args.head_chunk}; median of {args.repeats} interleaved rounds after {args.warmup} "
          "warm-up step(s)")
    print()
    base = step.get("ce")
    rows = []
    for k in args.mode_list:
        cells = [f"`{k}`", f"{step[k]:.3f}", f"{tok / step[k]:,.0f}",
                 f"{step[k] / base:.2f}x" if base else "-"]
        if k == "online" and res["teacher_s"]:
            cells.append(f"{common.median(res['teacher_s']):.3f}")
        else:
            cells.append("-")
        if rss:
            r = rss[k]
            cells += [f"{r['peak_rss'] / 2**20:,.0f}", f"{(r['peak_rss'] - r['base_rss']) / 2**20:,.0f}"]
        rows.append(cells)
    headers = ["mode", "step s (median)", "tokens/s", "vs ce", "teacher fwd s"]
    if rss:
        headers += ["peak RSS MiB", "above import baseline MiB"]
    print(common.markdown_table(headers, rows))
    print()
    summary: dict[str, Any] = {}
    if "ce" in step and "tail-kl" in step:
        ratio = step["tail-kl"] / step["ce"]
        paired = common.median([a / b for a, b in zip(per_round["tail-kl"], per_round["ce"])])
        summary["tail_kl_over_ce"] = ratio
        print(f"tail-kl / ce = {ratio:.3f} (median of per-round ratios {paired:.3f}); target <= 1.15: "
              f"{'PASS' if ratio <= 1.15 else 'ABOVE TARGET'}")
    if "online" in step and "tail-kl" in step:
        speed = step["online"] / step["tail-kl"]
        paired = common.median([a / b for a, b in zip(per_round["online"], per_round["tail-kl"])])
        summary["offline_speedup"] = speed
        print(f"offline tail-kl is {speed:.2f}x faster per step than online KD (median of per-round ratios "
              f"{paired:.2f}x)")
        if rss:
            print(f"peak RSS: online {rss['online']['peak_rss'] / 2**20:,.0f} MiB vs tail-kl "
                  f"{rss['tail-kl']['peak_rss'] / 2**20:,.0f} MiB "
                  f"({rss['online']['peak_rss'] / rss['tail-kl']['peak_rss']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"},
                                               "step_s": step, **res, "rss": rss, **summary}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_hf()
    if args.child:
        return child(args)
    labels = open_labels(args.labels)
    res = measure(args, labels)
    rss: dict[str, dict[str, Any]] = {}
    if args.rss_steps:
        for mode in args.mode_list:
            rss[mode] = peak_rss(mode, args)
            print(f"peak RSS {mode}: {rss[mode]['peak_rss'] / 2**20:,.0f} MiB", flush=True)
    report(args, labels, res, rss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
