"""``python -m trainer``: train a student from a label set, or evaluate one."""

from __future__ import annotations

import argparse
import json
import sys

from schemas.cliutil import parse_storage_options, run_main, setup_logging


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="label set location: local path, s3://bucket/prefix or any fsspec URL")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of samples, by sample_id hash (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: %(default)s)")
    p.add_argument("--head-chunk", type=int, default=1024, help="positions per LM-head chunk in the loss (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec storage option (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train a student on a label set (never loads the teacher)")
    _common(r)
    r.add_argument("--student", default="tiny", help="'tiny' (built-in), a config .json, a local HF model dir, or an HF id (default: %(default)s)")
    r.add_argument("--output", required=True, help="directory for the trained student (save_pretrained) and metrics.jsonl")
    r.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    r.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    r.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    r.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    r.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps before cosine decay (default: %(default)s)")
    r.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default: %(default)s)")
    r.add_argument("--loss", default="tail-kl", choices=["tail-kl", "topk-kl", "reverse-kl", "ce"], help="training loss (default: %(default)s)")
    r.add_argument("--alpha", type=float, default=1.0, help="KD weight; 1 - alpha goes to CE on true tokens (default: %(default)s)")
    r.add_argument("--temperature", type=float, default=1.0, help="student-side temperature for KD (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0, help="seed for init, data order and dropout (default: %(default)s)")
    r.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: before and after only)")
    r.add_argument("--eval-batches", type=int, default=50, help="batches per evaluation (default: %(default)s)")
    r.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    r.add_argument("--metrics", default=None, help="metrics JSONL path (default: OUTPUT/metrics.jsonl)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")

    e = sub.add_parser("eval", help="held-out CE, KL to teacher and top-1 agreement of a model, as JSON")
    _common(e)
    e.add_argument("--model", required=True, help="trained student directory, HF id, or 'tiny' (a fresh, untrained init)")
    e.add_argument("--split", default="eval", choices=["eval", "train", "all"], help="which samples to score (default: %(default)s)")
    e.add_argument("--max-batches", type=int, default=None, help="score at most this many batches")
    e.add_argument("--seed", type=int, default=0, help="init seed for 'tiny' (default: %(default)s)")
    return p


def _run(args: argparse.Namespace) -> int:
    from trainer.loop import TrainConfig, train

    cfg = TrainConfig(
        labels=args.labels,
        output=args.output,
        student=args.student,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        clip=args.clip,
        loss=args.loss,
        alpha=args.alpha,
        temperature=args.temperature,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        head_chunk=args.head_chunk,
        num_workers=args.num_workers,
        device=args.device,
        storage_options=parse_storage_options(args.storage_option),
        metrics=args.metrics,
    )
    summary = train(cfg)
    if args.json:
        print(json.dumps(summary))
    else:
        b, a = summary["before"], summary["after"]
        print(f"student   {summary['student']} ({summary['parameters'] / 1e6:.1f}M parameters) -> {summary['output']}")
        print(f"trained   {summary['steps']} steps, {summary['train_tokens']:,} tokens in {summary['train_s']:.1f} s")
        print(f"{'':10}{'CE':>8}{'KL':>8}{'top-1':>8}")
        for name, ev in (("before", b), ("after", a)):
            print(f"{name:10}{ev['ce']:8.3f}{ev['kl']:8.3f}{ev['top1']:8.3f}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from trainer.data import LabelDataset
    from trainer.evaluate import evaluate
    from trainer.student import build_student

    ds = LabelDataset(args.labels, parse_storage_options(args.storage_option), args.split, args.eval_fraction, shuffle=False)
    model, _ = build_student(args.model, ds.labels, args.seed)
    model.to(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    result = evaluate(model, ds, args.batch_size, args.max_batches, args.head_chunk)
    print(json.dumps({"model": args.model, "labels": args.labels, "split": args.split, **result}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    body = {"run": _run, "eval": _eval}[args.command]
    return run_main(lambda: body(args), args.debug, "trainer")


if __name__ == "__main__":
    sys.exit(main())
