"""Responses written by models: sequence-level KD with soft labels, on-policy rounds, and what generation costs.

The built-in teacher (SmolLM2-135M-Instruct) and the built-in chat corpus's questions (each pydoc-chat
conversation's first user turn), split by a hash of the prompt into training and held-out prompts. Tiny students
(same init seed, steps, batch and learning rate each), trained by ``softlabels.trainer.loop.train``:

  seq-kd     on responses the teacher wrote to the training prompts, with the teacher's soft labels (defaults)
  seq-ce     on the same responses, CE only (plain sequence-level KD: the responses as text)
  corpus-kd  on the corpus's own answers to the same prompts, with soft labels (defaults)

Then, from seq-kd (the same off-policy start):

  off-policy  R x --round-steps more steps on the teacher's responses (the same set), default loss, and again with
              the rounds' loss (``off-policy-rkl``: what the data alone changes)
  on-policy   R rounds of `softlabels rounds`: the current student writes responses to the training prompts, the
              teacher labels them, the student trains --round-steps steps on them (``--loss reverse-kl``)

Every student is scored on the held-out prompts: the on-policy metric (the student writes a response, the teacher
scores each token: per-token KL(student || teacher) over the vocabulary, and the teacher's mean log-prob of the
student's tokens) and, on responses the teacher wrote to the held-out prompts, held-out CE, forward KL to the
teacher and top-1 (``eval`` on that set).

Cost: generation against labeling, the same prompts and responses, one batch plan, in this process: the teacher
writing responses (HF ``generate``, KV cache) and the teacher labeling prompt + response in one forward (the
labeler's second pass), tokens/s each and the second pass's share of the two.

Issue expectations: on-policy wins on the on-policy metric (report it either way, with why).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import common

OUT = common.REPO / "runs" / "bench-generation"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT), help="working folder (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=192, help="training prompts (default: %(default)s)")
    p.add_argument("--held-out", type=int, default=32, help="held-out prompts (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per response at most (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="steps of the first three students (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="on-policy rounds (default: %(default)s)")
    p.add_argument("--round-steps", type=int, default=30, help="student steps per round (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="student init and sampling seed (default: %(default)s)")
    p.add_argument("--cost-prompts", type=int, default=32, help="prompts of the cost measurement (default: %(default)s)")
    return p.parse_args(argv)


def split_prompts(n_train: int, n_held: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Training prompts, held-out prompts and the corpus's own conversations for the training prompts."""
    from pydoc_data.topics import topics

    from softlabels.labeler.builtin_chat import conversations

    train, held, own = [], [], []
    for topic in sorted(topics):
        for convo in conversations(topic, topics[topic]):
            ask = convo[0]["content"]
            if int(hashlib.sha256(f"{topic}:{ask}".encode()).hexdigest()[:8], 16) % 6 == 0:
                if len(held) < n_held:
                    held.append({"messages": convo[:1]})
            elif len(train) < n_train:
                train.append({"messages": convo[:1]})
                own.append({"messages": convo[:2]})
    return train, held, own


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def label(out: Path, corpus: str, **kw: Any) -> Any:
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import run

    base = dict(teacher="smollm2-135m", corpus=corpus, output=str(out), top_k=64, max_length=256,
                shard_tokens=4096)
    t = time.time()
    summary = run(LabelConfig(**{**base, **kw}))
    print(f"  labeled {out.name}: {summary.sequences} rows, {summary.trained_tokens:,} trained positions, "
          f"{summary.generated_tokens:,} generated, {time.time() - t:.0f} s", flush=True)
    return summary


def train(labels: Path, out: Path, a: argparse.Namespace, steps: int, **kw: Any) -> dict:
    from softlabels.trainer.config import TrainConfig
    from softlabels.trainer.loop import train as run_train

    if (out / "softlabels_train.json").exists():
        return json.loads((out / "softlabels_train.json").read_text())
    cfg = TrainConfig(labels=str(labels), output=str(out), steps=steps, batch_size=a.batch_size, lr=a.lr,
                      warmup_steps=min(10, steps // 5), seed=a.seed, eval_fraction=0.1, eval_batches=10, **kw)
    t = time.time()
    summary = run_train(cfg)
    print(f"  trained {out.name}: {steps} steps in {time.time() - t:.0f} s", flush=True)
    return summary


def score(model_dir: Path, held: Path, teacher: Any, a: argparse.Namespace) -> dict:
    """The on-policy metric on the held-out prompts, and CE / KL / top-1 on the teacher's held-out responses."""
    import torch

    from softlabels.common.generate import GenerationSettings
    from softlabels.schemas import open_label_set
    from softlabels.trainer.data import LabelDataset
    from softlabels.trainer.evaluate import evaluate
    from softlabels.trainer.onpolicy import evaluate_onpolicy
    from softlabels.trainer.student import build_student

    ls = open_label_set(str(held))
    ds = LabelDataset(str(held), split="all", shuffle=False)
    model, _ = build_student(str(model_dir), ds.labels, 0)
    model.to(torch.device("cpu"))
    ev = evaluate(model, ds, 8, None, 2048)
    settings = GenerationSettings(a.max_new_tokens, 1.0, 1.0, 1, a.seed)
    on = evaluate_onpolicy(model, ls, teacher, ls.iter_samples(), settings, a.held_out)
    return {"ce": ev["ce"], "kl": ev["kl"], "top1": ev["top1"], "rev_kl": on["onpolicy_reverse_kl"],
            "teacher_lp": on["onpolicy_teacher_logprob"], "stopped": on["onpolicy_stopped"]}


def cost(a: argparse.Namespace, prompts: list[dict]) -> dict:
    """Generation vs the labeling pass over the same prompts + responses, one batch plan, this process."""
    import numpy as np
    import torch

    from softlabels.common.generate import GenerationSettings, row_seed, sample_responses, stop_ids
    from softlabels.labeler.seams import LabelSettings
    from softlabels.labeler.teacher import TeacherRunner, resolve_teacher

    source = resolve_teacher("smollm2-135m")
    runner = TeacherRunner(source, "float32", "cpu", LabelSettings(64, batch_tokens=4096))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.path)
    texts = [tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
             for p in prompts[:a.cost_prompts]]
    ids = [np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.int32) for t in texts]
    settings = GenerationSettings(a.max_new_tokens, 1.0, 1.0, 1, a.seed)
    stops = stop_ids(tok, tok.chat_template)
    keys = [row_seed(a.seed, str(i), 0) for i in range(len(ids))]
    t = time.time()
    responses = sample_responses(runner.model, ids, keys, [a.max_new_tokens] * len(ids), settings, stops, len(tok),
                                 stops[0], 4096)
    gen_s = time.time() - t
    full = [np.concatenate([p, r.ids]).astype(np.int32) for p, r in zip(ids, responses)]
    masks = []
    for p, f in zip(ids, full):
        m = np.zeros(len(f), bool)
        m[len(p) - 1:len(f) - 1] = True
        masks.append(m)
    with torch.inference_mode():
        t = time.time()
        runner.label(full, masks)
        label_s = time.time() - t
    generated = sum(len(r.ids) for r in responses)
    total = sum(len(f) for f in full)
    return {"prompts": len(ids), "generated_tokens": generated, "generation_s": gen_s,
            "generated_tokens_per_s": generated / gen_s, "label_s": label_s, "labeled_tokens": total,
            "labeled_tokens_per_s": total / label_s, "second_pass_share": label_s / (gen_s + label_s)}


def main(argv: list[str] | None = None) -> int:
    import os

    from softlabels.labeler.raysession import ray_session

    os.environ.setdefault("SOFTLABELS_KEEP_TEACHERS", "1")  # one Ray and one loaded teacher for every label run
    with ray_session(None):
        return run(parse_args(argv))


def run(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train_p, held_p, own = split_prompts(a.prompts, a.held_out)
    print(f"prompts: {len(train_p)} training, {len(held_p)} held out; responses up to {a.max_new_tokens} tokens", flush=True)
    t0 = time.time()
    c = cost(a, train_p)
    print(f"cost ({c['prompts']} prompts): generation {c['generated_tokens']:,} tokens in {c['generation_s']:.1f} s "
          f"({c['generated_tokens_per_s']:.1f} tokens/s); labeling pass {c['labeled_tokens']:,} tokens in "
          f"{c['label_s']:.1f} s ({c['labeled_tokens_per_s']:.0f} tokens/s); the second pass is "
          f"{100 * c['second_pass_share']:.1f}% of the two", flush=True)
    gen = dict(generate_with="teacher", max_new_tokens=a.max_new_tokens, seed=a.seed)
    teacher_set, held_set, own_set = out / "teacher-written", out / "held-out", out / "corpus-own"
    label(teacher_set, write_jsonl(out / "train-prompts.jsonl", train_p), **gen)
    label(held_set, write_jsonl(out / "held-prompts.jsonl", held_p), **gen)
    label(own_set, write_jsonl(out / "own.jsonl", own))
    students = {
        "seq-kd": (teacher_set, {}),
        "seq-ce": (teacher_set, {"loss": "ce"}),
        "corpus-kd": (own_set, {}),
    }
    for name, (labels, kw) in students.items():
        train(labels, out / name, a, a.steps, **kw)
    # from the same start: more steps on the teacher's responses, or rounds on the student's own
    train(teacher_set, out / "off-policy", a, a.rounds * a.round_steps, init_from=str(out / "seq-kd"))
    # the same loss as the rounds on the teacher's responses: what the data alone changes
    train(teacher_set, out / "off-policy-rkl", a, a.rounds * a.round_steps, init_from=str(out / "seq-kd"),
          loss="reverse-kl")
    gen_s = label_s = 0.0
    current = out / "seq-kd"
    prompts_file = str(out / "train-prompts.jsonl")
    for r in range(1, a.rounds + 1):
        labels = out / f"round-{r}-labels"
        t = time.time()
        summary = label(labels, prompts_file, generate_with=str(current.resolve()), max_new_tokens=a.max_new_tokens,
                        seed=a.seed + r)
        label_s += time.time() - t
        nxt = out / f"round-{r}-student"
        train(labels, nxt, a, a.round_steps, init_from=str(current), loss="reverse-kl")
        current = nxt
    from softlabels.trainer.onpolicy import load_teacher

    teacher = load_teacher("smollm2-135m")
    rows = {}
    for name in ("seq-kd", "seq-ce", "corpus-kd", "off-policy", "off-policy-rkl", f"round-{a.rounds}-student"):
        rows[name] = score(out / name, held_set, teacher, a)
    print(f"\n{'student':<18}{'rev KL':>8}{'teacher lp':>11}{'stopped':>9}{'CE':>8}{'KL':>8}{'top-1':>7}")
    for name, r in rows.items():
        print(f"{name:<18}{r['rev_kl']:8.3f}{r['teacher_lp']:11.3f}{r['stopped']:9.2f}{r['ce']:8.3f}{r['kl']:8.3f}"
              f"{r['top1']:7.3f}")
    on, off, rkl = rows[f"round-{a.rounds}-student"], rows["off-policy"], rows["off-policy-rkl"]
    print(f"\non-policy vs off-policy, same steps from seq-kd: reverse KL {on['rev_kl']:.3f} vs {off['rev_kl']:.3f} "
          f"({100 * (on['rev_kl'] / off['rev_kl'] - 1):+.1f}%), vs {rkl['rev_kl']:.3f} with the same loss "
          f"({100 * (on['rev_kl'] / rkl['rev_kl'] - 1):+.1f}%); target: on-policy lower")
    seq, ce, own_r = rows["seq-kd"], rows["seq-ce"], rows["corpus-kd"]
    print(f"seq-kd vs seq-ce: reverse KL {seq['rev_kl']:.3f} vs {ce['rev_kl']:.3f}, forward KL {seq['kl']:.3f} vs "
          f"{ce['kl']:.3f}; vs corpus-kd: {own_r['rev_kl']:.3f}, {own_r['kl']:.3f}")
    print(f"total {time.time() - t0:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps({"cost": c, "rows": rows, "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
