"""Labeler start-up: from the command's start to its first batch labeled, before and after, side by side.

Runs ``softlabels label`` with the built-in teacher (cached) on the built-in corpus,
alternating this checkout ("after") and the release before the start-up work
("before", installed from git at ``--before-rev`` into a scratch folder, without its
dependencies: same Python, same torch, same Ray), ``--repeats`` times each. The clock
starts when the command is started and stops when its first shard file appears
(labeled, encoded and written: a few milliseconds after the first unit is labeled),
the same for both: units and batches are 512 tokens here, so the first unit is the first
batch. "After" also reports its own figure (the summary's ``startup_s``: to the end of the
teacher's first batch). A batch's own compute comes on top of start-up: at the default
``--batch-tokens 4096`` the built-in teacher takes about 5 s per batch on this 2-core CPU.

Issue target: within 10 s on this machine, with the cached teacher.

    python bench/startup.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

DEFAULT_BEFORE_REV = "b2d9b05"  # the last commit before the start-up work
ARGS = ["--teacher", "smollm2-135m", "--corpus", "pydoc", "--limit", "8", "--max-length", "128",
        "--shard-tokens", "512", "--batch-tokens", "512", "--json"]


def install_before(rev: str, where: Path) -> Path:
    """The package as it was at ``rev``, installed (no dependencies) under ``where``; returns the site folder."""
    src, site = where / "src", where / "site"
    subprocess.run(["git", "worktree", "add", "--detach", str(src), rev], cwd=common.REPO, check=True,
                   capture_output=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(src)], check=True, capture_output=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=common.REPO, capture_output=True)
    return site


def one_run(out: Path, env: dict[str, str]) -> tuple[float, dict]:
    """Seconds from starting the command to its first shard on disk, and its summary."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "softlabels", "label", *ARGS, "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())
    first = None
    shards = out / "shards"
    while proc.poll() is None:
        if first is None and shards.is_dir() and any(p.name.endswith(".parquet") for p in shards.iterdir()):
            first = time.time() - t0
        time.sleep(0.01)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"softlabels label failed ({proc.returncode}):\n{stderr[-3000:]}")
    return first if first is not None else float("nan"), json.loads(stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--before-rev", default=DEFAULT_BEFORE_REV)
    args = p.parse_args()
    from softlabels.labeler.builtin import builtin_teacher_dir

    builtin_teacher_dir("smollm2-135m")  # cached before any clock starts
    work = Path(tempfile.mkdtemp(prefix="softlabels-startup-"))
    try:
        before_site = install_before(args.before_rev, work / "before")
        base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        variants = {"before": {**base, "PYTHONPATH": str(before_site)}, "after": base}
        times: dict[str, list[float]] = {k: [] for k in variants}
        reported: list[float] = []
        for r in range(args.repeats):
            for name, env in variants.items():
                first, summary = one_run(work / f"{name}-{r}", env)
                times[name].append(first)
                if name == "after":
                    reported.append(summary["startup_s"])
                print(f"  {name} #{r + 1}: first shard after {first:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, a = common.median(times["before"]), common.median(times["after"])
    print(f"\nlabeler start-up, built-in teacher (cached), {common.cpu_name()}, {args.repeats} runs each, alternating\n")
    print(common.markdown_table(
        ["", "command start -> first shard written (median)", "runs"],
        [("before", f"{b:.1f} s", ", ".join(f"{t:.1f}" for t in times["before"])),
         ("after", f"{a:.1f} s", ", ".join(f"{t:.1f}" for t in times["after"]))]))
    print(f"\nafter's own summary, start-up to the first batch labeled: {', '.join(f'{t:.1f} s' for t in reported)}")
    print(f"speed-up {b / a:.2f}x; target <= 10 s: {common.verdict(10 / a, 1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
