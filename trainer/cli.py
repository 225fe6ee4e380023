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
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub student's own modeling code (off by default)")
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
    r.add_argument("--loss", default="tail-kl", choices=["tail-kl", "topk-kl", "reverse-kl", "tail-sampled", "ce"],
                   help="training loss; tail-sampled needs a set labeled with --tail-samples (default: %(default)s)")
    r.add_argument("--alpha", type=float, default=1.0, help="KD weight; 1 - alpha goes to CE on true tokens (default: %(default)s)")
    r.add_argument("--temperature", type=float, default=1.0, help="student-side temperature for KD (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0, help="seed for init, data order and dropout (default: %(default)s)")
    r.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: before and after only)")
    r.add_argument("--eval-batches", type=int, default=50, help="batches per evaluation (default: %(default)s)")
    r.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    r.add_argument("--metrics", default=None, help="metrics JSONL path (default: OUTPUT/metrics.jsonl)")
    r.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    r.add_argument("--checkpoint-dir", default=None, help="checkpoint location, local or URL (default: OUTPUT/checkpoints)")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint, exactly (starts fresh if there is none)")
    r.add_argument("--shuffle-window", type=int, default=2, help="shards whose rows are shuffled together (default: %(default)s)")
    r.add_argument("--prefetch", type=int, default=2, help="shards read ahead in the background (default: %(default)s)")
    r.add_argument("--top-k", type=int, default=None, help="use only the first k' of the stored k entries (the tail absorbs the rest exactly)")
    r.add_argument("--skip-corrupt", action="store_true", help="skip and count shards failing their checksum instead of stopping")
    r.add_argument("--allow-vocab-mismatch", action="store_true", help="accept a student tokenizer that differs from the teacher's if all ids fit")
    r.add_argument("--plot", default=None, metavar="FILE.png", help="draw loss and eval curves at the end")
    r.add_argument("--log-samples", action="store_true", help="write the keys of the samples each rank trained on (OUTPUT/samples.rankN.txt)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")

    e = sub.add_parser("eval", help="held-out CE, KL to teacher and top-1 agreement of a model, as JSON")
    _common(e)
    e.add_argument("--model", required=True, help="trained student directory, HF id, or 'tiny' (a fresh, untrained init)")
    e.add_argument("--split", default="eval", choices=["eval", "train", "all"], help="which samples to score (default: %(default)s)")
    e.add_argument("--max-batches", type=int, default=None, help="score at most this many batches")
    e.add_argument("--seed", type=int, default=0, help="init seed for 'tiny' (default: %(default)s)")

    x = sub.add_parser("export", help="quantize a trained student to an ONNX model for CPUs (int8 by default)")
    x.add_argument("--model", required=True, help="trained student directory (what `run` wrote)")
    x.add_argument("--output", required=True, help="new local directory for model.onnx, tokenizer and export record")
    x.add_argument("--quantize", default="int8", choices=["int8", "none"],
                   help="int8: dynamic int8 with per-channel weights (ONNX Runtime); none: the fp32 graph (default: %(default)s)")
    x.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modeling code (off by default)")
    x.add_argument("--json", action="store_true", help="print the export record as JSON")
    x.add_argument("--debug", action="store_true", help="show tracebacks")

    c = sub.add_parser("compare", help="table and bar chart: size, memory, speed and held-out quality of several models")
    _common(c)
    c.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="teacher first, then students: HF model directories or ids, or `export` directories")
    c.add_argument("--names", nargs="+", default=None, metavar="NAME", help="a short name per model for the table")
    c.add_argument("--eval-batches", type=int, default=None, help="score at most this many held-out batches (default: all)")
    c.add_argument("--prompt-rows", type=int, default=8, help="sequences in the fixed speed batch (default: %(default)s)")
    c.add_argument("--prompt-length", type=int, default=128, help="tokens per sequence in the speed batch (default: %(default)s)")
    c.add_argument("--seconds", type=float, default=5.0, help="time each model's speed for at least this long (default: %(default)s)")
    c.add_argument("--threads", type=int, default=None, help="CPU threads for every model (default: all cores)")
    c.add_argument("--rounds", type=int, default=2,
                   help="time every model this many times, in turn, and keep each one's fastest (default: %(default)s)")
    c.add_argument("--plot", default="compare.png", metavar="FILE.png", help="bar chart to write (default: %(default)s)")
    c.add_argument("--json", action="store_true", help="print the rows as JSON after the table")

    pl = sub.add_parser("plot", help="draw a run's loss and eval curves (metrics.jsonl) to a PNG")
    pl.add_argument("metrics", help="metrics.jsonl of a run")
    pl.add_argument("--output", required=True, metavar="FILE.png", help="PNG to write")
    pl.add_argument("--debug", action="store_true", help="show tracebacks")
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
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        shuffle_window=args.shuffle_window,
        prefetch=args.prefetch,
        top_k=args.top_k,
        skip_corrupt=args.skip_corrupt,
        allow_vocab_mismatch=args.allow_vocab_mismatch,
        plot=args.plot,
        log_samples=args.log_samples,
        trust_remote_code=args.trust_remote_code,
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
    model, _ = build_student(args.model, ds.labels, args.seed, trust_remote_code=args.trust_remote_code)
    model.to(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    result = evaluate(model, ds, args.batch_size, args.max_batches, args.head_chunk)
    print(json.dumps({"model": args.model, "labels": args.labels, "split": args.split, **result}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainer.export import export_model

    meta = export_model(args.model, args.output, args.quantize, args.trust_remote_code)
    if args.json:
        print(json.dumps(meta))
    else:
        src, dst = meta["source_bytes"], meta["onnx_bytes"]
        print(f"exported  {args.model} -> {meta['output']} ({meta['scheme']}, embedding "
              f"{'tied' if meta['tied_embedding'] else 'separate'})")
        print(f"size      {src / 1e6:.1f} MB -> {dst / 1e6:.1f} MB ({src / dst:.2f}x smaller)")
        print(f"probe     top-1 agreement with the source {meta['probe']['top1_agreement']:.3f}, "
              f"relative logit error {meta['probe']['relative_logit_error']:.2%} (fixed probe batch)")
        print(f"load with {meta['load']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from trainer.compare import compare, plot, ratios, table

    if args.plot:
        from schemas.cliutil import pyplot

        pyplot(args.plot)  # a bad file name or a missing matplotlib stops here, before any model runs
    rows = compare(args.labels, args.models, args.names, storage_options=parse_storage_options(args.storage_option),
                   eval_fraction=args.eval_fraction, batch_size=args.batch_size, eval_batches=args.eval_batches,
                   rows=args.prompt_rows, length=args.prompt_length, seconds=args.seconds, threads=args.threads,
                   rounds=args.rounds,
                   trust_remote_code=args.trust_remote_code)
    print(table(rows))
    for line in ratios(rows):
        print(line)
    if args.plot:
        plot(rows, args.plot)
        print(f"chart     {args.plot}")
    if args.json:
        print(json.dumps(rows))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from trainer.plot import plot_metrics

    plot_metrics(args.metrics, args.output)
    print(args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    body = {"run": _run, "eval": _eval, "export": _export, "compare": _compare, "plot": _plot}[args.command]
    return run_main(lambda: body(args), args.debug, "trainer")


if __name__ == "__main__":
    sys.exit(main())
