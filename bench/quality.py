"""Distillation quality: offline KD from stored top-k + tail labels vs online full-vocabulary KD vs CE.

The built-in teacher's label set of the built-in corpus, the built-in ``tiny``
student, one fixed budget (``--steps`` x ``--batch-size`` sequences), one seed.
Four students, trained one after the other:

  ce       ``softlabels.trainer.loop.train(TrainConfig(loss="ce"))``: true next tokens only;
  topk-kl  ``train(loss="topk-kl")``: KL over the renormalized stored top-k;
  tail-kl  ``train(loss="tail-kl")``: KL over the stored top-k + exact tail bucket;
  online   the teacher in memory, full-vocabulary KL(teacher || student) every
           step (``trainer_speed.OnlineKD``), in a loop written here from the
           trainer's pieces so that everything else is what ``train`` does:
           same ``LabelDataset`` + ``StatefulLoader`` (same batches, same
           order: checked against ``train``'s ``--log-samples`` record), same
           student init, AdamW groups, warmup + cosine schedule, clipping.

Every student is scored by ``softlabels.trainer.evaluate.evaluate`` on the same held-out
split every ``--eval-every`` steps: CE on the true next tokens and KL(teacher
|| student) over the stored top-k + tail buckets (the metric is identical for
all four). At the end the four final students are also scored against the
teacher's full distribution (teacher in memory) on the same split, which the
bucketed KL can only under-state. Prints a markdown table and draws the eval
curves into ``--plot``.

Issue expectation: tail-kl within 2% of online full KD on held-out KL, and
better than ce.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import common
from trainer_speed import OnlineKD, default_labels, load_teacher, make_optimizer, open_labels, quiet_hf, train_step

METHODS = ("ce", "topk-kl", "tail-kl", "online")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default=None,
                   help="label set (default: runs/demo-full/labels if complete, else runs/bench-labels)")
    p.add_argument("--teacher", default="smollm2-135m",
                   help="teacher for online KD and the full-vocabulary check: built-in alias or HF directory "
                        "(default: %(default)s; must be the label set's teacher)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s")
    p.add_argument("--steps", type=int, default=80,
                   help="optimizer steps per student; the default keeps the whole run near 10 min on 2 CPU cores "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s, as make demo)")
    p.add_argument("--warmup-steps", type=int, default=10, help="default: %(default)s")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="held-out share of the label set, by sample_id hash (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=0,
                   help="batches per evaluation; 0: the whole held-out split (default: %(default)s)")
    p.add_argument("--head-chunk", type=int, default=1024, help="positions per LM-head chunk (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--out", default=None, help="keep the four students and their metrics here (default: a temp dir)")
    p.add_argument("--plot", default=str(common.REPO / "docs" / "quality.png"),
                   help="PNG of the eval curves; '' skips (default: docs/quality.png)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHODS]
    if bad or not args.method_list:
        p.error(f"--methods: unknown {bad or args.methods!r}; choose from {', '.join(METHODS)}")
    for name in ("steps", "batch_size", "eval_every", "head_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.eval_fraction < 1:
        p.error(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    args.labels = args.labels or default_labels()
    return args


def config(args: argparse.Namespace, loss: str, out: Path) -> Any:
    """The ``TrainConfig`` every method shares (``loss`` aside)."""
    from softlabels.trainer.loop import TrainConfig

    return TrainConfig(
        labels=args.labels, output=str(out), student="tiny", steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=args.warmup_steps, loss=loss, seed=args.seed, eval_fraction=args.eval_fraction,
        eval_every=args.eval_every, eval_batches=args.eval_batches or None, head_chunk=args.head_chunk,
        log_samples=True,
    )


def offline(args: argparse.Namespace, loss: str, out: Path) -> dict[str, Any]:
    """``softlabels.trainer.loop.train`` as is; eval curve from its metrics.jsonl."""
    from softlabels.trainer.loop import train

    summary = train(config(args, loss, out))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    curve = [(r["step"], r["eval"]) for r in rows if "eval" in r]
    keys = (out / "samples.rank0.txt").read_text().split()
    return {"curve": curve, "train_s": summary["train_s"], "samples": keys, "model_dir": str(out)}


def online(args: argparse.Namespace, teacher: Any, out: Path) -> dict[str, Any]:
    """Online full-vocabulary KD with ``train``'s data, init, optimizer, schedule and eval cadence."""
    from softlabels.trainer.data import LabelDataset, StatefulLoader
    from softlabels.trainer.evaluate import evaluate
    from softlabels.trainer.loop import lr_factor, seed_everything
    from softlabels.trainer.student import build_student

    cfg = config(args, "tail-kl", out)  # the loss field is unused here; the schedule fields are shared
    seed_everything(cfg.seed)
    train_ds = LabelDataset(cfg.labels, None, "train", cfg.eval_fraction, cfg.seed, epochs=None,
                            shuffle_window=cfg.shuffle_window, prefetch=cfg.prefetch)
    eval_ds = LabelDataset(train_ds.labels, split="eval", eval_fraction=cfg.eval_fraction, shuffle=False,
                           split_by_rank=False)
    model, tokenizer = build_student(cfg.student, train_ds.labels, cfg.seed)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    loader = StatefulLoader(train_ds, cfg.batch_size, cfg.num_workers)
    curve = [(0, evaluate(model, eval_ds, cfg.batch_size, cfg.eval_batches, cfg.head_chunk))]
    step_fn = OnlineKD(model, teacher, cfg.head_chunk)
    keys: list[str] = []
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        batch = next(loader)
        keys += [str(int(k)) for k in batch["sample_key"]]
        train_step(step_fn, model, opt, batch, cfg.clip, sched)
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            curve.append((step + 1, evaluate(model, eval_ds, cfg.batch_size, cfg.eval_batches, cfg.head_chunk)))
    train_s = time.time() - t0
    curve.append((cfg.steps, evaluate(model, eval_ds, cfg.batch_size, cfg.eval_batches, cfg.head_chunk)))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return {"curve": curve, "train_s": train_s, "samples": keys, "model_dir": str(out)}


@torch.no_grad()
def full_vocab_eval(model_dirs: dict[str, str], teacher: Any, args: argparse.Namespace) -> dict[str, float]:
    """KL(teacher || student) over the whole vocabulary on the held-out split, teacher in memory.

    One teacher forward per eval batch serves every student.
    """
    from transformers import AutoModelForCausalLM

    from softlabels.trainer.data import LabelDataset, collate

    eval_ds = LabelDataset(args.labels, split="eval", eval_fraction=args.eval_fraction, shuffle=False,
                           split_by_rank=False)
    models = {m: AutoModelForCausalLM.from_pretrained(d).eval() for m, d in model_dirs.items()}
    sums = dict.fromkeys(models, 0.0)
    n = 0
    loader = torch.utils.data.DataLoader(eval_ds, batch_size=args.batch_size, collate_fn=collate)
    for b, batch in enumerate(loader):
        if args.eval_batches and b >= args.eval_batches:
            break
        idx = batch["label_mask"].reshape(-1).nonzero().squeeze(-1)
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])[idx]
        for m, model in models.items():
            s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            q = torch.log_softmax(s.float(), -1).reshape(-1, s.shape[-1])[idx]
            sums[m] += float(torch.nn.functional.kl_div(q, t, log_target=True, reduction="sum"))
        n += idx.numel()
    return {m: v / n for m, v in sums.items()}


def plot(results: dict[str, dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, r in results.items():
        steps = [s for s, _ in r["curve"]]
        axes[0].plot(steps, [e["kl"] for _, e in r["curve"]], marker="o", ms=3, label=m)
        axes[1].plot(steps, [e["ce"] for _, e in r["curve"]], marker="o", ms=3, label=m)
    axes[0].set_title("held-out KL(teacher || student), top-k + tail buckets")
    axes[1].set_title("held-out CE on true next tokens")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("nats per position")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_hf()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    labels = open_labels(args.labels)
    t_all = time.time()
    teacher = None
    if "online" in args.method_list:
        teacher = load_teacher(args.teacher, labels.manifest.tokenizer.vocab_size)
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="softlabels-quality-")
    root = Path(args.out or tmp.name)  # type: ignore[union-attr]
    if args.out and any(root.glob("*/checkpoints")):
        sys.exit(f"{root} holds an earlier run's checkpoints: pass another --out")
    results: dict[str, dict[str, Any]] = {}
    try:
        for m in args.method_list:
            t = time.time()
            results[m] = online(args, teacher, root / m) if m == "online" else offline(args, m, root / m)
            last = results[m]["curve"][-1][1]
            print(f"{m}: held-out KL {last['kl']:.4f}, CE {last['ce']:.4f} ({time.time() - t:.0f} s)", flush=True)
        full = full_vocab_eval({m: r["model_dir"] for m, r in results.items()}, teacher, args) if teacher else {}
    finally:
        if tmp is not None:
            tmp.cleanup()
    report(args, labels, results, full, time.time() - t_all)
    return 0


def report(args: argparse.Namespace, labels: Any, results: dict[str, dict[str, Any]], full: dict[str, float],
           wall: float) -> None:
    m0 = labels.manifest
    first = next(iter(results.values()))
    before, pos = first["curve"][0][1], first["curve"][-1][1]
    same_order = all(r["samples"] == first["samples"] for r in results.values())
    same_init = all(r["curve"][0][1] == before for r in results.values())
    print()
    print(f"device: {common.cpu_name()}; {common.versions()}")
    print(f"label set: {args.labels} (teacher {m0.teacher.id}, corpus {m0.corpus.source}, top-{m0.top_k} + tail)")
    print(f"student tiny, {args.steps} steps x {args.batch_size} sequences (<= {m0.sequence.max_length} tokens), "
          f"lr {args.lr}, warmup {args.warmup_steps} + cosine, seed {args.seed}; held-out split "
          f"{args.eval_fraction:.0%}: {pos['sequences']} sequences, {pos['positions']:,} positions")
    print(f"same batches in the same order for every method: {same_order}; same initial eval (same init): {same_init}")
    print()
    ref = results.get("online")
    rows = []
    for m, r in results.items():
        ev = r["curve"][-1][1]
        rel = f"{(ev['kl'] / ref['curve'][-1][1]['kl'] - 1) * 100:+.1f}%" if ref else "-"
        rows.append([f"`{m}`", f"{ev['ce']:.3f}", f"{ev['kl']:.3f}", rel, f"{ev['top1']:.3f}",
                     f"{full[m]:.3f}" if m in full else "-", f"{r['train_s']:.0f}"])
    print(common.markdown_table(
        ["method", "held-out CE", "held-out KL (top-k+tail)", "KL vs online", "top-1 agreement",
         "full-vocab KL", "train s (incl. evals)"], rows))
    print(f"(before training: CE {before['ce']:.3f}, KL {before['kl']:.3f})")
    print()
    if ref and "tail-kl" in results:
        kl_t, kl_o = results["tail-kl"]["curve"][-1][1]["kl"], ref["curve"][-1][1]["kl"]
        gap = kl_t / kl_o - 1
        print(f"tail-kl vs online full KD, held-out KL: {gap * 100:+.2f}%; expected within 2%: "
              f"{'YES' if abs(gap) <= 0.02 or gap < 0 else 'NO'}")
    if "ce" in results and "tail-kl" in results:
        t, c = results["tail-kl"]["curve"][-1][1], results["ce"]["curve"][-1][1]
        print(f"tail-kl vs ce: held-out KL {t['kl']:.3f} vs {c['kl']:.3f}, CE {t['ce']:.3f} vs {c['ce']:.3f}; "
              f"better than ce on held-out KL: {'YES' if t['kl'] < c['kl'] else 'NO'}")
    print(f"whole benchmark: {wall:.0f} s")
    if args.plot:
        plot(results, args.plot, f"tiny student, {args.steps} steps x {args.batch_size}, teacher {m0.teacher.id}, "
                                  f"top-{m0.top_k} labels; eval on {pos['positions']:,} held-out positions")
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "full_vocab_kl": full, "wall_s": wall,
            "curves": {m: r["curve"] for m, r in results.items()},
            "train_s": {m: r["train_s"] for m, r in results.items()},
            "same_order": same_order, "same_init": same_init}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
