"""`make demo`: label the built-in corpus with the built-in teacher, train the tiny student, show the result.

Runs the two CLIs exactly as a user would (labeler with a local Ray, then the
trainer, which never loads the teacher) and prints one results table.
Re-running resumes: a complete label set is reused, not relabeled.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> dict:
    print("$ python -m " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", *args, "--json"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo: step failed: python -m {' '.join(args)} (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(REPO / "runs" / "demo"), help="where labels and the student go")
    p.add_argument("--sequences", type=int, default=400, help="sequences of 128 tokens to label")
    p.add_argument("--steps", type=int, default=100, help="student training steps")
    args = p.parse_args()
    t0 = time.time()
    labels = f"{args.out}/labels"
    lab = cli("labeler", "run", "--teacher", "smollm2-135m", "--corpus", "pydoc", "--output", labels,
              "--top-k", "64", "--max-length", "128", "--limit", str(args.sequences), "--shard-tokens", "8192")
    tr = cli("trainer", "run", "--labels", labels, "--student", "tiny", "--output", f"{args.out}/student",
             "--steps", str(args.steps), "--batch-size", "8", "--lr", "2e-3", "--warmup-steps", "10",
             "--eval-fraction", "0.1", "--eval-batches", "20")
    b, a = tr["before"], tr["after"]
    rate = f"{lab['tokens_per_s']:,.0f}" if lab["labeled_tokens"] else "(reused)"
    print()
    print("softlabels demo: smollm2-135m -> tiny student, built-in pydoc corpus")
    print(f"  tokens labeled         {lab['tokens']:,} in {lab['sequences']} sequences, {lab['shards']} shards")
    print(f"  labeling tokens/s      {rate}  (CPU, {lab['labeled_tokens']:,} tokens this run)")
    from schemas import open_label_set

    enc = open_label_set(labels).manifest.label_encoding
    budget = f", error <= {enc.max_kl:g} nats/token" if enc.max_kl else ""
    print(f"  label set bytes/token  {lab['bytes_per_token']:.1f}  (top-64 + tail, {enc.name} encoding{budget})")
    print(f"  student                {tr['parameters'] / 1e6:.1f}M parameters, {tr['steps']} steps, {tr['train_tokens']:,} tokens")
    print()
    print(f"  {'held-out':<22}{'before':>10}{'after':>10}")
    print(f"  {'CE on true tokens':<22}{b['ce']:>10.3f}{a['ce']:>10.3f}")
    print(f"  {'KL(teacher||student)':<22}{b['kl']:>10.3f}{a['kl']:>10.3f}")
    print(f"  {'top-1 agreement':<22}{b['top1']:>10.3f}{a['top1']:>10.3f}")
    print(f"\n  total wall time {time.time() - t0:.0f} s; student in {args.out}/student")
    if not (a["ce"] < b["ce"] and a["kl"] < b["kl"]):
        print("demo: the student did not improve", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
