"""``softlabels rounds``: offline on-policy distillation, R rounds of generate -> label -> train.

Round r: the current student (round 1: ``--student``, a directory `softlabels train` saved) writes responses to
the prompts (``label --generate-with STUDENT``), the teacher labels them, and a new student is trained from the
current one (``train --init-from STUDENT``) on that set. Everything lives under ``--output``::

    OUTPUT/round-01/labels     the round's label set (responses by the round's generator)
    OUTPUT/round-01/student    the student it trained (the next round's generator)
    OUTPUT/rounds.json         the per-round table (rewritten after every round)

A kill anywhere resumes where it stopped: the label step resumes its committed units (or finds its set
complete), the train step continues from its latest checkpoint, and a round whose student is saved is skipped.
The label and train steps are exactly ``softlabels label`` and ``softlabels train``; ``--label-config`` and
``--train-config`` set whatever this command has no flag for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from softlabels.schemas.errors import UserError

from softlabels.common.cli import debug_flag, require_extra

log = logging.getLogger(__name__)

DEFAULT_LOSS = "reverse-kl"  # exact over the top-k + tail buckets: no sampling variance (docs/trainer.md)


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("rounds", help="on-policy distillation offline: R rounds of generate (student) -> label (teacher) -> train",
                       description=__doc__.split("\n\n")[0] + " Rerunning the same command resumes.")
    r.add_argument("--output", required=True, help="local directory for every round's label set and student")
    r.add_argument("--corpus", required=True, help="the prompts (any corpus `label --generate-with` reads)")
    r.add_argument("--student", required=True, metavar="DIR", help="the round-1 generator: a student `softlabels train` saved")
    r.add_argument("--teacher", default="smollm2-135m", help="the teacher, as for `label` (default: %(default)s)")
    r.add_argument("--rounds", type=int, default=2, help="rounds to run (default: %(default)s)")
    r.add_argument("--steps", type=int, default=50, help="student steps per round (default: %(default)s)")
    r.add_argument("--batch-size", type=int, default=8, help="student batch size (default: %(default)s)")
    r.add_argument("--lr", type=float, default=5e-4, help="student learning rate (default: %(default)s)")
    r.add_argument("--loss", default=DEFAULT_LOSS, help="the training loss (default: %(default)s; see `train --help`)")
    r.add_argument("--max-length", type=int, default=256, help="tokens per prompt + response (default: %(default)s)")
    r.add_argument("--limit", type=int, default=None, help="at most this many prompts x samples per round")
    r.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per response (default: %(default)s)")
    r.add_argument("--sampling-temperature", type=float, default=1.0, help="the student's sampling temperature (default: %(default)s)")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    r.add_argument("--samples-per-prompt", type=int, default=1, help="responses per prompt each round (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0, help="round r samples with seed + r (default: %(default)s)")
    r.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of each round's rows held out of training (default: %(default)s)")
    r.add_argument("--eval-prompts", type=int, default=16,
                   help="held-out prompts for the on-policy metric after each round (loads the teacher; 0: none) "
                   "(default: %(default)s)")
    r.add_argument("--label-config", default=None, metavar="FILE.yaml", help="more `label` settings (keys as its flags)")
    r.add_argument("--train-config", default=None, metavar="FILE.yaml", help="more `train` settings (keys as its flags)")
    r.add_argument("--json", action="store_true", help="print the rounds table as JSON")
    debug_flag(r)
    r.set_defaults(handler=_rounds)


def _rounds(args: argparse.Namespace) -> int:
    require_extra("labeler", "ray", "torch", "transformers")
    rows = run_rounds(args)
    if args.json:
        print(json.dumps(rows))
    else:
        print(table(rows))
    return 0


def _check(args: argparse.Namespace) -> None:
    for name in ("rounds", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_prompts < 0:
        raise UserError(f"--eval-prompts must be 0 or more, got {args.eval_prompts}")
    if "://" in args.output:
        raise UserError(f"--output {args.output}: rounds keeps its students on a local path (each one is the next "
                        "round's generator); give a local directory")
    student = Path(args.student)
    if not (student / "config.json").is_file():
        raise UserError(f"--student {args.student}: not a model directory (no config.json)")


def run_rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or resume) the rounds; returns the table's rows (round 0: the starting student)."""
    from softlabels.common.settings import resolve_settings
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import run as label
    from softlabels.labeler.raysession import ray_session
    from softlabels.trainer.config import TrainConfig
    from softlabels.trainer.loop import train

    _check(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    # A rounds run keeps its teacher loaded between rounds (labeler.replicas.KEEP_TEACHERS_ENV).
    ours = not os.environ.get("SOFTLABELS_KEEP_TEACHERS")
    os.environ.setdefault("SOFTLABELS_KEEP_TEACHERS", "1")
    label_base = dict(corpus=args.corpus, teacher=args.teacher, max_length=args.max_length, limit=args.limit,
                      max_new_tokens=args.max_new_tokens, sampling_temperature=args.sampling_temperature,
                      top_p=args.top_p, samples_per_prompt=args.samples_per_prompt)
    # checked now, before any round: a bad setting in either file is one line here, not after a round's work
    resolve_settings(LabelConfig, args.label_config, {**label_base, "output": str(out / "check"), "generate_with": "teacher"},
                     required=("output",))
    train_base = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, loss=args.loss,
                      warmup_steps=min(20, args.steps // 10),  # a round is short: its warm-up a tenth of it at most
                      checkpoint_every=max(1, args.steps // 4), resume=True,
                      eval_fraction=args.eval_fraction)
    resolve_settings(TrainConfig, args.train_config, {**train_base, "labels": "x", "output": "x"},
                     required=("labels", "output"))
    rows: list[dict[str, Any]] = []
    # a rerun resumes: the figures of rounds already done (same student saved) are kept, not measured again
    known = {r["round"]: r for r in _read_rows(out / "rounds.json")}
    generator = str(Path(args.student).resolve())
    scorer = _Scorer(args)
    with ray_session(None):
        for r in range(1, args.rounds + 1):
            where = out / f"round-{r:02d}"
            labels, student = where / "labels", where / "student"
            t0 = time.time()
            summary = label(resolve_settings(LabelConfig, args.label_config, {
                **label_base, "output": str(labels), "generate_with": generator, "seed": args.seed + r},
                required=("output",)))
            label_s = time.time() - t0
            done = (student / "softlabels_train.json").is_file()
            t0 = time.time()
            if not done:
                result = train(resolve_settings(TrainConfig, args.train_config, {
                    **train_base, "labels": str(labels), "output": str(student), "init_from": generator},
                    required=("labels", "output")))
                steps = result["steps"]
            else:
                log.info("round %d: its student is saved already (%s)", r, student)
                steps = json.loads((student / "softlabels_train.json").read_text()).get("config", {}).get("steps")
            row = {"round": r, "generator": generator, "responses": summary.sequences,
                   "generated_tokens": summary.trained_tokens, "label_s": round(label_s, 1), "steps": steps,
                   "train_s": round(time.time() - t0, 1) if not done else None, "student": str(student)}
            if args.eval_prompts:  # every round on the same prompts: round 1's held-out rows'
                first = out / "round-01" / "labels"
                if r == 1:
                    before = known.get(0)
                    rows.append(before if before and before.get("student") == generator
                                else {"round": 0, "student": generator, **scorer(generator, first)})
                again = known.get(r)
                if done and again and again.get("student") == row["student"] and "onpolicy_reverse_kl" in again:
                    row.update({k: v for k, v in again.items() if k.startswith("onpolicy_")})
                else:
                    row.update(scorer(str(student), first))
            rows.append(row)
            (out / "rounds.json").write_text(json.dumps(rows, indent=2) + "\n")
            generator = str(student.resolve())
        if ours:  # before Ray shuts down: the kept teacher and generators were this command's alone
            from softlabels.labeler.replicas import release_kept

            release_kept(__import__("ray"))
    return rows


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and "round" in r] if isinstance(rows, list) else []


class _Scorer:
    """The on-policy metric of a student on the held-out prompts of a label set (trainer.onpolicy); the teacher is
    loaded once, on first use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.teacher = args, None

    def __call__(self, model_dir: str, labels: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        from softlabels.common.generate import GenerationSettings
        from softlabels.schemas import open_label_set
        from softlabels.trainer.data import split_samples
        from softlabels.trainer.onpolicy import evaluate_onpolicy, load_teacher

        a = self.args
        if self.teacher is None:
            self.teacher = load_teacher(a.teacher)
        ls = open_label_set(str(labels))
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        held = split_samples(ls, a.eval_fraction)
        settings = GenerationSettings(a.max_new_tokens, a.sampling_temperature, a.top_p, 1, a.seed)
        m = evaluate_onpolicy(model, ls, self.teacher, held, settings, a.eval_prompts)
        return {k: m[k] for k in ("onpolicy_reverse_kl", "onpolicy_teacher_logprob", "onpolicy_tokens", "onpolicy_prompts")}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'round':>5} {'responses':>9} {'generated':>9} {'label s':>8} {'steps':>5} {'train s':>8} {'rev KL':>8} {'teacher lp':>10}"
    lines = [head]
    for r in rows:
        def f(key: str, fmt: str) -> str:
            v = r.get(key)
            return "-" if v is None else format(v, fmt)

        lines.append(f"{r['round']:>5} {f('responses', ','):>9} {f('generated_tokens', ','):>9} {f('label_s', '.1f'):>8} "
                     f"{f('steps', 'd'):>5} {f('train_s', '.1f'):>8} {f('onpolicy_reverse_kl', '.3f'):>8} "
                     f"{f('onpolicy_teacher_logprob', '.3f'):>10}")
    lines.append("rev KL: per-token KL(student || teacher) on held-out prompts, the student's own responses; "
                 "teacher lp: the teacher's mean log-prob of them (higher is better)")
    return "\n".join(lines)

