"""Loader headroom: how fast the trainer's data path reads a label set from S3 vs how fast a student eats it.

One process, one run:

  1. start a local SeaweedFS S3 server (``common.seaweedfs``) and upload the
     label set into its bucket (``fs.put_file`` per file);
  2. read the train split from ``s3://`` with ``softlabels.trainer.data.LabelDataset`` +
     ``StatefulLoader`` (its ``collate``), exactly as ``softlabels.trainer.loop.train``
     builds them, for ``--epochs`` passes, in each loader configuration
     (the trainer's defaults; ``prefetch=0``; ``num_workers=2`` forked, as
     ``softlabels train --num-workers 2`` does; ``num_workers=2`` from a
     forkserver; ``ranks4``/``ranks8``: the elastic order's shares of 4 or 8
     DDP ranks, taken in turn by one process), configurations interleaved over
     ``--repeats`` rounds. Each pass fetches every shard from S3 again, checks
     its sha256, decodes and collates; shard fetches per shard per pass are
     counted (a share's ends share a window with its neighbour's);
  3. time ``tail-kl`` training steps of the built-in ``tiny`` student on
     batches already in memory (forward, backward, clip, AdamW: the
     consumption rate), and ``--live-steps`` steps fed straight from the S3
     loader (per in-process configuration: how long steps wait for batches).

Reports samples/s and tokens/s of each loader configuration, the student's
tokens/s, and the headroom (loader tokens/s / student tokens/s; issue target
>= 10x). Loader rates are measured with the loader alone on the machine; in
training the prefetch thread shares the cores with the student, which is what
the live table shows. A configuration that fails is reported as failing.
Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import common
from trainer_speed import build_mode, default_labels, fixed_batches, open_labels, quiet_hf, train_step

# Name -> LabelDataset prefetch, DataLoader num_workers and worker start method. "default" and
# "workers2" are what ``softlabels train`` does with --num-workers 0 / 2 (fork, Linux's default).
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"prefetch": 2, "num_workers": 0, "mp": None},
    "prefetch0": {"prefetch": 0, "num_workers": 0, "mp": None},
    "workers2": {"prefetch": 2, "num_workers": 2, "mp": None},
    "workers2-forkserver": {"prefetch": 2, "num_workers": 2, "mp": "forkserver"},
    "workers2-prefetch0-forkserver": {"prefetch": 0, "num_workers": 2, "mp": "forkserver"},
    # The elastic order's shares: 4 and 8 ranks' readers, taken in turn by one process (as DDP ranks
    # would each read theirs), every rank a contiguous share of the epoch's order.
    "ranks4": {"prefetch": 2, "num_workers": 0, "mp": None, "ranks": 4},
    "ranks8": {"prefetch": 2, "num_workers": 0, "mp": None, "ranks": 8},
}


def describe(name: str) -> str:
    c = CONFIGS[name]
    mp = f", {c['mp']}" if c["mp"] else (", fork" if c["num_workers"] else "")
    ranks = f", {c['ranks']} ranks in turn" if c.get("ranks") else ""
    return f"{name} (prefetch {c['prefetch']}, workers {c['num_workers']}{mp}{ranks})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default=None,
                   help="local label set to upload (default: runs/demo-full/labels if complete, else runs/bench-labels)")
    p.add_argument("--port", type=int, default=8533,
                   help="S3 port of the benchmark's SeaweedFS; the other ports shift with it "
                        "(default: %(default)s, clear of the tests' and labeler benchmarks' servers)")
    p.add_argument("--configs", default="default,prefetch0,workers2,workers2-forkserver,ranks4,ranks8",
                   help="comma-separated loader configurations: " + "; ".join(describe(k) for k in CONFIGS)
                        + " (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3,
                   help="passes over the train split per measurement (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds, configurations interleaved (default: %(default)s)")
    p.add_argument("--train-steps", type=int, default=4,
                   help="timed tail-kl steps on in-memory batches, after one warm-up (default: %(default)s)")
    p.add_argument("--live-steps", type=int, default=20,
                   help="tail-kl steps fed from the S3 loader, per in-process (workers 0) configuration; enough "
                        "to cross a shuffle-window boundary; 0 skips (default: %(default)s)")
    p.add_argument("--head-chunk", type=int, default=1024, help="positions per LM-head chunk (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.config_list if c not in CONFIGS]
    if bad or not args.config_list:
        p.error(f"--configs: unknown {bad or args.configs!r}; choose from {', '.join(CONFIGS)}")
    for name in ("batch_size", "epochs", "repeats", "train_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.live_steps < 0:
        p.error("--live-steps must be >= 0")
    args.labels = args.labels or default_labels()
    return args


def upload(local: str, url: str) -> tuple[int, float]:
    """Copy a local label set to ``url`` file by file; returns ``(bytes, seconds)``."""
    from softlabels.schemas import resolve_url

    fs, root = resolve_url(url)
    t0 = time.perf_counter()
    total = 0
    src = Path(local)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        fs.put_file(str(f), f"{root}/{f.relative_to(src).as_posix()}")
        total += f.stat().st_size
    return total, time.perf_counter() - t0


def read_all(url: str, cfg: dict[str, Any], epochs: int, batch_size: int) -> dict[str, Any]:
    """One measurement: iterate the train split ``epochs`` times; seconds, samples, tokens, first-batch latency.

    A loader that fails with ``RuntimeError`` (e.g. fsspec's "not fork-safe" in
    a forked worker) is reported as ``{"error": ...}`` rather than stopping
    the other measurements.
    """
    from softlabels.trainer.data import LabelDataset, StatefulLoader

    t0 = time.perf_counter()
    ranks = cfg.get("ranks", 1)
    reads = [0]

    def counted(ds: LabelDataset) -> LabelDataset:  # shard fetches, to show what the shares cost in reads
        if cfg["num_workers"]:  # (in-process readers only: worker processes keep their own counts)
            return ds
        read = ds._read

        def _read(index: int) -> Any:
            reads[0] += 1
            return read(index)

        ds._read = _read  # type: ignore[method-assign]
        return ds

    kw = {"multiprocessing_context": cfg["mp"]} if cfg["mp"] else {}
    loaders = [iter(StatefulLoader(counted(LabelDataset(url, split="train", epochs=epochs, prefetch=cfg["prefetch"],
                                                        rank_world=(r, ranks))), batch_size, cfg["num_workers"], **kw))
               for r in range(ranks)]
    samples = tokens = 0
    first = None
    try:
        while loaders:
            for it in list(loaders):  # the ranks in turn, as their steps would take batches
                try:
                    batch = next(it)
                except StopIteration:
                    loaders.remove(it)
                    continue
                if first is None:
                    first = time.perf_counter() - t0
                samples += batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum())
    except RuntimeError as e:
        return {"error": str(e).strip().splitlines()[-1]}
    return {"seconds": time.perf_counter() - t0, "samples": samples, "tokens": tokens, "first_batch_s": first or 0.0,
            "shard_reads": reads[0] if not cfg["num_workers"] else None}


def student_rate(labels: Any, args: argparse.Namespace) -> dict[str, float]:
    """tokens/s of tail-kl steps of the tiny student on in-memory batches (the consumption rate)."""
    batches = fixed_batches(labels, min(args.train_steps, 4), args.batch_size)
    fn, model, opt = build_mode("tail-kl", labels, None, args.head_chunk)
    train_step(fn, model, opt, batches[0])  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for i in range(args.train_steps):
        b = batches[i % len(batches)]
        train_step(fn, model, opt, b)
        tokens += int(b["attention_mask"].sum())
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / args.train_steps}


def live_steps(url: str, labels: Any, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """tail-kl steps fed from the S3 loader: seconds each step waits for its batch vs seconds stepping."""
    from softlabels.trainer.data import LabelDataset, StatefulLoader

    fn, model, opt = build_mode("tail-kl", labels, None, args.head_chunk)
    loader = StatefulLoader(LabelDataset(url, split="train", epochs=None, prefetch=cfg["prefetch"]), args.batch_size,
                            cfg["num_workers"])
    wait, step = [], []
    for _ in range(args.live_steps + 1):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        train_step(fn, model, opt, batch)
        wait.append(t1 - t0)
        step.append(time.perf_counter() - t1)
    # The first batch waits for the first window of shards: reported on its own.
    return {"first_wait_s": wait[0], "wait_s": sum(wait[1:]), "max_wait_s": max(wait[1:]),
            "step_s": sum(step[1:]), "steps": args.live_steps}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_hf()
    labels_local = open_labels(args.labels)
    res: dict[str, Any] = {"configs": {c: [] for c in args.config_list}}
    with common.seaweedfs(port=args.port) as bucket:
        url = common.unique_prefix(bucket, "loader")
        nbytes, up_s = upload(args.labels, url)
        print(f"uploaded {nbytes / 2**20:.1f} MiB to {url} in {up_s:.1f} s", flush=True)
        read_all(url, CONFIGS["default"], 1, args.batch_size)  # warm-up: imports, connections, server caches
        for r in range(args.repeats):
            k = r % len(args.config_list)
            for c in args.config_list[k:] + args.config_list[:k]:
                m = read_all(url, CONFIGS[c], args.epochs, args.batch_size)
                res["configs"][c].append(m)
                if "error" in m:
                    print(f"round {r + 1}/{args.repeats} {c}: FAILED: {m['error']}", flush=True)
                else:
                    print(f"round {r + 1}/{args.repeats} {c}: {m['tokens'] / m['seconds']:,.0f} tokens/s "
                          f"({m['seconds']:.2f} s)", flush=True)
        labels_s3 = open_labels(url)
        res["student"] = student_rate(labels_s3, args)
        print(f"student tail-kl: {res['student']['tokens_per_s']:,.0f} tokens/s", flush=True)
        res["live"] = {}
        if args.live_steps:
            for c in [c for c in args.config_list if CONFIGS[c]["num_workers"] == 0 and not CONFIGS[c].get("ranks")]:
                res["live"][c] = lv = live_steps(url, labels_s3, CONFIGS[c], args)
                print(f"live {c}: waited {lv['wait_s']:.2f} s in {args.live_steps} steps", flush=True)
    report(args, labels_local, res, nbytes)
    return 0


def report(args: argparse.Namespace, labels: Any, res: dict[str, Any], nbytes: int) -> None:
    m = labels.manifest
    student = res["student"]["tokens_per_s"]
    print()
    print(f"device: {common.cpu_name()}; {common.versions()}")
    print(f"label set: {args.labels} -> local SeaweedFS S3 ({len(m.shards)} shards, {nbytes / 2**20:.1f} MiB, "
          f"{m.totals.tokens:,} tokens, top-{m.top_k} + tail); train split, batch {args.batch_size}, "
          f"{args.epochs} passes per measurement, median of {args.repeats} interleaved rounds")
    print()
    rows = []
    summary = {}
    failed = {}
    for c in args.config_list:
        runs = [r for r in res["configs"][c] if "error" not in r]
        if not runs:
            failed[c] = res["configs"][c][0]["error"]
            rows.append([describe(c), "fails", "fails", "-", "-", "-", "-"])
            continue
        sec = common.median([r["seconds"] for r in runs])
        samples, tokens = runs[0]["samples"], runs[0]["tokens"]
        tps = tokens / sec
        summary[c] = tps
        first = common.median([r["first_batch_s"] for r in runs])
        base = summary.get(args.config_list[0])
        spread = f"{min(r['seconds'] for r in runs):.2f}-{max(r['seconds'] for r in runs):.2f}"
        reads = runs[0].get("shard_reads")
        amp = f"{reads / (len(m.shards) * args.epochs):.2f}" if reads is not None else "-"
        ranks = CONFIGS[c].get("ranks", 1)  # N ranks' readers feed N students: the headroom of each
        rows.append([describe(c), f"{samples / sec:,.0f}", f"{tps:,.0f}", spread, f"{first:.2f}",
                     f"{tps / base:.2f}x" if base else "-", f"{tps / (ranks * student):.1f}x", amp])
    print(common.markdown_table(
        ["loader (S3)", "samples/s", "tokens/s", "run s (min-max)", "first batch s", f"vs {args.config_list[0]}",
         "headroom per student", "shard reads / shard"], rows))
    print("(ranksN: the N ranks' readers share this one process and its cores; their rate is divided by N students, "
          "and a share's two ends read a window its neighbour reads too)")
    for c, err in failed.items():
        print(f"{c}: every run failed: {err}")
    print()
    print(f"student consumption (tiny, tail-kl, batch {args.batch_size}, in-memory batches): "
          f"{student:,.0f} tokens/s ({res['student']['step_s']:.2f} s/step)")
    if res["live"]:
        print()
        print(f"training fed live from S3 (tiny, tail-kl), {args.live_steps} steps after the first batch:")
        print()
        rows = [[describe(c), f"{lv['first_wait_s']:.2f}", f"{lv['wait_s']:.3f}", f"{lv['max_wait_s'] * 1e3:.0f}",
                 f"{lv['step_s']:.1f}", f"{lv['wait_s'] / (lv['wait_s'] + lv['step_s']):.2%}"]
                for c, lv in res["live"].items()]
        print(common.markdown_table(
            ["loader", "first batch s", "total wait s", "longest wait ms", "total step s", "share of time waiting"],
            rows))
    if "default" in summary:
        print()
        head = summary["default"] / student
        print(f"headroom (default loader tokens/s / student tokens/s) = {head:.1f}x; target >= 10x: "
              f"{common.verdict(head, 10.0)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **res, "tokens_per_s": summary}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
