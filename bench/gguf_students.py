"""Small models on small devices: the tiny student in every format it ships in, and quantization-aware distillation.

The built-in teacher's label set of the built-in corpus (``runs/bench-labels``: see trainer_speed.LABELS_CMD), the
``tiny`` student. Two students with the same budget and seed: plain (fp32 weights) and ``--qat q4`` (trained
through llama.cpp's q4_0 block rounding). Then the plain student exported as ONNX int8 and as GGUF f16, q8_0,
q4_k_m and q4_0 (post-training quantization by llama.cpp's own quantizer), the QAT student as GGUF q4_0; every
model measured by ``softlabels compare`` alone in a child process, on the same held-out split: size on disk,
peak memory, CPU tokens/s scoring a fixed batch (full logits at every position; GGUF rows in llama.cpp), and for
GGUF rows llama.cpp's own prompt and generation tokens/s (greedy, one token at a time), held-out CE, bits per
byte, KL to the teacher's stored labels, top-1 agreement.

Targets (issue 32): q4_k_m at least 6x smaller than the fp32 student with held-out KL within 5% of fp32's; the
QAT q4 student beats post-training q4 (same format, same steps) on held-out KL.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import common
from trainer_speed import default_labels, open_labels, quiet_hf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default=None, help="label set (default: runs/demo-full/labels if complete, else runs/bench-labels)")
    p.add_argument("--out", default=str(common.REPO / "runs" / "bench-gguf"), help="students and exports (default: %(default)s)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each student (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed of both students (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="compare's timing per model and round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="compare's speed rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every model (default: all cores)")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def train(labels: str, out: Path, args: argparse.Namespace, qat: str | None) -> dict:
    from softlabels.trainer.config import TrainConfig
    from softlabels.trainer.loop import train as run

    if (out / "model.safetensors").exists() and (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    summary = run(TrainConfig(labels=labels, output=str(out), student="tiny", steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, warmup_steps=max(1, args.steps // 10), eval_fraction=args.eval_fraction,
                              eval_batches=20, seed=args.seed, qat=qat))
    (out / "summary.json").write_text(json.dumps(summary, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_hf()
    labels = args.labels or default_labels()
    open_labels(labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from softlabels.trainer.compare import compare, table
    from softlabels.trainer.export import export_model
    from softlabels.trainer.gguf import export_gguf

    t0 = time.time()
    times = {}
    for name, qat in (("student", None), ("student-qat-q4", "q4")):
        t = time.time()
        train(labels, out / name, args, qat)
        times[f"train {name}"] = time.time() - t
    exports = {}
    if not (out / "student-int8").exists():
        export_model(str(out / "student"), str(out / "student-int8"), "int8")
    exports["onnx int8"] = str(out / "student-int8")
    for src, quant, name in (("student", "f16", "gguf f16"), ("student", "q8_0", "gguf q8_0"),
                             ("student", "q4_k_m", "gguf q4_k_m"), ("student", "q4_0", "gguf q4_0 (PTQ)"),
                             ("student-qat-q4", "q4_0", "gguf q4_0 (QAT)")):
        path = out / f"{src}-{quant}.gguf"
        if not path.exists():
            t = time.time()
            export_gguf(str(out / src), str(path), quant, threads=args.threads)
            times[f"export {name}"] = time.time() - t
        exports[name] = str(path)
    models = {"fp32": str(out / "student"), **exports, "fp32 (QAT q4 weights)": str(out / "student-qat-q4")}
    t = time.time()
    rows = compare(labels, list(models.values()), list(models), seconds=args.seconds, rounds=args.rounds,
                   threads=args.threads)
    times["compare"] = time.time() - t
    by = {r["name"]: r for r in rows}
    print(f"\nmachine: {common.cpu_name()}; {common.versions()}; labels {labels}; {args.steps} steps x "
          f"{args.batch_size} sequences per student, seed {args.seed}; held-out share {rows[0]['eval_fraction']}")
    print(table(rows))
    fp = by["fp32"]
    headers = ["model", "format", "on disk (MB)", "x smaller", "peak mem (MiB)", "CPU tok/s", "llama.cpp pp / tg tok/s",
               "held-out CE", "bits/byte", "KL", "KL vs fp32", "top-1"]
    body = []
    for r in rows:
        pp = f"{r['prompt_tokens_per_s']:,.0f} / {r['gen_tokens_per_s']:,.0f}" if r.get("gen_tokens_per_s") else "-"
        body.append([r["name"], r["format"], f"{r['disk_bytes'] / 1e6:.1f}", f"{fp['disk_bytes'] / r['disk_bytes']:.2f}",
                     f"{r['peak_memory_bytes'] / 2**20:.0f}", f"{r['cpu_tokens_per_s']:,.0f}", pp, f"{r['ce']:.3f}",
                     f"{r['bpb']:.3f}" if r.get("bpb") is not None else "-", f"{r['kl']:.3f}",
                     f"{100 * (r['kl'] / fp['kl'] - 1):+.2f}%", f"{r['top1']:.3f}"])
    print("\n" + common.markdown_table(headers, body))
    k4 = by["gguf q4_k_m"]
    smaller, kl = fp["disk_bytes"] / k4["disk_bytes"], 100 * (k4["kl"] / fp["kl"] - 1)
    ptq, qat = by["gguf q4_0 (PTQ)"], by["gguf q4_0 (QAT)"]
    print(f"\n[{'met' if smaller >= 6 else 'MISSED'}] q4_k_m {smaller:.2f}x smaller than fp32 (target >= 6x)")
    print(f"[{'met' if kl <= 5 else 'MISSED'}] q4_k_m held-out KL {kl:+.2f}% vs fp32 (target within 5%)")
    print(f"[{'met' if qat['kl'] < ptq['kl'] else 'MISSED'}] QAT q4 vs post-training q4 (q4_0 files, same steps): "
          f"held-out KL {qat['kl']:.4f} vs {ptq['kl']:.4f} ({100 * (qat['kl'] / ptq['kl'] - 1):+.2f}%); vs q4_k_m "
          f"{k4['kl']:.4f}; fp32 {fp['kl']:.4f}")
    threads = rows[0]["threads"]
    print(f"threads: {threads} for every model; wall {time.time() - t0:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
