"""Do students notice the encoding? Train on fp16 vs compact labels (and with tail draws), two seeds each.

The real labeler (``softlabels label``) labels the built-in corpus with the
built-in teacher twice, at the same k and sequence settings (``--limit``
sequences of ``--max-length``):

  fp16     ``--encoding fp16 --tail-samples S`` (fp16 log-probs: the reference)
  compact  ``--encoding compact`` (the default; error within its ``max_kl``)

Then the ``tiny`` student is trained with ``softlabels.trainer.loop.train`` (as
``bench/quality.py`` does: same budget, eval cadence and held-out split) for
each seed in ``--seeds``:

  tail-kl on fp16, tail-kl on compact, and tail-sampled on fp16 (the same
  labels plus the S draws per position from the teacher's tail).

Every final student is scored on the held-out split (the same sequences in
both sets: sample ids are content addresses) by ``softlabels.trainer.evaluate`` (CE on
true tokens, KL over the stored buckets) and against the teacher's full
distribution (teacher in memory). Prints a table with the per-seed values, the
spread between seeds (run-to-run noise) and the differences between label sets.

Issue expectation: compact vs fp16 within run-to-run noise; say whether the
sampled tail helps.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import quality
from trainer_speed import load_teacher, quiet_hf

RUNS = (("tail-kl", "fp16"), ("tail-kl", "compact"), ("tail-sampled", "fp16"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(common.REPO / "runs" / "bench-encodings"),
                   help="label sets go here and are reused when complete (default: %(default)s)")
    p.add_argument("--limit", type=int, default=400, help="sequences labeled (default: %(default)s, as make demo)")
    p.add_argument("--max-length", type=int, default=128, help="default: %(default)s")
    p.add_argument("--top-k", type=int, default=64, help="default: %(default)s")
    p.add_argument("--tail-samples", type=int, default=16, help="S draws per position in the fp16 set (default: %(default)s)")
    p.add_argument("--seeds", default="0,1", help="comma-separated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=80, help="default: %(default)s (as bench/quality.py)")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=2e-3, help="default: %(default)s")
    p.add_argument("--warmup-steps", type=int, default=10, help="default: %(default)s")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="default: %(default)s")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    # what bench/quality.config() reads
    args.eval_every, args.eval_batches, args.head_chunk = args.steps, 0, 1024
    return args


def label(args: argparse.Namespace, name: str, extra: list[str]) -> str:
    """Label (or reuse) one set with the real labeler CLI; returns its path."""
    out = str(Path(args.work) / name)
    cmd = [sys.executable, "-m", "softlabels", "label", "--teacher", "smollm2-135m", "--corpus", "pydoc", "--output", out,
           "--top-k", str(args.top_k), "--max-length", str(args.max_length), "--limit", str(args.limit),
           "--shard-tokens", "8192", "--json", *extra]
    t = time.time()
    proc = subprocess.run(cmd, cwd=common.REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"labeling {name} failed (exit {proc.returncode})")
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"labels {name}: {s['tokens']:,} tokens, {s['bytes_per_token']:.1f} bytes/token ({time.time() - t:.0f} s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_hf()
    logging.basicConfig(level=logging.WARNING)
    sets = {
        "fp16": label(args, "fp16", ["--encoding", "fp16", "--tail-samples", str(args.tail_samples)]),
        "compact": label(args, "compact", ["--encoding", "compact"]),
    }
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="softlabels-enc-") as tmp:
        for seed in args.seed_list:
            for loss, enc in RUNS:
                args.labels, args.seed = sets[enc], seed
                t = time.time()
                r = quality.offline(args, loss, Path(tmp) / f"{loss}-{enc}-{seed}")
                results[(loss, enc, seed)] = r
                ev = r["curve"][-1][1]
                print(f"{loss} on {enc}, seed {seed}: KL {ev['kl']:.4f} CE {ev['ce']:.4f} ({time.time() - t:.0f} s)", flush=True)
        labels = quality.open_labels(sets["fp16"])
        teacher = load_teacher("smollm2-135m", labels.manifest.tokenizer.vocab_size)
        args.labels = sets["fp16"]
        full = quality.full_vocab_eval({"|".join(map(str, key)): r["model_dir"] for key, r in results.items()}, teacher, args)
    report(args, results, full)
    return 0


def report(args: argparse.Namespace, results: dict, full: dict[str, float]) -> None:
    rows, table = [], {}
    for (loss, enc, seed), r in results.items():
        ev = r["curve"][-1][1]
        fk = full["|".join(map(str, (loss, enc, seed)))]
        table[(loss, enc, seed)] = (ev["ce"], ev["kl"], fk)
        rows.append([loss, enc, seed, f"{ev['ce']:.4f}", f"{ev['kl']:.4f}", f"{fk:.4f}", f"{ev['top1']:.3f}"])
    print()
    print(f"device: {common.cpu_name()}; {common.versions()}")
    print(f"tiny student, {args.steps} steps x {args.batch_size} sequences, lr {args.lr}; top-{args.top_k} labels of "
          f"{args.limit} x {args.max_length} tokens; held-out {args.eval_fraction:.0%}")
    print(common.markdown_table(["loss", "labels", "seed", "held-out CE", "held-out KL (buckets)", "full-vocab KL", "top-1"], rows))
    print()
    seeds = args.seed_list
    if len(seeds) >= 2:
        names = ("CE", "KL", "full KL")
        for i, name in enumerate(names):
            noise = max(abs(table[(l, e, seeds[0])][i] - table[(l, e, seeds[1])][i]) for l, e in RUNS)
            d_enc = [table[("tail-kl", "compact", s)][i] - table[("tail-kl", "fp16", s)][i] for s in seeds]
            d_tail = [table[("tail-sampled", "fp16", s)][i] - table[("tail-kl", "fp16", s)][i] for s in seeds]
            print(f"{name:8s} seed-to-seed noise (max over runs) {noise:.4f}; compact - fp16 per seed "
                  f"{', '.join(f'{d:+.4f}' for d in d_enc)}; tail-sampled - tail-kl per seed {', '.join(f'{d:+.4f}' for d in d_tail)}")
        within = all(abs(table[("tail-kl", "compact", s)][1] - table[("tail-kl", "fp16", s)][1]) <=
                     max(abs(table[(l, e, seeds[0])][1] - table[(l, e, seeds[1])][1]) for l, e in RUNS) for s in seeds)
        print(f"compact vs fp16 held-out KL within seed-to-seed noise: {'YES' if within else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [[*k, *v] for k, v in table.items()]}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
