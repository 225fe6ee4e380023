"""Load: peak memory of the labeler on many tiny / a few huge documents, and the trainer's time to first batch.

One process, one run, side by side:

  1. **Many tiny documents.** Corpora of ``--tiny-small`` and ``--tiny``
     one-line documents (``.jsonl``), each labeled in full by ``softlabels label``
     with a small random teacher that uses the built-in teacher's tokenizer
     (49,152 ids). While it runs, the RSS of the driver and of every process
     it started (Ray's and the workers: the process tree) is sampled every
     0.1 s; the peaks are reported. Bounded memory means the 10x corpus does
     not take 10x memory.
  2. **A few huge documents.** ``--long-docs`` documents of ``--long-mb`` MB
     each (one ``.jsonl`` line each): read and tokenized whole, labeled up to
     ``--long-limit`` sequences (a full label of 30 MB of text takes hours on
     a CPU; reading and cutting them is what a huge document strains).
     Peaks as above, against a 1 MB single-document corpus.
  3. **Trainer, time to first batch**, from a label set of ``--shards``
     shards vs one of ~12, on local disk and on a local SeaweedFS S3 server:
     ``LabelDataset`` + ``StatefulLoader`` as ``softlabels train`` builds them,
     timed from construction (manifest read) to the first batch, median of
     ``--repeats``. Also counts the shards fetched before that batch.

Timings and memory are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny-small", type=int, default=10_000, help="documents in the smaller tiny-document corpus")
    p.add_argument("--tiny", type=int, default=100_000, help="documents in the larger tiny-document corpus")
    p.add_argument("--long-docs", type=int, default=3, help="number of huge documents")
    p.add_argument("--long-mb", type=float, default=10.0, help="size of each huge document, MB")
    p.add_argument("--long-limit", type=int, default=256, help="sequences labeled from the huge documents")
    p.add_argument("--shards", type=int, default=1200, help="shards in the large label set for the trainer")
    p.add_argument("--repeats", type=int, default=3, help="time-to-first-batch repeats per configuration")
    p.add_argument("--parts", default="labeler,trainer", help="which parts to run: labeler, trainer or both")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    return p.parse_args(argv)


# -- memory of a process tree ---------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class TreeRSS:
    """Samples the RSS of a process and all its descendants; keeps the driver's and the tree's peaks."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every = pid, every
        self.driver = self.tree = self.largest_other = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            kids = _children()
            todo, tree = [self.pid], []
            while todo:
                p = todo.pop()
                tree.append(p)
                todo.extend(kids.get(p, []))
            sizes = {p: _rss(p) for p in tree}
            self.driver = max(self.driver, sizes.get(self.pid, 0))
            self.tree = max(self.tree, sum(sizes.values()))
            others = [v for p, v in sizes.items() if p != self.pid]
            self.largest_other = max(self.largest_other, max(others, default=0))
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def label(teacher: str, corpus: Path, out: Path, limit: int | None, max_length: int, shard_tokens: int = 65536) -> dict[str, Any]:
    """Run the labeler CLI; returns its JSON summary plus the peaks and wall time."""
    cmd = [sys.executable, "-m", "softlabels", "label", "--teacher", teacher, "--corpus", str(corpus), "--output", str(out),
           "--top-k", "8", "--max-length", str(max_length), "--shard-tokens", str(shard_tokens), "--batch-tokens", "8192",
           "--json"]
    if limit:
        cmd += ["--limit", str(limit)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    rss = TreeRSS(proc.pid)
    out_text, err = proc.communicate()
    rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"labeler failed on {corpus}:\n{err[-3000:]}")
    summary = json.loads(out_text.strip().splitlines()[-1])
    return {**summary, "wall": time.perf_counter() - t0, "driver_rss": rss.driver, "tree_rss": rss.tree,
            "worker_rss": rss.largest_other}


def make_teacher(workdir: Path) -> str:
    """A random tiny Llama with the built-in teacher's real tokenizer (fast to run, realistic tokens)."""
    from softlabels.labeler.builtin import builtin_teacher_dir

    src = builtin_teacher_dir("smollm2-135m")
    path = common.random_llama_dir(workdir / "teacher", "tiny", vocab_size=49152, max_position_embeddings=8192)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, path / f.name)
    return str(path)


def write_jsonl(path: Path, texts: Any) -> int:
    n = 0
    with open(path, "w") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
            n += 1
    return n


def long_text(mb: float, seed: int) -> str:
    import numpy as np
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < mb * 1e6:
        start = int(rng.integers(0, len(words) - 2000))
        chunk = " ".join(words[start : start + 2000])
        out.append(chunk)
        size += len(chunk) + 1
    return " ".join(out)[: int(mb * 1e6)]


# -- trainer: time to first batch ------------------------------------------------
def big_set(src: str, dst: Path, n: int) -> str:
    """A valid label set of ``n`` shards: ``src``'s shards copied under new names (manifest rewritten)."""
    m = json.loads((Path(src) / "manifest.json").read_text())
    shutil.copytree(Path(src) / "tokenizer", dst / "tokenizer")
    (dst / "shards").mkdir(parents=True)
    shards = []
    for i in range(n):
        s = dict(m["shards"][i % len(m["shards"])])
        path = f"shards/part-{i:06d}.parquet"
        shutil.copyfile(Path(src) / s["path"], dst / path)
        shards.append({**s, "path": path})
    m["shards"] = shards
    m["totals"] = {"sequences": sum(s["rows"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards)}
    (dst / "manifest.json").write_text(json.dumps(m))
    return str(dst)


def first_batch(url: str) -> tuple[float, int]:
    """Seconds from opening the set to the first training batch, and shards fetched by then."""
    from softlabels.schemas.reader import LabelSet
    from softlabels.trainer.data import LabelDataset, StatefulLoader

    fetched: list[str] = []
    original = LabelSet.read_shard_bytes

    def counting(self: Any, shard: Any, verify: bool = True) -> bytes:
        fetched.append(shard.path)
        return original(self, shard, verify)

    LabelSet.read_shard_bytes = counting  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        ds = LabelDataset(url, split="train", eval_fraction=0.05, seed=0)
        next(StatefulLoader(ds, batch_size=8, num_workers=0))
        return time.perf_counter() - t0, len(set(fetched))
    finally:
        LabelSet.read_shard_bytes = original  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sl-load-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        teacher = make_teacher(tmp)
        parts = set(args.parts.split(","))
        if "labeler" in parts:
            labeler_part(args, teacher, tmp)
        if "trainer" in parts:
            trainer_part(args, teacher, tmp)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def labeler_part(args: argparse.Namespace, teacher: str, tmp: Path) -> None:
    rows = []
    for n in (args.tiny_small, args.tiny):
        corpus = tmp / f"tiny-{n}.jsonl"
        write_jsonl(corpus, (f"document {i}: a short line of text" for i in range(n)))
        r = label(teacher, corpus, tmp / f"set-tiny-{n}", None, 64)
        assert r["sequences"] == n, (r["sequences"], n)
        rows.append((f"{n:,} tiny documents, all labeled", r))
        print(f"tiny {n}: {r['sequences']} seqs, {r['tokens']} tokens, {r['wall']:.0f}s", flush=True)
    one = tmp / "long-1mb.jsonl"
    write_jsonl(one, [long_text(1.0, 0)])
    r = label(teacher, one, tmp / "set-long-1", args.long_limit, 512)
    rows.append((f"1 document of 1 MB ({args.long_limit} sequences labeled)", r))
    many = tmp / "long-many.jsonl"
    write_jsonl(many, (long_text(args.long_mb, i) for i in range(args.long_docs)))
    r = label(teacher, many, tmp / "set-long-n", args.long_limit, 512)
    rows.append((f"{args.long_docs} documents of {args.long_mb:g} MB ({args.long_limit} sequences labeled)", r))

    mib = 1024**2
    print(f"\n## Load (labeler memory), {common.cpu_name()}; {common.versions()}\n")
    print(common.markdown_table(
        ["corpus", "sequences", "tokens", "wall s", "driver peak RSS MiB", "largest worker MiB", "whole tree MiB"],
        [(name, f"{r['sequences']:,}", f"{r['tokens']:,}", f"{r['wall']:.0f}", f"{r['driver_rss'] / mib:.0f}",
          f"{r['worker_rss'] / mib:.0f}", f"{r['tree_rss'] / mib:.0f}") for name, r in rows]))
    small, large = rows[0][1], rows[1][1]
    print(f"\n{args.tiny // args.tiny_small}x the documents: driver peak RSS x{large['driver_rss'] / small['driver_rss']:.2f}, "
          f"whole tree x{large['tree_rss'] / small['tree_rss']:.2f}")
    print(f"{args.long_docs * args.long_mb:g} MB vs 1 MB of huge documents: driver x{rows[3][1]['driver_rss'] / rows[2][1]['driver_rss']:.2f}, "
          f"largest worker x{rows[3][1]['worker_rss'] / rows[2][1]['worker_rss']:.2f}")


def trainer_part(args: argparse.Namespace, teacher: str, tmp: Path) -> None:
    """Time to first batch: 12 small shards vs ``--shards`` copies of them, local and S3."""
    corpus = tmp / "trainer-corpus.jsonl"
    write_jsonl(corpus, (f"document {i}: a short line of text" for i in range(1000)))
    base = tmp / "set-trainer-base"
    label(teacher, corpus, base, None, 64, shard_tokens=1024)
    small_set = big_set(str(base), tmp / "few-shards", 12)
    large_set = big_set(base, tmp / "many-shards", args.shards)
    results = []
    with common.seaweedfs() as bucket:
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        for name, local in (("12 shards", small_set), (f"{args.shards:,} shards", large_set)):
            remote = common.unique_prefix(bucket, Path(local).name)
            fs.put(local, remote[len("s3://"):], recursive=True)
            for where, url in (("local disk", local), ("S3 (SeaweedFS)", remote)):
                times, fetched = [], 0
                for _ in range(args.repeats):
                    t, fetched = first_batch(url)
                    times.append(t)
                results.append((name, where, statistics.median(times), fetched))
    print(f"\n## Trainer time to first batch (median of {args.repeats})\n")
    print(common.markdown_table(["label set", "storage", "first batch s", "shards fetched by then"],
                                [(n, w, f"{t:.3f}", f) for n, w, t, f in results]))
    for where in ("local disk", "S3 (SeaweedFS)"):
        few, many = [t for n, w, t, _ in results if w == where]
        print(f"{where}: {args.shards // 12}x the shards -> first batch x{many / few:.2f}")


if __name__ == "__main__":
    sys.exit(main())
