"""``python -m labeler``: label a corpus with a teacher, or inspect a label set."""

from __future__ import annotations

import argparse
import json
import sys

from schemas.cliutil import parse_storage_options, run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labeler", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="label a corpus and write a label set (resumes if interrupted)")
    r.add_argument("--teacher", default="smollm2-135m", help="built-in alias, local HF model dir, or HF id (default: %(default)s)")
    r.add_argument("--revision", default=None, help="hub revision of the teacher (HF ids only)")
    r.add_argument("--corpus", default="pydoc", help="'pydoc' (built-in) or a .txt/.jsonl/.parquet path, URL or glob (default: %(default)s)")
    r.add_argument("--text-field", default="text", help="field/column holding the text in .jsonl/.parquet (default: %(default)s)")
    r.add_argument("--output", required=True, help="label set location: local path, s3://bucket/prefix or any fsspec URL")
    r.add_argument("--top-k", type=int, default=64, help="teacher entries kept per position (default: %(default)s)")
    r.add_argument("--temperature", type=float, default=1.0, help="labeling temperature (default: %(default)s)")
    r.add_argument("--max-length", type=int, default=512, help="tokens per sequence; longer documents become several (default: %(default)s)")
    r.add_argument("--packing", action="store_true", help="pack documents into full sequences with EOS between them")
    r.add_argument("--add-eos", action="store_true", help="append EOS to each document (per-document mode)")
    r.add_argument("--limit", type=int, default=None, help="label at most this many sequences")
    r.add_argument("--shard-tokens", type=int, default=32768, help="tokens per unit/shard (default: %(default)s)")
    r.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per teacher batch (default: %(default)s)")
    r.add_argument("--head-chunk", type=int, default=1024, help="positions per LM-head chunk; bounds memory (default: %(default)s)")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="teacher dtype (default: bfloat16 on GPU, float32 on CPU)")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--num-replicas", type=int, default=None, help="teacher replicas (default: one per GPU, else 1)")
    r.add_argument("--threads", type=int, default=None, help="torch threads per CPU replica (default: cores / replicas)")
    r.add_argument("--ray-address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else a local one)")
    r.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec storage option (repeatable), e.g. endpoint_url=http://...")
    r.add_argument("--trust-remote-code", action="store_true", help="allow the teacher's own modeling code (off by default)")
    r.add_argument("--overwrite", action="store_true", help="delete what is at --output and start afresh")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument("--debug", action="store_true", help="show tracebacks")

    i = sub.add_parser("inspect", help="summarize a label set's manifest and label statistics")
    i.add_argument("url", help="label set location")
    i.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec storage option (repeatable)")
    i.add_argument("--max-shards", type=int, default=8, help="shards to sample for statistics (default: %(default)s)")
    i.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _run(args: argparse.Namespace) -> int:
    from labeler.config import LabelConfig
    from labeler.job import print_summary, run

    cfg = LabelConfig(
        teacher=args.teacher,
        corpus=args.corpus,
        output=args.output,
        top_k=args.top_k,
        temperature=args.temperature,
        max_length=args.max_length,
        packing=args.packing,
        add_eos=args.add_eos,
        limit=args.limit,
        shard_tokens=args.shard_tokens,
        text_field=args.text_field,
        storage_options=parse_storage_options(args.storage_option),
        batch_tokens=args.batch_tokens,
        head_chunk=args.head_chunk,
        dtype=args.dtype,
        device=args.device,
        num_replicas=args.num_replicas,
        threads=args.threads,
        ray_address=args.ray_address,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
    )
    summary = run(cfg)
    if args.json:
        from dataclasses import asdict

        d = asdict(summary)
        d.update(bytes_per_token=summary.bytes_per_token, tokens_per_s=summary.tokens_per_s)
        print(json.dumps(d))
    else:
        print_summary(summary)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from labeler.inspect import inspect_label_set

    print(json.dumps(inspect_label_set(args.url, parse_storage_options(args.storage_option), args.max_shards), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    body = {"run": _run, "inspect": _inspect}[args.command]
    return run_main(lambda: body(args), args.debug, "labeler")


if __name__ == "__main__":
    sys.exit(main())
