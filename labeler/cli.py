"""``softlabels label`` (label a corpus with a teacher) and ``softlabels inspect`` (summarize a label set)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from softlabels.labeler.config import LabelConfig

from softlabels.common import crash
from softlabels.common.cli import debug_flag, given_flags, parse_storage_options, process_started, require_extra

BOOL = argparse.BooleanOptionalAction


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``label`` and ``inspect`` to the ``softlabels`` command."""
    r = sub.add_parser(
        "label",
        help="label a corpus and write a label set (resumes if interrupted)",
        description="Label a corpus with a teacher and write a label set. Re-running the same command resumes. "
        "Settings come from the defaults, then --config FILE.yaml, then the flags given.",
    )
    d = argparse.Namespace(**{f.name: f.default for f in fields(LabelConfig)})  # defaults for the help text
    S = argparse.SUPPRESS  # flags not given stay out of the namespace, so the YAML file can set them
    r.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of settings (keys as below, e.g. top_k: 64); flags override it")
    r.add_argument("--teacher", default=S, help=f"built-in alias, local HF model dir, or HF id (default: {d.teacher})")
    r.add_argument("--revision", default=S, help="hub revision of the teacher (HF ids only)")
    r.add_argument("--corpus", default=S, help=f"'pydoc' or 'pydoc-chat' (built-in), hf:NAME (an HF hub dataset in the local cache), or a .txt/.jsonl[.gz|.zst]/.json/.parquet/.arrow path, URL, folder (save_to_disk too) or glob (default: {d.corpus})")
    r.add_argument("--text-field", default=S, help=f"field/column holding the text in .jsonl/.parquet (default: {d.text_field})")
    r.add_argument("--format", choices=["auto", "text", "chat", "prompt-completion", "prompt"], default=S,
                   help="what corpus rows are; auto decides from the first row and says so; prompt: plain-text prompts "
                   "(with --generate-with) (default: auto)")
    r.add_argument("--messages-field", default=S, help="chat rows: field of the turns (default: messages, else ShareGPT conversations)")
    r.add_argument("--prompt-field", default=S, help="prompt-completion rows: field of the prompt (default: prompt)")
    r.add_argument("--completion-field", default=S, help="prompt-completion rows: field of the completion (default: completion, else response)")
    r.add_argument("--train-on", choices=["all", "assistant", "completion"], default=S,
                   help="positions trained: assistant tokens (chat default), the completion (prompt-completion default) or all (text default)")
    r.add_argument("--chat-template", default=S, metavar="FILE", help="Jinja chat template replacing the tokenizer's own (its sha256 goes in the manifest)")
    r.add_argument("--chat-date", default=S, metavar="YYYY-MM-DD",
                   help="the date chat templates that read the clock (strftime_now, e.g. Llama 3.x) see; pinned so that "
                   f"the same command labels the same way any day; recorded in the manifest (default: {d.chat_date})")
    r.add_argument("--split", default=S, help="split of an hf:NAME corpus or of a save_to_disk folder of splits (default: train)")
    r.add_argument("--on-error", choices=["fail", "skip"], default=S, help=f"undecodable corpus rows: stop, or skip and count them (default: {d.on_error})")
    r.add_argument("--output", default=S, help="label set location: local path, s3://bucket/prefix or any fsspec URL (required)")
    r.add_argument("--top-k", type=int, default=S, help=f"teacher entries kept per position (default: {d.top_k})")
    r.add_argument("--temperature", type=float, default=S, help=f"labeling temperature (default: {d.temperature})")
    r.add_argument("--max-length", type=int, default=S, help=f"tokens per sequence; longer documents become several (default: {d.max_length})")
    r.add_argument("--packing", action=BOOL, default=S, help="pack documents into full sequences with EOS between them")
    r.add_argument("--add-eos", action=BOOL, default=S, help="append EOS to each document (per-document mode)")
    r.add_argument("--limit", type=int, default=S, help="label at most this many sequences")
    r.add_argument("--max-expand-bytes", type=int, default=S, metavar="N",
                   help="bytes one read task may decompress or decode before its file is refused (a .jsonl.gz or "
                   ".zst is read whole by one task) (default: 256 MiB, or $SOFTLABELS_MAX_EXPAND_BYTES)")
    r.add_argument("--encoding", default=S, metavar="NAME[:max_kl=X]",
                   help=f"label columns on disk: fp16 (v1 layout), packed (bit-packed ids + fp16), packed-q8, or compact "
                   f"(smallest; its error KL(exact||decoded) stays within max_kl nats/token, default 1e-4) (default: {d.encoding})")
    r.add_argument("--tail-samples", type=int, default=S, metavar="S",
                   help="also store S draws per position from the teacher's distribution outside the top-k "
                   "(distinct ids + counts) for the trainer's tail-sampled loss (default: 0, off)")
    r.add_argument("--store-spans", action=BOOL, default=S,
                   help="store each token's byte span in the text (about 0.6%% more bytes), so students with another "
                   "tokenizer can distill from the set (default: on when the teacher's tokenizer reproduces text exactly)")
    g = r.add_argument_group("responses written by a model (a corpus of prompts: chat rows ending with a user turn, "
                             "'prompt' rows, plain text with --format prompt; docs/labeler.md)")
    g.add_argument("--generate-with", default=S, metavar="teacher|DIR",
                   help="write the responses first: 'teacher' (sequence-level KD), or a causal LM directory sharing the "
                   "teacher's tokenizer, e.g. a student saved by `softlabels train` (on-policy rounds); then label them")
    g.add_argument("--max-new-tokens", type=int, default=S, help=f"most tokens per response (default: {d.max_new_tokens})")
    g.add_argument("--sampling-temperature", type=float, default=S,
                   help=f"the generator's temperature, 0 for greedy (--temperature is the labels') (default: {d.sampling_temperature})")
    g.add_argument("--top-p", type=float, default=S, help=f"nucleus sampling: the smallest set of ids holding this mass (default: {d.top_p})")
    g.add_argument("--samples-per-prompt", type=int, default=S, help=f"responses per prompt (default: {d.samples_per_prompt})")
    g.add_argument("--seed", type=int, default=S,
                   help="each response is a function of (seed, prompt id, sample index) alone, whatever the batching, "
                   f"workers and replicas (default: {d.seed})")
    r.add_argument("--shard-tokens", type=int, default=S, help=f"tokens per unit/shard (default: {d.shard_tokens})")
    r.add_argument("--batch-tokens", type=int, default=S, help=f"padded tokens per teacher batch (default: {d.batch_tokens})")
    r.add_argument("--head-chunk", type=int, default=S, help=f"positions per LM-head chunk; bounds memory (default: {d.head_chunk})")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=S, help="teacher dtype (default: bfloat16 on GPU, float32 on CPU)")
    r.add_argument("--device", default=S, help="torch device (default: cuda if the Ray cluster has GPUs, else cpu)")
    r.add_argument("--num-replicas", type=int, default=S, help="teacher replicas (default: one per GPU, else one per Ray node)")
    r.add_argument("--gpus-per-replica", type=int, default=S, metavar="N",
                   help="GPUs per teacher replica, on one node: a teacher too big for one GPU is spread over N "
                   "with device_map (default: 1)")
    r.add_argument("--threads", type=int, default=S, help="torch threads per CPU replica (default: cores / replicas)")
    r.add_argument("--ray-address", default=S, help="join this Ray cluster: host:port, ray://host:port, or 'auto' for the one `ray start` began on this machine (default: $RAY_ADDRESS, else start a fresh local Ray)")
    r.add_argument("--storage-option", action="append", default=S, metavar="KEY=VALUE", help="fsspec storage option (repeatable), e.g. endpoint_url=http://...")
    r.add_argument("--trust-remote-code", action=BOOL, default=S, help="allow the teacher's own modeling code (off by default)")
    r.add_argument("--overwrite", action=BOOL, default=S,
                   help="delete the label set at --output (only the paths a label set is made of) and start afresh")
    r.add_argument("--take-over", action=BOOL, default=S,
                   help="claim --output even though another run's claim has not expired (that run must be dead)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    debug_flag(r)

    i = sub.add_parser("inspect", help="summarize a label set's manifest and label statistics")
    i.add_argument("url", help="label set location")
    i.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec storage option (repeatable)")
    i.add_argument("--max-shards", type=int, default=8, help="shards to sample for statistics (default: %(default)s)")
    i.add_argument("--plot", default=None, metavar="FILE.png", help="also draw histograms of top-1, top-k mass, tail mass and entropy")
    debug_flag(i)
    r.set_defaults(handler=_label)
    i.set_defaults(handler=_inspect)


def _label(args: argparse.Namespace) -> int:
    require_extra("labeler", "ray", "torch", "transformers")
    from softlabels.labeler.config import resolve_config
    from softlabels.labeler.job import print_summary, run
    from softlabels.labeler.pipeline import JobFailed

    if crash.enabled():  # fault-injection tests: a crash point in a Ray worker also kills this driver
        os.environ.setdefault(crash.DRIVER_ENV, str(os.getpid()))
    try:
        summary = run(resolve_config(args.config, given_flags(args)), started=process_started())
    except JobFailed as e:
        if args.debug:
            raise
        print(f"softlabels label: error: {e}; committed units are kept: rerun the same command to resume", file=sys.stderr)
        return 1
    if args.json:
        from dataclasses import asdict

        d = asdict(summary)
        d.update(bytes_per_token=summary.bytes_per_token, tokens_per_s=summary.tokens_per_s)
        print(json.dumps(d))
    else:
        print_summary(summary)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from softlabels.labeler.inspect import inspect_label_set

    report = inspect_label_set(args.url, parse_storage_options(args.storage_option), args.max_shards, plot=args.plot)
    print(json.dumps(report, indent=2))
    return 0
