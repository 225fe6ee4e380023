"""``softlabels train``, ``eval``, ``export``, ``compare`` and ``plot``: students from stored soft labels.

Never imports the labeler or Ray; training never loads the teacher (only ``eval --teacher`` / ``compare --teacher``
do, for the on-policy metric: the student's own responses scored by the teacher).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from softlabels.common.cli import debug_flag, given_flags, parse_storage_options, require_extra
from softlabels.schemas.errors import UserError

BOOL = argparse.BooleanOptionalAction
S = argparse.SUPPRESS


def _common(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Flags every label-set command takes; with ``suppress`` they stay out of the namespace unless given."""
    dflt = (lambda v: S) if suppress else (lambda v: v)
    p.add_argument("--labels", required=not suppress, default=dflt(None),
                   help="label set location: local path, s3://bucket/prefix or any fsspec URL")
    p.add_argument("--eval-fraction", type=float, default=dflt(None),
                   help="held-out share of samples, by sample_id hash (default: train 0.05; eval and compare: what the "
                   "student was trained with, from its softlabels_train.json, else 0.05; a larger share is refused)")
    p.add_argument("--batch-size", type=int, default=dflt(8), help="sequences per batch (default: 8)")
    p.add_argument("--head-chunk", type=int, default=dflt(2048), help="positions per LM-head chunk in the loss: bounds its memory, about 3 x chunk x vocab x 4 bytes; a batch of one chunk is not recomputed in backward (default: 2048)")
    p.add_argument("--device", default=dflt(None), help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--storage-option", action="append", default=dflt(None), metavar="KEY=VALUE", help="fsspec storage option (repeatable)")
    p.add_argument("--trust-remote-code", action=BOOL, default=dflt(False), help="allow a hub student's own modeling code (default: off)")
    debug_flag(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval``, ``export``, ``compare`` and ``plot`` to the ``softlabels`` command."""
    from softlabels.trainer.config import (CHANGEABLE, CHUNK_DISTANCES, DEFAULT_ALPHA, DEFAULT_CHUNK_DISTANCE,
                                           DEFAULT_CHUNK_WEIGHT, DEFAULT_CROSS_ALPHA, DEFAULT_CROSS_CHUNK_WEIGHT,
                                           DEFAULT_CROSS_LOSS, DEFAULT_LOSS, LOSSES, TrainConfig)

    d = argparse.Namespace(**{f.name: f.default for f in fields(TrainConfig)})  # defaults for the help text
    r = sub.add_parser(
        "train", help="train a student on a label set (never loads the teacher)",
        description="Train a student on a label set. Settings come from the defaults, then --config FILE.yaml, "
        "then the flags given. --checkpoint-every N with --resume continues a run exactly.",
    )
    r.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML file of settings (keys as below, e.g. batch_size: 16); flags override it")
    _common(r, suppress=True)
    r.add_argument("--student", default=S, help=f"'tiny' (built-in), a config .json, a local HF model dir, or an HF id (default: {d.student})")
    r.add_argument("--student-tokenizer", default=S, metavar="DIR",
                   help="build the tiny / .json student for this tokenizer (a directory or hub id) instead of the label "
                   "set's; another tokenizer than the set's distills across tokenizers (the set needs token spans)")
    r.add_argument("--token-map", choices=["first", "exact"], default=S,
                   help="across tokenizers, a teacher id maps to the student token of the same bytes (exact), or else "
                   "to the student token its bytes begin with (first) (default: first)")
    r.add_argument("--fsdp", action=BOOL, default=S,
                   help="shard parameters, gradients and optimizer state over the ranks (FSDP2, under torchrun): "
                   "students that do not fit one device; sharded checkpoints, a whole model saved at the end")
    r.add_argument("--packing", action=BOOL, default=S,
                   help="join each batch's sequences into rows of up to the label set's max length, each attending "
                   "only to itself (less padding; same losses)")
    r.add_argument("--precision", default=S, choices=["fp32", "bf16", "fp16"],
                   help="autocast of the student's forward (weights and optimizer stay fp32); fp16 scales the loss "
                   "and skips steps whose gradients overflow (default: bf16 on CUDA, fp32 elsewhere)")
    r.add_argument("--qat", default=S, choices=["q8_0", "q4"],
                   help="quantization-aware distillation: the forward uses the weights as `export --format gguf "
                   "--quant q8_0|q4_0` will store them (blocks of 32, llama.cpp's rounding), straight-through in the "
                   "backward; saved weights stay fp32 (default: off)")
    r.add_argument("--gradient-checkpointing", action=BOOL, default=S,
                   help="recompute each layer's activations in backward: less memory, a slower step, same gradients")
    r.add_argument("--report-to", action="append", default=S, metavar="NAME",
                   help="also send the metrics to none, tensorboard (OUTPUT/tensorboard) or wandb (project: "
                   "$WANDB_PROJECT or softlabels); repeatable or comma-separated (default: none)")
    r.add_argument("--init-from", default=S, metavar="DIR",
                   help="start from a trained student's weights (the --output of an earlier softlabels train), with a "
                   "fresh optimizer and schedule: task distillation or fine-tuning after general distillation")
    r.add_argument("--output", default=S, help="directory for the trained student (save_pretrained) and metrics.jsonl (required)")
    r.add_argument("--steps", type=int, default=S, help=f"optimizer steps (default: {d.steps})")
    r.add_argument("--grad-accum", type=int, default=S, help=f"micro-batches per step (default: {d.grad_accum})")
    r.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default: {d.lr})")
    r.add_argument("--min-lr-ratio", type=float, default=S, help=f"final learning rate as a share of the peak (default: {d.min_lr_ratio})")
    r.add_argument("--weight-decay", type=float, default=S, help=f"AdamW weight decay (default: {d.weight_decay})")
    r.add_argument("--warmup-steps", type=int, default=S, help=f"linear warmup steps before cosine decay (default: {d.warmup_steps})")
    r.add_argument("--clip", type=float, default=S, help=f"gradient-norm clip (default: {d.clip})")
    r.add_argument("--loss", default=S, choices=list(LOSSES),
                   help=f"training loss; tail-sampled needs a set labeled with --tail-samples; xtok-kl and xtok-uld are for "
                   "students with another tokenizer; reverse-kl, reverse-kl-sampled (the per-token estimate of on-policy "
                   "distillation) and kl-mix are for responses a student wrote (label --generate-with; their unset "
                   f"--alpha is 1 and --chunk-weight 0) (default: {DEFAULT_LOSS}, or {DEFAULT_CROSS_LOSS} with another tokenizer)")
    r.add_argument("--importance-cap", type=float, default=S, metavar="C",
                   help="--loss reverse-kl-sampled on a set a model wrote: weight each token by min(q(y) / "
                   f"q_sampler(y), C), the stored generator's log-prob; 0: no weights (default: {d.importance_cap})")
    r.add_argument("--reverse-weight", type=float, default=S, metavar="W",
                   help=f"--loss kl-mix: (1 - W) KL(teacher || student) + W KL(student || teacher) (default: {d.reverse_weight})")
    r.add_argument("--alpha", type=float, default=S, help="KD weight; 1 - alpha goes to CE on true tokens (default: "
                   f"{DEFAULT_ALPHA:g}, or {DEFAULT_CROSS_ALPHA:g} with another tokenizer)")
    r.add_argument("--chunk-weight", type=float, default=S,
                   help="weight of the chunk likelihood term: the teacher's and the student's probabilities of each "
                   "span of text both tokenizations split at (one token with one tokenizer) matched; needs a set "
                   f"labeled by softlabels >= 0.8 (default: {DEFAULT_CHUNK_WEIGHT:g}, or {DEFAULT_CROSS_CHUNK_WEIGHT:g} "
                   "with another tokenizer on such a set)")
    r.add_argument("--chunk-distance", choices=CHUNK_DISTANCES, default=S,
                   help="how the chunk term compares the two probabilities of a chunk: binary (KL between two "
                   "Bernoullis: likely chunks weigh most) or surprisal (the generalized KL between their -log: every "
                   f"chunk weighed alike) (default: {DEFAULT_CHUNK_DISTANCE})")
    r.add_argument("--temperature", type=float, default=S, help=f"student-side temperature for KD (default: {d.temperature})")
    r.add_argument("--seed", type=int, default=S, help=f"seed for init, data order and dropout (default: {d.seed})")
    r.add_argument("--eval-every", type=int, default=S, help="evaluate every N steps (default: 0, before and after only)")
    r.add_argument("--eval-batches", type=int, default=S, help=f"batches per evaluation (default: {d.eval_batches})")
    r.add_argument("--num-workers", type=int, default=S, help=f"DataLoader workers (default: {d.num_workers})")
    r.add_argument("--metrics", default=S, help="metrics JSONL path (default: OUTPUT/metrics.jsonl)")
    r.add_argument("--checkpoint-every", type=int, default=S, help="save a checkpoint every N steps (default: 0, never)")
    r.add_argument("--checkpoint-dir", default=S, help="checkpoint location, local or URL (default: OUTPUT/checkpoints)")
    r.add_argument("--resume", action=BOOL, default=S, help="continue from the latest checkpoint, exactly (starts fresh if there is none)")
    r.add_argument("--allow-changed", action="append", choices=CHANGEABLE, default=S, metavar="SETTING",
                   help=f"let --resume change this optimizer setting from what the checkpoint recorded (repeatable; "
                   f"one of {', '.join(CHANGEABLE)}); other settings a resume must keep are never changed")
    r.add_argument("--shuffle-window", type=int, default=S, help=f"shards whose rows are shuffled together (default: {d.shuffle_window})")
    r.add_argument("--prefetch", type=int, default=S, help=f"shards read ahead in the background (default: {d.prefetch})")
    r.add_argument("--top-k", type=int, default=S, help="use only the first k' of the stored k entries (the tail absorbs the rest exactly)")
    r.add_argument("--skip-corrupt", action=BOOL, default=S, help="skip and count shards failing their checksum instead of stopping")
    r.add_argument("--allow-vocab-mismatch", action=BOOL, default=S, help="accept a student tokenizer that differs from the teacher's if all ids fit")
    r.add_argument("--plot", default=S, metavar="FILE.png", help="draw loss and eval curves at the end")
    r.add_argument("--log-samples", action=BOOL, default=S, help="write the keys of the samples each rank trained on (OUTPUT/samples.rankN.txt)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(handler=_train)

    e = sub.add_parser("eval", help="held-out CE, bits per byte, KL to teacher and top-1 agreement of a model, as JSON")
    _common(e)
    e.add_argument("--model", required=True, help="trained student directory, HF id, a .gguf file (scored in llama.cpp), "
                   "or 'tiny' (a fresh, untrained init)")
    e.add_argument("--split", default="eval", choices=["eval", "train", "all"], help="which samples to score (default: %(default)s)")
    e.add_argument("--max-batches", type=int, default=None, help="score at most this many batches")
    e.add_argument("--seed", type=int, default=0, help="init seed for 'tiny', and of the on-policy responses (default: %(default)s)")
    _onpolicy_flags(e)
    e.set_defaults(handler=_eval)

    x = sub.add_parser("export", help="quantize a trained student for CPUs: an int8 ONNX model (default), or a GGUF "
                       "file for llama.cpp / Ollama")
    x.add_argument("--model", required=True, help="trained student directory (what `train` wrote)")
    x.add_argument("--output", required=True, help="onnx: a new local directory (model.onnx, tokenizer, export record); "
                   "gguf: a new *.gguf file")
    x.add_argument("--format", default="onnx", choices=["onnx", "gguf"],
                   help="onnx: ONNX Runtime (Python, C++, mobile); gguf: llama.cpp and what runs on it (default: %(default)s)")
    x.add_argument("--quantize", default="int8", choices=["int8", "none"],
                   help="onnx: int8: dynamic int8 with per-channel weights (ONNX Runtime); none: the fp32 graph (default: %(default)s)")
    x.add_argument("--quant", default=None, metavar="TYPE",
                   help="gguf: f16, q8_0, q4_0 (what `train --qat q8_0|q4` trains for) or q4_k_m (llama.cpp's mixture), "
                   "quantized by llama.cpp's own quantizer (default: q8_0)")
    x.add_argument("--threads", type=int, default=None, help="gguf: threads for quantizing and the check (default: all cores)")
    x.add_argument("--trust-remote-code", action=BOOL, default=False, help="allow the model's own modeling code (default: off)")
    x.add_argument("--json", action="store_true", help="print the export record as JSON")
    debug_flag(x)
    x.set_defaults(handler=_export)

    c = sub.add_parser("compare", help="table and bar chart: size, memory, speed and held-out quality of several models")
    _common(c)
    c.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="teacher first, then students: HF model directories or ids, `export` directories or .gguf files")
    c.add_argument("--names", nargs="+", default=None, metavar="NAME", help="a short name per model for the table")
    c.add_argument("--eval-batches", type=int, default=None, help="score at most this many held-out batches (default: all)")
    c.add_argument("--prompt-rows", type=int, default=8, help="sequences in the fixed speed batch (default: %(default)s)")
    c.add_argument("--prompt-length", type=int, default=128, help="tokens per sequence in the speed batch (default: %(default)s)")
    c.add_argument("--seconds", type=float, default=5.0, help="time each model's speed for at least this long (default: %(default)s)")
    c.add_argument("--threads", type=int, default=None, help="CPU threads for every model (default: all cores)")
    c.add_argument("--rounds", type=int, default=2,
                   help="time every model this many times, in turn, and keep each one's fastest (default: %(default)s)")
    c.add_argument("--plot", default="compare.png", metavar="FILE.png", help="bar chart to write; --no-plot for none (default: %(default)s)")
    c.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="draw no chart")
    c.add_argument("--json", action="store_true", help="print the rows as JSON only (no table), for scripts")
    c.add_argument("--seed", type=int, default=0, help="of the on-policy responses (default: %(default)s)")
    _onpolicy_flags(c)
    c.set_defaults(handler=_compare)

    pl = sub.add_parser("plot", help="draw a run's loss and eval curves (metrics.jsonl) to a PNG")
    pl.add_argument("metrics", help="metrics.jsonl of a run")
    pl.add_argument("--output", required=True, metavar="FILE.png", help="PNG to write")
    debug_flag(pl)
    pl.set_defaults(handler=_plot)


def _train(args: argparse.Namespace) -> int:
    require_extra("trainer", "torch", "transformers", "safetensors")
    from softlabels.trainer.config import TrainConfig
    from softlabels.trainer.loop import train

    from softlabels.common.settings import resolve_settings

    cfg = resolve_settings(TrainConfig, args.config, given_flags(args), required=("labels", "output"))
    summary = train(cfg)
    if args.json:
        print(json.dumps(summary))
    else:
        b, a = summary["before"], summary["after"]
        print(f"student   {summary['student']} ({summary['parameters'] / 1e6:.1f}M parameters) -> {summary['output']}")
        print(f"trained   {summary['steps']} steps, {summary['train_tokens']:,} tokens in {summary['train_s']:.1f} s")
        print(f"{'':10}{'CE':>8}{'bits/B':>8}{'KL':>8}{'top-1':>8}")
        for name, ev in (("before", b), ("after", a)):
            bpb = "-" if ev.get("bpb") is None else f"{ev['bpb']:.3f}"
            print(f"{name:10}{ev['ce']:8.3f}{bpb:>8}{ev['kl']:8.3f}{ev['top1']:8.3f}")
        if "aligned" in a:
            print(f"across tokenizers: {100 * a['aligned']:.1f}% of the teacher's labeled positions aligned, "
                  f"{100 * a['mapped_mass']:.1f}% of its mass there on ids the student has (KL and top-1 over those)")
    return 0




def _onpolicy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("on-policy metric (needs the teacher: the only place the trainer loads it)")
    g.add_argument("--teacher", default=None, metavar="DIR|ID",
                   help="the set's teacher (a directory, an HF id, or a built-in alias `label` has fetched): the model "
                   "writes responses to held-out prompts and the teacher scores every token: per-token KL(model || "
                   "teacher) over the vocabulary and the teacher's mean log-prob of the model's tokens")
    g.add_argument("--prompts", type=int, default=16, help="held-out prompts to respond to (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per response (default: %(default)s)")
    g.add_argument("--sampling-temperature", type=float, default=1.0, help="the model's sampling temperature (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")


def _onpolicy_settings(args: argparse.Namespace) -> Any:
    from softlabels.common.generate import GenerationSettings

    if args.prompts < 1:
        raise UserError(f"--prompts must be at least 1, got {args.prompts}")
    return GenerationSettings(args.max_new_tokens, args.sampling_temperature, args.top_p, 1, args.seed)


def _eval(args: argparse.Namespace) -> int:
    require_extra("trainer", "torch", "transformers")
    for name, value in (("--batch-size", args.batch_size), ("--head-chunk", args.head_chunk),
                        ("--max-batches", args.max_batches)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    settings = _onpolicy_settings(args) if args.teacher else None  # bad sampling settings: one line, before any work
    import torch
    from softlabels.trainer.data import LabelDataset, split_samples
    from softlabels.trainer.evaluate import evaluate
    from softlabels.trainer.crosstok import attach
    from softlabels.trainer.student import build_student, embedding_rows, held_out_fraction

    # A trained student is scored on the split it was trained with (its softlabels_train.json), never on a share
    # that holds samples it trained on; other models on 0.05 or the share given.
    from softlabels.schemas import open_label_set

    opts = parse_storage_options(args.storage_option)
    fingerprint = open_label_set(args.labels, opts).manifest.tokenizer.fingerprint
    fraction = held_out_fraction([args.model], args.eval_fraction, args.split, fingerprint)
    ds = LabelDataset(args.labels, opts, args.split, fraction, shuffle=False)
    if args.model.endswith(".gguf"):  # scored in llama.cpp, on its own logits
        if settings is not None:
            raise UserError("--teacher (the on-policy metric) needs a PyTorch model; score the student it came from")
        require_extra("gguf", "gguf", "llama_cpp")
        from softlabels.trainer.gguf_run import load_for_labels

        model, tokenizer = load_for_labels(args.model, ds.labels)
        ds.max_id = model.vocab
    else:
        model, tokenizer = build_student(args.model, ds.labels, args.seed, trust_remote_code=args.trust_remote_code)
        ds.max_id = embedding_rows(model)
        model.to(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    attach([ds], ds.labels, tokenizer, args.model)  # bits per byte; another tokenizer: aligned by the set's spans
    result = evaluate(model, ds, args.batch_size, args.max_batches, args.head_chunk)
    if settings is not None:
        from softlabels.trainer.onpolicy import evaluate_onpolicy, load_teacher

        held = split_samples(ds.labels, fraction, args.split)
        teacher = load_teacher(args.teacher, next(model.parameters()).device, args.trust_remote_code)
        result.update(evaluate_onpolicy(model, ds.labels, teacher, held, settings, args.prompts))
    print(json.dumps({"model": args.model, "labels": args.labels, "split": args.split, "eval_fraction": fraction,
                      **result}))
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _export_gguf(args)
    if args.quant is not None:
        raise UserError("--quant is for --format gguf; an ONNX export takes --quantize int8|none")
    require_extra("export", "torch", "transformers", "onnx", "onnxruntime")
    from softlabels.trainer.export import export_model

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


def _export_gguf(args: argparse.Namespace) -> int:
    from softlabels.trainer.gguf import QUANTS, export_gguf

    quant = args.quant or "q8_0"
    if quant not in QUANTS:  # before any extra is looked for: the flag is wrong whatever is installed
        raise UserError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if args.quantize != "int8":
        raise UserError("--quantize is for --format onnx; a GGUF export takes --quant")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    require_extra("trainer", "torch", "transformers")
    require_extra("gguf", "gguf", "llama_cpp")
    meta = export_gguf(args.model, args.output, quant, args.trust_remote_code, args.threads)
    if args.json:
        print(json.dumps(meta))
    else:
        src, dst = meta["source_bytes"], meta["bytes"]
        types = ", ".join(f"{n} {t}" for t, n in sorted(meta["tensor_types"].items()))
        print(f"exported  {args.model} -> {meta['output']} (GGUF {quant}, llama.cpp arch {meta['architecture']}; "
              f"tensors: {types})")
        print(f"size      {src / 1e6:.1f} MB -> {dst / 1e6:.1f} MB ({src / dst:.2f}x smaller)")
        print(f"probe     in llama.cpp: top-1 agreement with the source {meta['probe']['top1_agreement']:.3f}, relative "
              f"logit error {meta['probe']['relative_logit_error']:.2%}; tokenizer ({meta['pre_tokenizer']}): "
              f"{meta['tokenizer_probe']}{'; chat template inside' if meta['chat_template'] else ''}")
        print(f"run with  llama-cli -m {meta['output']}   (or: softlabels eval --model {meta['output']} ...)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    require_extra("trainer", "torch", "transformers")
    settings = _onpolicy_settings(args) if args.teacher else None  # bad sampling settings: one line, before any work
    from softlabels.trainer.compare import compare, plot, ratios, table

    if args.plot:
        from softlabels.common.plot import pyplot

        pyplot(args.plot)  # a bad file name or a missing matplotlib stops here, before any model runs
    rows = compare(args.labels, args.models, args.names, storage_options=parse_storage_options(args.storage_option),
                   eval_fraction=args.eval_fraction, batch_size=args.batch_size, eval_batches=args.eval_batches,
                   rows=args.prompt_rows, length=args.prompt_length, seconds=args.seconds, threads=args.threads,
                   rounds=args.rounds,
                   trust_remote_code=args.trust_remote_code, teacher=args.teacher, prompts=args.prompts,
                   onpolicy=None if settings is None else settings.record())
    out = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON and nothing else
    print(table(rows), file=out)
    for line in ratios(rows):
        print(line, file=out)
    if args.plot:
        plot(rows, args.plot)
        print(f"chart     {args.plot}", file=out)
    if args.json:
        print(json.dumps(rows))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from softlabels.trainer.plot import plot_metrics

    plot_metrics(args.metrics, args.output)
    print(args.output)
    return 0
