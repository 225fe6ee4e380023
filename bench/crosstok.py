"""One label set, another tokenizer: cross-tokenizer KD from stored labels vs CE-only, in bits per byte.

The built-in teacher (SmolLM2-135M, 49,152 tokens) labels the built-in corpus once, with token spans
(``runs/bench-labels-xtok``, built on first use: 2-3 min on CPU). A second tokenizer is trained here
with the ``tokenizers`` library (``--vocab`` tokens): by default a byte-level BPE on the same pydoc text (other
merges, another size); ``--student-tok sp-chat`` a SentencePiece-style BPE with byte fallback (``▁`` for spaces,
``<0xNN>`` pieces) on the built-in chat corpus's text (prose and questions, no code: other text). Tiny students built for it (``--student-tokenizer``), one fixed budget (the
same teacher sequences, steps and batch each; once per ``--seeds`` seed), are trained by
``softlabels.trainer.loop.train``:

  xtok-uld  KD across tokenizers, the default loss (mapped ids + tail bucket, ULD on the unmapped mass)
  xtok-kl   KD across tokenizers without the ULD term
  ce        the student's own next tokens only (no teacher)

A method may carry its own weights: ``LOSS@A`` trains with ``--alpha A``, ``LOSS+cW`` with the chunk likelihood
term at ``--chunk-weight W`` (a set with target log-probs: labeled by softlabels >= 0.8; ``+cWb`` / ``+cWs`` with
``--chunk-distance binary`` / ``surprisal``), e.g. ``xtok-uld@0.5`` (the default across tokenizers since 0.11),
``xtok-uld@0.5+c1`` (0.8-0.10) or ``xtok-uld@1+c0`` (before), ``same:tail-kl@0.5+c1`` (the default with the
teacher's tokenizer). Without them: ``--alpha`` (1) and no chunk term.

and, for reference, the ``tiny`` student with the teacher's tokenizer (``tail-kl`` and ``ce``). Every
model is scored on the same held-out sequences in bits per byte of their text (comparable across
tokenizers), the teacher model too. With several seeds the table holds means over them, and each KD student
is compared with CE-only of the same seed: at one pass over this set the held-out bits per byte of one method
moves by about 1% from seed to seed, as much as the differences between methods. Also reported: the share of the teacher's labeled positions
aligned with a student position, the teacher's mass on ids that map there, where the rest of it goes
(``CrossTokenizer.mass_report``, with both ``--token-map`` rules), and what the spans cost
(every shard written again without its ``spans`` column by the same writer: the bytes that go).

Issue expectation: cross-tokenizer KD beats CE-only on held-out bits per byte.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

LABELS = "runs/bench-labels-xtok"
LABELS_CMD = [".venv/bin/softlabels", "label", "--teacher", "smollm2-135m", "--corpus", "pydoc", "--output", LABELS,
              "--top-k", "64", "--max-length", "128", "--limit", "400", "--shard-tokens", "8192", "--store-spans"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default=str(common.REPO / LABELS), help="label set with spans (default: %(default)s, "
                   "labeled on first use)")
    p.add_argument("--vocab", type=int, default=8192, help="the student tokenizer's vocabulary (default: %(default)s)")
    p.add_argument("--student-tok", default="bpe-pydoc", choices=sorted(STUDENT_TOKENIZERS),
                   help="the student tokenizer trained here: bpe-pydoc (byte-level BPE on the pydoc topics) or sp-chat "
                   "(SentencePiece-style with byte fallback, on the built-in chat corpus's text) (default: %(default)s)")
    p.add_argument("--steps", type=int, default=240,
                   help="optimizer steps per student: ~5 passes over the train split (default: %(default)s; 30-60 min "
                   "for the six default methods, per seed, on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=8, help="teacher sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=1.0, help="KD weight; 1 - alpha goes to CE (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share (default: %(default)s)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds: every method is trained once per seed, and "
                   "each KD student is compared with CE-only of the same seed (one pass of this set moves held-out "
                   "bits/byte by about 1%% from seed to seed; default: %(default)s)")
    p.add_argument("--token-map", default="first", choices=["first", "exact"], help="default: %(default)s")
    p.add_argument("--methods", default="xtok-uld@0.5,xtok-uld@1+c0,ce,same:tail-kl@0.5+c1,same:tail-kl@1+c0,same:ce",
                   help="comma-separated; same:LOSS trains the teacher-tokenizer student (default: %(default)s)")
    p.add_argument("--no-teacher", action="store_true", help="skip scoring the teacher model")
    return p.parse_args(argv)


def ensure_labels(url: str, chunks: bool = False) -> Any:
    from softlabels.schemas import open_label_set
    from softlabels.schemas.errors import MissingManifestError

    try:
        ls = open_label_set(url)
    except MissingManifestError:
        print(f"labeling {url} (2-3 min on CPU): {' '.join(LABELS_CMD)}", flush=True)
        subprocess.run([*LABELS_CMD[:7], url, *LABELS_CMD[8:]], cwd=common.REPO, check=True)
        ls = open_label_set(url)
    if not ls.manifest.spans:
        sys.exit(f"{url} has no token spans: label it with --store-spans")
    if chunks and not ls.manifest.target_logprobs:
        sys.exit(f"{url} holds no target log-probs (labeled before softlabels 0.8): remove it to label it again, "
                 "or pass --labels with another location")
    return ls


def train_tokenizer(vocab: int, out: Path) -> str:
    """A byte-level BPE on the pydoc topics (every byte in its alphabet, so it reproduces any text)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>").save_pretrained(out)
    return str(out)


def chat_text() -> list[str]:
    """Every turn of the built-in chat corpus (``pydoc-chat``): the topics' prose and short questions, no code."""
    from pydoc_data.topics import topics

    from softlabels.labeler.builtin_chat import conversations

    return [m["content"] for k in sorted(topics) for conv in conversations(k, topics[k]) for m in conv]


def train_sp_tokenizer(vocab: int, out: Path) -> str:
    """A SentencePiece-style BPE with byte fallback (as Llama 2's and Mistral's): ``▁`` for spaces, a piece per
    frequent string of the chat corpus's text, and ``<0x00>``..``<0xFF>`` for any byte no piece covers (code,
    symbols and characters the chat text lacks), trained by ``tokenizers`` (no ``sentencepiece`` needed)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pieces = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")  # pieces start at a "▁"
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(chat_text(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", *pieces], show_progress=False))
    # The byte pieces go in as the trainer's special tokens (so they get ids 3-258, as in SentencePiece); they
    # are ordinary pieces of the vocabulary in a SentencePiece model, not added tokens.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in set(pieces)]
    tok = Tokenizer.from_str(json.dumps(spec))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(out)
    return str(out)


STUDENT_TOKENIZERS = {"bpe-pydoc": train_tokenizer, "sp-chat": train_sp_tokenizer}
TOKENIZER_WORDS = {"bpe-pydoc": "byte-level BPE of {v:,} tokens trained on the pydoc topics",
                   "sp-chat": "SentencePiece-style BPE with byte fallback, {v:,} tokens, trained on the built-in chat "
                              "corpus's text"}


def spans_cost(ls: Any) -> tuple[int, int, int]:
    """``(bytes of the set's shards, bytes without the spans column, tokens)``: each shard re-encoded by the same
    writer from its decoded samples, with and without spans (compact's levels are chosen again: both sides)."""
    import dataclasses

    from softlabels.schemas import encode_samples, table_to_parquet_bytes

    m = ls.manifest
    enc, with_spans, without = m.label_encoding, 0, 0
    for shard in m.shards:
        samples = ls.read_shard(shard)
        vocab = m.tokenizer.id_space or m.tokenizer.vocab_size
        with_spans += len(table_to_parquet_bytes(encode_samples(samples, m.top_k, enc, vocab)))
        plain = [dataclasses.replace(s, spans=None) for s in samples]
        without += len(table_to_parquet_bytes(encode_samples(plain, m.top_k, enc, vocab)))
    return with_spans, without, m.totals.tokens


def parse_method(method: str, alpha: float) -> tuple[bool, str, float, float, str | None]:
    """``[same:]LOSS[@ALPHA][+cWEIGHT[b|s]]`` -> (the teacher's tokenizer?, loss, alpha, chunk weight, chunk distance:
    ``b`` binary, ``s`` surprisal, None the trainer's default)."""
    same, rest = method.startswith("same:"), method.removeprefix("same:")
    rest, _, chunk = rest.partition("+c")
    loss, _, a = rest.partition("@")
    distance = {"b": "binary", "s": "surprisal"}.get(chunk[-1:]) if chunk else None
    if distance:
        chunk = chunk[:-1]
    return same, loss, float(a) if a else alpha, float(chunk) if chunk else 0.0, distance


def run_student(args: argparse.Namespace, method: str, tokenizer: str, out: Path, seed: int) -> dict[str, Any]:
    from softlabels.trainer.loop import TrainConfig, train

    same, loss, alpha, chunk_weight, distance = parse_method(method, args.alpha)
    cfg = TrainConfig(labels=args.labels, output=str(out), student="tiny", student_tokenizer=None if same else tokenizer,
                      steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=10, loss=loss,
                      alpha=alpha, chunk_weight=chunk_weight, chunk_distance=distance, seed=seed, eval_fraction=args.eval_fraction,
                      eval_batches=None, token_map=args.token_map)
    summary = train(cfg)
    return {"after": summary["after"], "params": summary["parameters"], "train_s": summary["train_s"],
            "tokens": summary["train_tokens"]}


def paired_lines(results: dict[str, list[dict[str, Any]]], seeds: list[int]) -> list[str]:
    """Each KD student against CE-only with the same tokenizer and seed: the per-seed differences in held-out bits
    per byte and their mean (what the verdict reads)."""
    lines = []
    for side, base_name in (("", "ce"), ("same:", "same:ce")):
        if base_name not in results:
            continue
        for method, runs in results.items():
            if method == base_name or method.startswith("same:") != bool(side):
                continue
            diffs = [100 * (r["after"]["bpb"] / b["after"]["bpb"] - 1) for r, b in zip(runs, results[base_name])]
            mean = sum(diffs) / len(diffs)
            each = ", ".join(f"seed {s} {d:+.2f}%" for s, d in zip(seeds, diffs))
            lines.append(f"{method} vs {base_name} (same tokenizer, budget and seed): mean {mean:+.2f}% held-out "
                         f"bits/byte ({each}): {'KD beats CE-only' if mean < 0 else 'KD does NOT beat CE-only'}")
    return lines


def score_teacher(args: argparse.Namespace, ls: Any) -> dict[str, Any]:
    import torch

    from softlabels.labeler.builtin import builtin_teacher_dir
    from softlabels.trainer.crosstok import attach
    from softlabels.trainer.data import LabelDataset
    from softlabels.trainer.evaluate import evaluate
    from softlabels.trainer.student import build_student

    model, tok = build_student(str(builtin_teacher_dir("smollm2-135m")), ls)
    ds = LabelDataset(ls, split="eval", eval_fraction=args.eval_fraction, shuffle=False)
    attach([ds], ls, tok, "teacher")
    with torch.inference_mode():
        return evaluate(model, ds, args.batch_size, None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.time()
    ls = ensure_labels(args.labels, any(parse_method(m, args.alpha)[3] > 0 for m in args.methods.split(",")))
    with_spans, without, tokens = spans_cost(ls)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="softlabels-xtok-") as tmp:
        tok_dir = STUDENT_TOKENIZERS[args.student_tok](args.vocab, Path(tmp) / "tokenizer")
        from softlabels.schemas import open_label_set
        from softlabels.trainer.crosstok import CrossTokenizer
        from softlabels.trainer.student import _own_tokenizer, load_label_tokenizer

        t = time.time()
        cross = CrossTokenizer(open_label_set(args.labels), load_label_tokenizer(ls), _own_tokenizer(tok_dir), tok_dir,
                               token_map=args.token_map)
        map_s = time.time() - t
        samples = list(ls.iter_samples())
        mass = {mode: (cross if mode == args.token_map else CrossTokenizer(
            ls, load_label_tokenizer(ls), _own_tokenizer(tok_dir), tok_dir, token_map=mode)).mass_report(samples)
            for mode in ("exact", "first")}
        seeds = [int(x) for x in args.seeds.split(",")]
        for seed in seeds:
            for method in args.methods.split(","):
                t = time.time()
                name = method.replace(":", "-").replace("@", "-a")
                r = run_student(args, method, tok_dir, Path(tmp) / f"{name}-seed{seed}", seed)
                results.setdefault(method, []).append(r)
                a = r["after"]
                print(f"{method} seed {seed}: held-out bits/byte {a['bpb']:.4f}, CE {a['ce']:.4f}/token "
                      f"({time.time() - t:.0f} s)", flush=True)
    teacher = None if args.no_teacher else score_teacher(args, ls)
    m = ls.manifest
    print(f"\n## Cross-tokenizer distillation ({common.cpu_name()}, {common.versions()})\n")
    print(f"label set {args.labels}: teacher {m.teacher.id} ({m.tokenizer.vocab_size:,} tokens), {m.totals.sequences} "
          f"sequences, {tokens:,} tokens, k={m.top_k}, {m.label_encoding.name}; student tokenizer: "
          f"{TOKENIZER_WORDS[args.student_tok].format(v=args.vocab)} ({100 * cross.coverage():.1f}% of the teacher's ordinary "
          f"tokens map to one of its tokens with --token-map {args.token_map}; tokenizers read and id map built in "
          f"{map_s:.2f} s). Budget per student: {args.steps} steps x "
          f"{args.batch_size} teacher sequences, lr {args.lr}, alpha {args.alpha}, seeds {args.seeds} (figures below: means over them); held-out "
          f"{args.eval_fraction:.0%} of the sequences.\n")
    print(f"spans: {with_spans - without:,} bytes of {with_spans:,} ({100 * (with_spans - without) / without:.2f}% "
          f"more), {(with_spans - without) / tokens:.3f} bytes per token (labels and the rest: {without / tokens:.1f})\n")
    print("Where the teacher's probability goes (shares of its whole distribution at every labeled position, top-k "
          "+ tail; `CrossTokenizer.mass_report`):\n")
    kinds = ("exact", "prefix", "tail", "special", "split_utf8", "no_token", "unaligned")
    print(common.markdown_table(["--token-map", *kinds, "next tokens agree"],
                                [[mode, *(f"{100 * r[k]:.2f}%" for k in kinds), f"{100 * r['next_agree']:.1f}%"]
                                 for mode, r in mass.items()]) + "\n")
    print("(next tokens agree: at aligned positions, how often the teacher's actual next token maps to the student's "
          "actual next token)\n")
    rows = []
    for method, runs in results.items():
        a = {k: sum(r["after"][k] for r in runs) / len(runs) for k in ("bpb", "ce", "kl", "top1")}
        first = runs[0]["after"]  # the shares aligned and mapped depend on the data only
        rows.append([method, f"{runs[0]['params'] / 1e6:.1f}M", f"{a['bpb']:.4f}", f"{a['ce']:.4f}",
                     f"{100 * first['aligned']:.1f}%" if "aligned" in first else "all",
                     f"{100 * first['mapped_mass']:.1f}%" if "mapped_mass" in first else "all",
                     f"{a['kl']:.3f}", f"{a['top1']:.3f}"])
    if teacher:
        rows.append(["teacher model", "135M", f"{teacher['bpb']:.4f}", f"{teacher['ce']:.4f}", "all", "all",
                     f"{teacher['kl']:.4f}", f"{teacher['top1']:.3f}"])
    print(common.markdown_table(["student", "params", "held-out bits/byte", "CE/token (own tokens)", "aligned",
                                 "teacher mass mapped", "KL (aligned)", "top-1"], rows))
    for line in paired_lines(results, seeds):
        print("\n" + line)
    print(f"\nwall time {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
