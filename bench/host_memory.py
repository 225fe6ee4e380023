"""A student's step on the CPU: large freed buffers kept in the process, and one head chunk per batch.

Trains the tiny student (15.5M parameters, a 49,152-row head) with ``softlabels train`` on a label set of the
built-in teacher, in fresh processes, side by side in one run, the variants interleaved (A B C A B C ...):

  system malloc    ``SOFTLABELS_SYSTEM_MALLOC=1``: glibc's own thresholds (every large tensor mapped and
                   page-faulted afresh each step), the behaviour before softlabels 0.8.1
  kept             the default since 0.8.1 (``softlabels/common/malloc.py``)

each at ``--head-chunk 1024`` (batches above it recomputed in backward) and 2048 (the default since 0.8.1), for
batches of 8 x 128 and 16 x 128 positions. Reported per variant: training seconds per step (median over the
rounds), the process's user and system CPU seconds and peak RSS (``wait4``); the losses must agree to the last
printed digit (the same arithmetic, other memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common

LABELS = "runs/bench-labels-xtok"


def run(labels: str, out: str, steps: int, batch: int, chunk: int, system: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("SOFTLABELS_SYSTEM_MALLOC", None)
    if system:
        env["SOFTLABELS_SYSTEM_MALLOC"] = "1"
    cmd = [sys.executable, "-m", "softlabels", "train", "--labels", labels, "--student", "tiny", "--output", out,
           "--steps", str(steps), "--batch-size", str(batch), "--head-chunk", str(chunk), "--eval-batches", "1",
           "--seed", "0", "--json"]
    proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f"failed: {' '.join(cmd)} (status {status})")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"step_s": summary["train_s"] / steps, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "peak_gb": usage.ru_maxrss * 1024 / 1e9, "ce": summary["after"]["ce"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default=str(common.REPO / LABELS), help="a label set of the built-in teacher "
                   "(default: %(default)s; `make demo`'s runs/demo/labels serves too)")
    p.add_argument("--steps", type=int, default=8, help="steps per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant, interleaved (default: %(default)s)")
    args = p.parse_args(argv)
    variants = [(batch, chunk, system) for batch in (8, 16) for chunk in (1024, 2048) for system in (True, False)]
    got: dict[tuple[int, int, bool], list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="softlabels-host-") as tmp:
        for r in range(args.rounds):
            for v in variants:
                got[v].append(run(args.labels, str(Path(tmp) / "s"), args.steps, *v))
                print(f"round {r + 1}: batch {v[0]} x 128, head chunk {v[1]}, {'system' if v[2] else 'kept'}: "
                      f"{got[v][-1]['step_s']:.3f} s/step", flush=True)
    rows = []
    for v in variants:
        runs = got[v]
        base = common.median([x["step_s"] for x in got[(v[0], 1024, True)]])
        step = common.median([x["step_s"] for x in runs])
        rows.append([f"{v[0]} x 128", str(v[1]), "system" if v[2] else "kept", f"{step:.3f}", f"{base / step:.2f}x",
                     f"{common.median([x['user_s'] for x in runs]):.1f}", f"{common.median([x['sys_s'] for x in runs]):.1f}",
                     f"{max(x['peak_gb'] for x in runs):.2f}", f"{runs[0]['ce']:.4f}"])
    print(f"\n## A student's step on the CPU ({common.cpu_name()}, {common.versions()})\n")
    print(f"tiny student, {args.steps} steps per run, {args.rounds} runs per variant interleaved; label set {args.labels}\n")
    print(common.markdown_table(["batch", "--head-chunk", "malloc", "s/step (median)", "speed vs system, 1024",
                                 "user CPU s", "system CPU s", "peak RSS GB", "held-out CE after"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
