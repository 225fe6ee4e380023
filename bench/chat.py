"""Chat distillation: assistant-only vs all-position labels, and which students learn the assistant best.

Part 1, labels: the built-in teacher labels the same conversations of the built-in chat corpus
(``pydoc-chat``) twice in one run, alternating, with ``--train-on assistant`` (labels only where
the assistant speaks: the teacher's head runs only there) and ``--train-on all``; reported side by
side: label-set bytes per corpus token and labeler tokens/s (corpus tokens over labeling time),
and the prompt share (positions not trained). Expectation: both improve by about the prompt share.

Part 2, students, at the same budget (steps, batch, lr, seed), scored on held-out assistant
tokens of the assistant-only set (``softlabels eval``: KL to the teacher, top-1 agreement, CE):

- KD (``tail-kl``) vs SFT (``ce``), both from scratch on the chat labels;
- two-stage: a student distilled on general text first (``pydoc``, ``--general-steps``: the general
  stage is the larger one, done once and reused), then ``--init-from`` it on the chat labels at the
  same budget as the others, vs task-only (the KD student above).

Targets: KD beats SFT on KL and top-1; the two-stage student beats task-only.

    python bench/chat.py [--conversations 120] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
from softlabels.schemas import open_label_set


def cli(*args: str) -> dict:
    flag = [] if args[0] == "eval" else ["--json"]  # eval prints JSON anyway
    proc = subprocess.run([sys.executable, "-m", "softlabels", *args, *flag], cwd=common.REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: softlabels {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=120, help="conversations labeled (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="training steps of each student on the chat labels (default: %(default)s)")
    p.add_argument("--general-steps", type=int, default=180,
                   help="steps of the general-text stage of the two-stage student (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="labeling runs per mode, alternating (default: %(default)s)")
    p.add_argument("--out", default=str(common.REPO / "runs" / "bench-chat"))
    p.add_argument("--students-only", action="store_true", help="part 2 only, on the label sets of an earlier run")
    p.add_argument("--labels-only", action="store_true", help="part 1 only")
    args = p.parse_args()
    out = Path(args.out)
    if not args.students_only:
        shutil.rmtree(out, ignore_errors=True)
        labels(args, out)
    if not args.labels_only:
        students(args, out)
    return 0


def completion_corpus(path: Path, rows: int) -> Path:
    """Prompt-completion rows with diverse prompts: a pydoc paragraph, and the one after it as the completion."""
    from pydoc_data.topics import topics

    from softlabels.labeler.builtin_chat import _paragraphs

    out = []
    for topic in sorted(topics):
        paras = _paragraphs(topics[topic])
        out += [{"prompt": paras[i], "completion": paras[i + 1]} for i in range(0, len(paras) - 1, 2)]
    path.write_text("\n".join(json.dumps(r) for r in out[:rows]) + "\n")
    return path


def compare_modes(label: list[str], modes: tuple[str, str], out: Path, name: str, repeats: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode in modes:
            runs[mode].append(cli("label", *label, "--train-on", mode, "--output", str(out / f"{name}-{mode}-{r}")))
    return runs


def labels(args: argparse.Namespace, out: Path) -> None:
    label = ["--teacher", "smollm2-135m", "--corpus", "pydoc-chat", "--max-length", "512", "--limit",
             str(args.conversations), "--shard-tokens", "8192"]
    runs = compare_modes(label, ("assistant", "all"), out, "labels", args.repeats)
    print(f"\nchat labeling, built-in teacher on {args.conversations} pydoc-chat conversations "
          f"({common.cpu_name()}, {common.versions()})\n")
    rows = []
    for mode, rs in runs.items():
        s = rs[-1]
        rows.append([mode, f"{s['tokens']:,}", f"{s['trained_tokens']:,}", f"{s['bytes'] / s['tokens']:.1f}",
                     f"{common.median([x['tokens'] / x['label_s'] for x in rs]):,.0f}"])
    print(common.markdown_table(["--train-on", "corpus tokens", "positions labeled", "bytes / corpus token",
                                 "corpus tokens / s"], rows))
    a, b = runs["assistant"][-1], runs["all"][-1]
    share = 1 - a["trained_tokens"] / a["tokens"]
    speed = common.median([x["tokens"] / x["label_s"] for x in runs["assistant"]]) / common.median(
        [x["tokens"] / x["label_s"] for x in runs["all"]])
    print(f"\nprompt share {share:.1%}: bytes {b['bytes'] / a['bytes']:.2f}x fewer, labeling {speed:.2f}x faster "
          f"(the prompt share alone would give {1 / (1 - share):.2f}x)")
    # The same two sets in fp16 (a fixed 6 x k + 4 bytes per labeled position before zstd): what the
    # prompt share saves when prompt positions cost as much to store as assistant ones.
    fp16 = {}
    for mode in ("assistant", "all"):
        cli("convert", str(out / f"labels-{mode}-0"), "--output", str(out / f"fp16-{mode}"), "--encoding", "fp16")
        fp16[mode] = open_label_set(str(out / f"fp16-{mode}")).manifest.totals.bytes
    per_position = {mode: runs[mode][-1]["bytes"] / runs[mode][-1]["trained_tokens"] for mode in runs}
    print(f"compact bytes per labeled position: assistant-only {per_position['assistant']:.1f}, all "
          f"{per_position['all']:.1f} (template and prompt positions are cheap: peaked, repeated)")
    print(f"in fp16: {fp16['assistant'] / a['tokens']:.1f} vs {fp16['all'] / a['tokens']:.1f} bytes per corpus token, "
          f"{fp16['all'] / fp16['assistant']:.2f}x fewer")

    # Diverse prompts: a paragraph as the prompt, the next one as the completion.
    out.mkdir(parents=True, exist_ok=True)
    corpus = completion_corpus(out / "completions.jsonl", args.conversations)
    pc = compare_modes(["--teacher", "smollm2-135m", "--corpus", str(corpus), "--format", "prompt-completion",
                        "--max-length", "512", "--shard-tokens", "8192"], ("completion", "all"), out, "labels-pc",
                       args.repeats)
    c, d = pc["completion"][-1], pc["all"][-1]
    share = 1 - c["trained_tokens"] / c["tokens"]
    speed = common.median([x["tokens"] / x["label_s"] for x in pc["completion"]]) / common.median(
        [x["tokens"] / x["label_s"] for x in pc["all"]])
    print(f"\nprompt-completion rows (a pydoc paragraph, then the next), {c['sequences']} rows:\n")
    print(common.markdown_table(["--train-on", "corpus tokens", "positions labeled", "bytes / corpus token",
                                 "corpus tokens / s"],
                                [[m, f"{x[-1]['tokens']:,}", f"{x[-1]['trained_tokens']:,}",
                                  f"{x[-1]['bytes'] / x[-1]['tokens']:.1f}",
                                  f"{common.median([y['tokens'] / y['label_s'] for y in x]):,.0f}"] for m, x in pc.items()]))
    print(f"\nprompt share {share:.1%}: bytes {d['bytes'] / c['bytes']:.2f}x fewer, labeling {speed:.2f}x faster "
          f"(the prompt share alone would give {1 / (1 - share):.2f}x)")


def students(args: argparse.Namespace, out: Path) -> None:
    chat = str(out / "labels-assistant-0")
    budget = ["--steps", str(args.steps), "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "5",
              "--eval-fraction", "0.15", "--seed", "0"]
    general = str(out / "labels-general")
    if not Path(general, "manifest.json").exists():
        cli("label", "--teacher", "smollm2-135m", "--corpus", "pydoc", "--max-length", "128", "--limit",
            str(args.conversations * 2), "--shard-tokens", "8192", "--output", general)
    t = time.time()
    general_budget = [*budget]
    general_budget[1] = str(args.general_steps)
    cli("train", "--labels", general, "--student", "tiny", "--output", str(out / "general"), *general_budget)
    students = {
        "KD (tail-kl), task only": ("kd", ["--student", "tiny"]),
        "SFT (ce), task only": ("sft", ["--student", "tiny", "--loss", "ce"]),
        "KD, general then task": ("kd-two-stage", ["--init-from", str(out / "general")]),
    }
    scores = {}
    for name, (folder, how) in students.items():
        d = str(out / folder)
        cli("train", "--labels", chat, "--output", d, *how, *budget)
        scores[name] = cli("eval", "--labels", chat, "--model", d, "--eval-fraction", "0.15")
    print(f"\nstudents on held-out assistant tokens, {args.steps} steps on the chat labels (the two-stage student "
          f"after {args.general_steps} on general text), batch 8 "
          f"(training took {time.time() - t:.0f} s)\n")
    print(common.markdown_table(["student", "KL (nats)", "top-1", "CE (nats)", "positions"],
                                [[n, f"{s['kl']:.3f}", f"{s['top1']:.3f}", f"{s['ce']:.3f}", s["positions"]]
                                 for n, s in scores.items()]))
    kd, sft, two = (scores[n] for n in students)
    print(f"\nKD vs SFT: KL {kd['kl']:.3f} vs {sft['kl']:.3f}, top-1 {kd['top1']:.3f} vs {sft['top1']:.3f} "
          f"[{'met' if kd['kl'] < sft['kl'] and kd['top1'] > sft['top1'] else 'MISSED'}]")
    print(f"two-stage vs task-only: KL {two['kl']:.3f} vs {kd['kl']:.3f}, top-1 {two['top1']:.3f} vs {kd['top1']:.3f} "
          f"[{'met' if two['kl'] < kd['kl'] and two['top1'] > kd['top1'] else 'MISSED'}]")


if __name__ == "__main__":
    sys.exit(main())
