"""10B-token label sets: the manifest and the trainer's first batch at 300,000 shards.

A 10B-token label set at the default ``--shard-tokens 32768`` has about 305,000
shards, so its manifest lists 300,000 entries. This builds such a set on local disk
and measures, each in a fresh process:

load         ``softlabels.schemas.open_label_set(url)``: wall time, the process's RSS
             growth (held after the call, and its peak during it) and, in a separate
             process, tracemalloc's peak and held bytes (tracemalloc slows the parse,
             so its run is not timed). Also the time to walk every shard entry once
             (``sum(s.bytes for s in ls.shards)``), so a lazy representation cannot hide
             its cost.
first batch  ``LabelDataset(url, split="train", epochs=None)`` + ``StatefulLoader(ds,
             batch_size=8)`` + ``next(loader)`` from ``softlabels.trainer.data`` (the
             public API only), timed from constructing the dataset; the RSS of the
             process after that batch (what one training rank holds for its data
             before the model: torch's own footprint included, and shown apart).

The set. ``--distinct`` real shards (``--rows`` sequences of ``--length`` tokens,
random top-``--top-k`` labels in the default encoding) are written with the project's
own writer (``encode_samples`` + ``table_to_parquet_bytes``); the ``--shards`` shard
files are hard links to them in turn (shard ``i`` is distinct shard ``i % distinct``),
so every manifest entry names a real file whose size and sha256 match and any shard the
trainer reads verifies and decodes. The manifest is the labeler's: a ``Manifest`` of
schema v4 serialized by ``Manifest.to_json``. The default shape keeps each shard's token
count above 256 so that, like a real set's, they are not Python's cached small ints.
``--dir`` is removed afterwards unless ``--keep``; the bench refuses a non-empty ``--dir``
it did not build.

Before and after. Every measurement runs with this checkout's ``softlabels.schemas``
("after") and with ``schemas/`` as it was at ``--before-rev`` ("before": taken with
``git show`` into a scratch folder and imported in its place; the trainer is this
checkout's in both), alternating, ``--repeats`` times each. ``--before-rev ''`` skips it.
Wall times on a shared 2-core host move with whatever else runs, so CPU seconds (the
process's, all threads) are reported beside them.

Issue targets (issue 21, part 7): first batch within 10 s; manifest memory under 1 GB.
Timings and memory are reported, never asserted.

    python bench/manifest_scale.py [--dir /tmp/sl-manifest-scale] [--shards 300000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

MIB = 2**20
DEFAULT_BEFORE_REV = "4ef1228"  # the last commit before the columnar manifest checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/sl-manifest-scale", help="where the label set is built (local disk)")
    p.add_argument("--shards", type=int, default=300_000, help="shards the manifest lists")
    p.add_argument("--distinct", type=int, default=500, help="distinct real shards written (the rest link to them)")
    p.add_argument("--rows", type=int, default=4, help="sequences per shard")
    p.add_argument("--length", type=int, default=96, help="tokens per sequence")
    p.add_argument("--top-k", type=int, default=64, help="labels per position (the labeler's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the set even if --dir holds one of this shape")
    p.add_argument("--keep", action="store_true", help="keep --dir afterwards (default: removed)")
    p.add_argument("--before-rev", default=DEFAULT_BEFORE_REV, help="git revision of schemas/ for 'before' ('': skip)")
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--child", choices=["load", "tracemalloc", "first-batch"], help=argparse.SUPPRESS)
    p.add_argument("--schemas-from", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the synthetic set -------------------------------------------------------------
def random_shard(seed: int, rows: int, length: int, top_k: int, vocab: int) -> list:
    import numpy as np
    from softlabels.schemas import Sample, sample_id

    rng = np.random.default_rng(seed)
    out = []
    for r in range(rows):
        ids = rng.integers(0, vocab, length).astype(np.int32)
        # k distinct ids per position: one in each of k consecutive windows of 7 ids from a random start
        start = rng.integers(0, vocab, (length, 1))
        top = ((start + 7 * np.arange(top_k) + rng.integers(0, 7, (length, top_k))) % vocab).astype(np.int32)
        p = rng.exponential(1.0, (length, top_k + 1))
        p /= p.sum(1, keepdims=True)
        lp = np.log(-np.sort(-p[:, :top_k], axis=1)).astype(np.float32)  # descending
        tail = np.log(p[:, top_k]).astype(np.float32)
        out.append(Sample(sample_id("sha256:bench", ids), f"doc-{seed}#{r}", ids, top, lp, tail))
    return out


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Write the set under ``args.dir`` (or reuse one of the same shape); returns its description."""
    from softlabels.schemas import (DEFAULT_ENCODING, CorpusInfo, Encoding, Manifest, SequenceConfig, ShardInfo,
                                    TeacherInfo, TokenizerInfo, Totals, encode_samples, table_to_parquet_bytes)
    from softlabels.schemas.fingerprint import sha256_bytes

    root = Path(args.dir)
    shape = {k: getattr(args, k) for k in ("shards", "distinct", "rows", "length", "top_k")}
    stamp = root / "_bench_shape.json"
    if not args.rebuild and stamp.exists() and json.loads(stamp.read_text()) == shape and (root / "manifest.json").exists():
        print(f"reusing the set in {root} ({shape})", file=sys.stderr, flush=True)
        return {**shape, "build_s": None}
    if root.exists() and any(root.iterdir()) and not stamp.exists():
        raise SystemExit(f"--dir {root} holds files this bench did not write: choose an empty or new folder")
    shutil.rmtree(root, ignore_errors=True)
    (root / "shards").mkdir(parents=True)
    (root / "_pool").mkdir()
    stamp.write_text(json.dumps({"building": True}))  # ours from now on, even if this run stops midway
    vocab, enc = 49152, Encoding(DEFAULT_ENCODING)
    t0 = time.perf_counter()
    pool = []
    for j in range(min(args.distinct, args.shards)):
        samples = random_shard(j, args.rows, args.length, args.top_k, vocab)
        data = table_to_parquet_bytes(encode_samples(samples, args.top_k, enc, vocab))
        (root / "_pool" / f"{j:06d}.parquet").write_bytes(data)
        pool.append((len(data), sha256_bytes(data), len(samples), sum(len(s.input_ids) for s in samples)))
    infos = []
    for i in range(args.shards):
        j = i % len(pool)
        path = f"shards/part-{i:06d}.parquet"
        os.link(root / "_pool" / f"{j:06d}.parquet", root / path)
        size, digest, rows, tokens = pool[j]
        infos.append(ShardInfo(path=path, rows=rows, tokens=tokens, bytes=size, sha256=digest, trained=tokens))
        if i % 50_000 == 0:
            print(f"  linked {i:,}/{args.shards:,} shards ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    shards = tuple(infos)
    m = Manifest(
        teacher=TeacherInfo("smollm2-135m", None, "0" * 64, "float32"),
        tokenizer=TokenizerInfo("synthetic (bench/manifest_scale.py)", vocab, "sha256:" + "0" * 64, files=None),
        top_k=args.top_k, temperature=1.0,
        corpus=CorpusInfo("synthetic", "sha256:" + "0" * 64, sum(s.rows for s in shards)),
        sequence=SequenceConfig(max_length=args.length, shard_tokens=args.rows * args.length),
        shards=shards,
        totals=Totals(sum(s.rows for s in shards), sum(s.tokens for s in shards), sum(s.bytes for s in shards),
                      sum(s.tokens for s in shards)),
        labeler_version="bench", created_at="2026-11-29T00:00:00+00:00", encoding=enc.to_dict(),
    )
    (root / "manifest.json").write_text(m.to_json())
    stamp.write_text(json.dumps(shape))
    return {**shape, "build_s": time.perf_counter() - t0}


# -- measurements (each in a fresh process) -------------------------------------------
def schemas_at(rev: str, where: Path) -> Path:
    """``schemas/`` as it was at ``rev``, written under ``where`` (read from git; the checkout is not touched)."""
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "schemas/"], cwd=common.REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    folder = where / f"schemas-{rev}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=common.REPO, check=True, capture_output=True).stdout
        (folder / Path(name).name).write_bytes(src)
    return folder


def use_schemas(folder: str) -> None:
    """Import ``folder`` as ``softlabels.schemas`` (before anything imports the checkout's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("softlabels.schemas", f"{folder}/__init__.py",
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its own modules import each other by this name
    spec.loader.exec_module(module)


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the peak (VmHWM) afresh at the current RSS. (getrusage's peak would include what this
    process's parent held when it was forked: Linux carries it across exec.)"""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child_load(url: str) -> dict[str, Any]:
    from softlabels.schemas import open_label_set

    gc.collect()
    before = rss()
    reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    ls = open_label_set(url)
    load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    held, peak = rss() - before, peak_rss() - before
    t0 = time.perf_counter()
    total = sum(s.bytes for s in ls.shards)
    walk_s = time.perf_counter() - t0
    assert total == ls.manifest.totals.bytes and len(ls.shards) > 0
    return {"load_s": load_s, "load_cpu_s": load_cpu_s, "rss_held": held, "rss_peak": peak, "walk_s": walk_s,
            "shards": len(ls.shards)}


def child_tracemalloc(url: str) -> dict[str, Any]:
    import tracemalloc

    from softlabels.schemas import open_label_set

    gc.collect()
    tracemalloc.start()
    ls = open_label_set(url)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"tm_held": held, "tm_peak": peak, "shards": len(ls.shards)}


def child_first_batch(url: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    from softlabels.schemas.reader import LabelSet
    from softlabels.trainer.data import LabelDataset, StatefulLoader

    import_s = time.perf_counter() - t0
    fetched: list[str] = []
    original = LabelSet.read_shard_bytes

    def counting(self: Any, shard: Any, verify: bool = True) -> bytes:
        fetched.append(shard.path)
        return original(self, shard, verify)

    LabelSet.read_shard_bytes = counting  # type: ignore[method-assign]  # only to count the shards read
    gc.collect()
    before = rss()
    t0, c0 = time.perf_counter(), time.process_time()
    ds = LabelDataset(url, split="train", epochs=None)
    dataset_s = time.perf_counter() - t0
    loader = StatefulLoader(ds, batch_size=8)
    batch = next(loader)
    first_s, first_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    after = rss()
    assert batch["input_ids"].shape[0] == 8, batch["input_ids"].shape
    return {"import_s": import_s, "dataset_s": dataset_s, "first_batch_s": first_s, "first_batch_cpu_s": first_cpu_s,
            "rss_base": before, "rss_after": after, "shards_read": len(set(fetched))}


def run_child(kind: str, url: str, schemas_dir: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--dir", url]
    if schemas_dir is not None:
        cmd += ["--schemas-from", str(schemas_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(url: str, repeats: int, versions: dict[str, Path | None]) -> dict[str, dict[str, Any]]:
    """Per version: median times and the largest memory figures over ``repeats`` fresh processes per
    measurement (tracemalloc: one run, its figures do not vary); versions alternate."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {v: {"load": [], "tracemalloc": [], "first-batch": []}
                                                         for v in versions}
    for r in range(repeats):
        for kind in ("load", "tracemalloc", "first-batch"):
            if kind == "tracemalloc" and r > 0:
                continue
            for v, folder in versions.items():
                runs[v][kind].append(run_child(kind, url, folder))
                print(f"  {v} {kind} run {r + 1}: {runs[v][kind][-1]}", file=sys.stderr, flush=True)
    out: dict[str, dict[str, Any]] = {}
    for v, kinds in runs.items():
        out[v] = {}
        for rs in kinds.values():
            for key in rs[0]:
                values = [x[key] for x in rs]
                out[v][key] = statistics.median(values) if key.endswith("_s") else max(values)
    return out


def manifest_memory(m: dict[str, Any]) -> int:
    """The manifest's memory for the target: the larger of tracemalloc's peak and the RSS peak growth."""
    return max(m["tm_peak"], m["rss_peak"])


def report(shape: dict[str, Any], manifest_bytes: int, ms: dict[str, dict[str, Any]]) -> str:
    def row(name: str, fn: Any) -> tuple:
        return (name, *(fn(m) for m in ms.values()))

    rows = [
        row("load: `open_label_set(url)`, wall (CPU)", lambda m: f"{m['load_s']:.2f} s ({m['load_cpu_s']:.2f} s)"),
        row("load: RSS growth, peak during / held after", lambda m: f"{m['rss_peak'] / MIB:.0f} / {m['rss_held'] / MIB:.0f} MiB"),
        row("load: tracemalloc, peak / held", lambda m: f"{m['tm_peak'] / MIB:.0f} / {m['tm_held'] / MIB:.0f} MiB"),
        row("walk every shard entry once", lambda m: f"{m['walk_s'] * 1e3:.0f} ms"),
        row("trainer: `LabelDataset(...)` built", lambda m: f"{m['dataset_s']:.2f} s"),
        row("trainer: first batch, wall (CPU)", lambda m: f"{m['first_batch_s']:.2f} s ({m['first_batch_cpu_s']:.2f} s)"),
        row("trainer: shards read by the first batch", lambda m: m["shards_read"]),
        row("trainer: RSS after the first batch (after imports alone)",
            lambda m: f"{m['rss_after'] / MIB:.0f} MiB ({m['rss_base'] / MIB:.0f} MiB)"),
        row("target: first batch <= 10 s", lambda m: "met" if m["first_batch_s"] <= 10 else "MISSED"),
        row("target: manifest memory < 1 GB (larger peak)",
            lambda m: f"{manifest_memory(m) / MIB:.0f} MiB: {'met' if manifest_memory(m) < 2**30 else 'MISSED'}"),
    ]
    title = f"manifest.json {manifest_bytes / MIB:.1f} MiB, {shape['shards']:,} shards"
    return common.markdown_table([title, *ms], rows)


def code_state() -> str:
    """The commit measured, and whether the files measured differ from it (work in progress)."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "schemas", "trainer"], cwd=common.REPO,
                           capture_output=True, text=True).stdout.split("\n")
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"checkout at {rev}" + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        if args.schemas_from:
            use_schemas(args.schemas_from)
        fn = {"load": child_load, "tracemalloc": child_tracemalloc, "first-batch": child_first_batch}[args.child]
        print(json.dumps(fn(args.dir)))
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="sl-manifest-scale-"))
    try:
        versions: dict[str, Path | None] = {}
        if args.before_rev:
            versions[f"before ({args.before_rev})"] = schemas_at(args.before_rev, scratch)
        versions["after (this checkout)"] = None
        shape = build(args)
        if shape["build_s"] is not None:
            print(f"built in {shape['build_s']:.0f} s", file=sys.stderr, flush=True)
        manifest_bytes = (Path(args.dir) / "manifest.json").stat().st_size
        shard_bytes = statistics.mean(f.stat().st_size for f in (Path(args.dir) / "_pool").iterdir())
        ms = measure(args.dir, args.repeats, versions)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep and (Path(args.dir) / "_bench_shape.json").exists():
            shutil.rmtree(args.dir, ignore_errors=True)
    print(f"\n## Label set of {args.shards:,} shards on local disk ({args.distinct} distinct real shards of "
          f"{args.rows} x {args.length} tokens, top-{args.top_k}, {shard_bytes / 1024:,.0f} KiB each, hard-linked)\n")
    print(f"{common.cpu_name()}; {code_state()}; median of {args.repeats} fresh processes (memory: the largest)\n")
    print(report(shape, manifest_bytes, ms))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": shape, "manifest_bytes": manifest_bytes, "shard_bytes": shard_bytes, "code": code_state(), **ms}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
