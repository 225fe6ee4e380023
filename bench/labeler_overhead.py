"""Labeler overhead: the full labeling path vs the teacher's bare forward pass.

Same process, same teacher weights, same random sequences, same batches
(``TeacherRunner.batches``), measured interleaved batch by batch:

  (a) bare forward: ``model(input_ids=..., attention_mask=...)`` producing the
      full ``[batch, seq, vocab]`` logits (inputs already on the device);
  (b) labeler: what the Ray job does with one unit (:mod:`softlabels.labeler.actor`), here
      run one step after the other in one process:
        label  - ``TeacherRunner.label`` (body + chunked LM head + top-k + exact
                 tail, results to the host), as ``TeacherActor.label`` does;
        encode - ``softlabels.labeler.actor.encode_shard`` (``Sample``, ``sample_id``,
                 ``encode_samples`` in the default encoding,
                 ``table_to_parquet_bytes``), as the shard writer actor does;
        write  - ``LabelSetWriter.commit_unit`` (shard, then commit marker) to a
                 local SeaweedFS S3 server.

Reports median tokens/s of each and the ratio b/a (issue target: >= 0.90 on
CPU, >= 0.95 on GPU); it prints PASS / BELOW TARGET and never fails on a
timing. In the Ray job encode + write run in a writer actor while the teacher
labels its next unit, so the table also gives the label stage alone (a
replica's own pace when its writer keeps up) and encode + write alone (the
writer's pace). ``--ray-job`` also times the whole Ray job
(``softlabels.labeler.job.run``) on the built-in pydoc corpus, packed to the same length.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import common


@dataclass
class Timings:
    """Seconds per repeat (summed over its batches), and the labeler's split into stages."""

    bare: list[float] = field(default_factory=list)
    labeler: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: {"label": [], "encode": [], "write": []})
    pair_ratios: list[float] = field(default_factory=list)  # per batch: bare s / labeler s, back to back
    per_batch: dict[str, list[list[float]]] = field(default_factory=lambda: {"bare": [], "labeler": []})

    def best(self, path: str) -> float:
        """Sum over batches of each batch's fastest run: a figure that load from other processes can only raise."""
        return sum(min(runs) for runs in self.per_batch[path])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m",
                   help="built-in alias, HF model directory or hub id (as labeler --teacher), or "
                        f"random:PRESET for random weights of a known shape ({', '.join(common.LLAMA_PRESETS)}); "
                        "default: %(default)s")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--sequences", type=int, default=64, help="random sequences per run (default: %(default)s)")
    p.add_argument("--length", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--min-length", type=int, default=None,
                   help="if set, lengths are drawn uniformly from [min-length, length] (padding in (a))")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch (default: %(default)s)")
    p.add_argument("--head-chunk", type=int, default=1024, help="positions per LM-head chunk (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=64, help="default: %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each path, interleaved (default: %(default)s)")
    p.add_argument("--output", default="seaweedfs",
                   help="where (b) writes: 'seaweedfs' starts a local S3 server on port "
                        f"{common.S3_PORT} (needs the 'weed' binary and s3fs); anything else is a URL or "
                        "local path used as is (default: %(default)s)")
    p.add_argument("--ray-job", action="store_true",
                   help="also time softlabels.labeler.job.run on the built-in pydoc corpus (needs ray; not with random:)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("sequences", "length", "batch_tokens", "head_chunk", "top_k", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_tokens < args.length:
        p.error(f"--batch-tokens ({args.batch_tokens}) must be >= --length ({args.length})")
    if args.min_length is not None and not 1 <= args.min_length <= args.length:
        p.error(f"--min-length must be in [1, --length], got {args.min_length}")
    return args


def load_teacher(args: argparse.Namespace, workdir: Path) -> tuple[Any, str, str]:
    """Return ``(TeacherRunner, tokenizer fingerprint, description)``."""
    from softlabels.labeler.seams import LabelSettings
    from softlabels.labeler.teacher import TeacherRunner, load_tokenizer, pick_device_dtype, resolve_teacher
    from softlabels.schemas import tokenizer_fingerprint

    device, dtype = pick_device_dtype(args.device, args.dtype)
    args.device, args.dtype = device, dtype
    if args.teacher.startswith("random:"):
        preset = args.teacher.split(":", 1)[1]
        path = common.random_llama_dir(workdir / "teacher", preset, seed=args.seed, dtype=dtype)
        source = resolve_teacher(str(path))
        # No tokenizer: sample ids only need a stable fingerprint string.
        fp, desc = f"sha256:random-{preset}", f"random weights, {preset} shape"
    else:
        source = resolve_teacher(args.teacher)
        fp, desc = tokenizer_fingerprint(load_tokenizer(source)), source.display_name
    runner = TeacherRunner(source, dtype, device, LabelSettings(args.top_k, 1.0, args.batch_tokens, args.head_chunk))
    params = sum(p.numel() for p in runner.model.parameters())
    return runner, fp, f"{desc}; {params / 1e6:.1f}M parameters, vocab {runner.vocab:,}"


def make_sequences(args: argparse.Namespace, vocab: int) -> list[np.ndarray]:
    """Random int32 token ids; fixed length unless ``--min-length`` is given."""
    rng = np.random.default_rng(args.seed)
    lo = args.min_length or args.length
    lengths = rng.integers(lo, args.length + 1, size=args.sequences)
    return [rng.integers(0, vocab, size=int(n), dtype=np.int32) for n in lengths]


def bare_inputs(runner: Any, sequences: list[np.ndarray], batches: list[list[int]]) -> list[tuple[Any, Any]]:
    """Padded ``(input_ids, attention_mask)`` per batch, on the device, built once (not timed)."""
    import torch

    out = []
    for batch in batches:
        maxlen = max(len(sequences[i]) for i in batch)
        ids = torch.zeros((len(batch), maxlen), dtype=torch.long)
        mask = torch.zeros((len(batch), maxlen), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.from_numpy(sequences[i].astype(np.int64))
            mask[row, : len(sequences[i])] = 1
        out.append((ids.to(runner.device), mask.to(runner.device)))
    return out


def run_bare(model: Any, inputs: list[tuple[Any, Any]]) -> None:
    """(a): the teacher's forward with full logits, batch by batch (logits dropped)."""
    import torch

    with torch.inference_mode():
        for ids, mask in inputs:
            logits = model(input_ids=ids, attention_mask=mask).logits
            del logits


def run_labeler(
    runner: Any, writer: Any, fp: str, top_k: int, sequences: list[np.ndarray], name: str, device: str
) -> dict[str, float]:
    """(b): label one unit, encode it, commit it, as the teacher and writer actors do; returns stage seconds."""
    from softlabels.labeler.actor import encode_shard
    from softlabels.schemas import DEFAULT_ENCODING, Encoding

    from softlabels.labeler.seams import UnitInput

    unit = UnitInput(tuple(f"bench:{name}:{i}" for i in range(len(sequences))), tuple(sequences))
    t: dict[str, list[float]] = {"label": [], "encode": [], "write": []}
    with common.timed(device, t["label"]):
        labels = runner.label(sequences)  # what TeacherActor.label returns
    with common.timed(device, t["encode"]):
        data = encode_shard(unit, labels, top_k, fp, Encoding(DEFAULT_ENCODING), runner.vocab)
    with common.timed(device, t["write"]):
        writer.commit_unit(name, data, rows=len(sequences), tokens=sum(len(s) for s in sequences))
    return {k: v[0] for k, v in t.items()}


def measure(args: argparse.Namespace, runner: Any, fp: str, output: str) -> tuple[Timings, int]:
    """Warm up, then run (a) and (b) over every batch ``--repeats`` times; returns timings and tokens per repeat.

    The two paths alternate batch by batch (a b, b a, a b, ...), so a change in
    machine load (this machine is shared) hits both alike. Each batch's
    sequences form one unit for (b): labeled, encoded and committed as one shard.
    """
    from softlabels.common.commit import LabelSetWriter

    sequences = make_sequences(args, runner.vocab)
    batches = runner.batches([len(s) for s in sequences])
    inputs = bare_inputs(runner, sequences, batches)
    units = [[sequences[i] for i in b] for b in batches]
    tokens = sum(len(s) for s in sequences)
    writer = LabelSetWriter(output)
    print(f"{len(sequences)} sequences, {tokens:,} tokens in {len(batches)} batches "
          f"(largest {max(len(b) for b in batches)} x {args.length}); writing to {output}", flush=True)

    # Warm-up: on a GPU every batch once (kernel selection, allocator); on CPU
    # a slice of one batch initializes the math libraries just as well.
    t0 = time.perf_counter()
    if args.device.startswith("cuda"):
        run_bare(runner.model, inputs)
        for j, unit in enumerate(units):
            run_labeler(runner, writer, fp, args.top_k, unit, f"warmup-{j:06d}", args.device)
    else:
        ids, mask = inputs[0]
        run_bare(runner.model, [(ids[:2], mask[:2])])
        run_labeler(runner, writer, fp, args.top_k, units[0][:2], "warmup", args.device)
    print(f"warm-up: {time.perf_counter() - t0:.1f} s", flush=True)

    t = Timings()
    t.per_batch = {"bare": [[] for _ in batches], "labeler": [[] for _ in batches]}
    for rep in range(args.repeats):
        bare_s, lab_s = 0.0, 0.0
        stages = dict.fromkeys(t.stages, 0.0)
        for j, (inp, unit) in enumerate(zip(inputs, units)):
            pair: dict[str, float] = {}
            for path in ("bare", "labeler") if (rep + j) % 2 == 0 else ("labeler", "bare"):
                if path == "bare":
                    dt: list[float] = []
                    with common.timed(args.device, dt):
                        run_bare(runner.model, [inp])
                    pair["bare"] = dt[0]
                else:
                    st = run_labeler(runner, writer, fp, args.top_k, unit, f"part-{rep:03d}{j:03d}", args.device)
                    pair["labeler"] = sum(st.values())
                    for k, v in st.items():
                        stages[k] += v
            for path, dt_s in pair.items():
                t.per_batch[path][j].append(dt_s)
            bare_s += pair["bare"]
            lab_s += pair["labeler"]
            t.pair_ratios.append(pair["bare"] / pair["labeler"])
        t.bare.append(bare_s)
        t.labeler.append(lab_s)
        for k, v in stages.items():
            t.stages[k].append(v)
        print(f"repeat {rep + 1}/{args.repeats}: bare {bare_s:.2f} s, labeler {lab_s:.2f} s "
              f"(label {stages['label']:.2f}, encode {stages['encode']:.2f}, write {stages['write']:.2f})",
              flush=True)
    return t, tokens


def ray_job(args: argparse.Namespace, output: str) -> dict[str, Any]:
    """Time ``softlabels.labeler.job.run`` on the pydoc corpus, packed to ``--length``; returns its summary figures."""
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import run

    cfg = LabelConfig(
        teacher=args.teacher, corpus="pydoc", output=output, top_k=args.top_k, max_length=args.length,
        packing=True, limit=args.sequences, batch_tokens=args.batch_tokens, head_chunk=args.head_chunk,
        dtype=args.dtype, device=args.device, shard_tokens=max(args.batch_tokens, args.sequences * args.length // 4),
    )
    s = run(cfg)
    return {"tokens": s.labeled_tokens, "label_s": s.label_s, "wall_s": s.wall_s, "tokens_per_s": s.tokens_per_s,
            "shards": s.shards}


def _runs(seconds: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in seconds)


def report(args: argparse.Namespace, desc: str, t: Timings, tokens: int, ray: dict[str, Any] | None,
           ray_error: str | None, load: tuple[float, float]) -> dict[str, Any]:
    """Print the tables and return the figures (for ``--json``)."""
    bare_tps = tokens / common.median(t.bare)
    lab_tps = tokens / common.median(t.labeler)
    ratio = lab_tps / bare_tps
    target = 0.95 if args.device.startswith("cuda") else 0.90
    print()
    print(f"device: {common.device_name(args.device)}, {args.dtype}; {common.versions()}")
    print(f"teacher: {args.teacher} ({desc})")
    print(f"{args.sequences} sequences x {args.length} tokens, batch_tokens {args.batch_tokens}, "
          f"head_chunk {args.head_chunk}, top-{args.top_k} + tail, {args.repeats} interleaved repeats; "
          f"load average {load[0]:.2f} before, {load[1]:.2f} after")
    print()
    rows = [
        ["(a) bare forward, full logits", f"{bare_tps:,.0f}", _runs(t.bare), "1.00"],
        ["(b) labeler: label + encode + write", f"{lab_tps:,.0f}", _runs(t.labeler), f"{ratio:.2f}"],
    ]
    label_tps = tokens / common.median(t.stages["label"])
    write_s = [e + w for e, w in zip(t.stages["encode"], t.stages["write"])]
    write_tps = tokens / common.median(write_s)
    rows += [
        ["(b1) label stage only (teacher actor)", f"{label_tps:,.0f}", _runs(t.stages["label"]),
         f"{label_tps / bare_tps:.2f}"],
        ["(b2) encode + write only (writer actor)", f"{write_tps:,.0f}", _runs(write_s), f"{write_tps / bare_tps:.2f}"],
    ]
    if ray is not None:
        rows.append(["Ray job (pydoc, packed; Ray start excluded)", f"{ray['tokens_per_s']:,.0f}",
                     f"{ray['label_s']:.2f}", f"{ray['tokens_per_s'] / bare_tps:.2f}"])
    print(common.markdown_table(["path", "tokens/s (median)", "run times (s)", "vs (a)"], rows))
    print()
    total = sum(common.median(v) for v in t.stages.values())
    print(common.markdown_table(
        ["(b) stage", "median s", "share"],
        [[k, f"{common.median(v):.3f}", f"{common.median(v) / total:.0%}"] for k, v in t.stages.items()],
    ))
    print()
    print(f"median of the {len(t.pair_ratios)} per-batch ratios (a and b back to back): "
          f"{common.median(t.pair_ratios):.3f}")
    best_ratio = t.best("bare") / t.best("labeler")
    print(f"best of {args.repeats} per batch: (a) {tokens / t.best('bare'):,.0f} tokens/s, (b) "
          f"{tokens / t.best('labeler'):,.0f} tokens/s, ratio {best_ratio:.3f}")
    print(f"ratio (b)/(a) = {ratio:.3f}; target >= {target:.2f} on {'GPU' if target == 0.95 else 'CPU'}: "
          f"{common.verdict(ratio, target)}")
    if ray_error:
        print(f"Ray job not measured: {ray_error}")
    return {
        "device": common.device_name(args.device), "dtype": args.dtype, "teacher": args.teacher, "teacher_desc": desc,
        "sequences": args.sequences, "length": args.length, "tokens": tokens, "batch_tokens": args.batch_tokens,
        "head_chunk": args.head_chunk, "top_k": args.top_k, "bare_s": t.bare, "labeler_s": t.labeler,
        "stages_s": t.stages, "pair_ratios": t.pair_ratios, "per_batch_s": t.per_batch, "best_ratio": best_ratio,
        "bare_tokens_per_s": bare_tps, "labeler_tokens_per_s": lab_tps, "label_stage_tokens_per_s": label_tps,
        "encode_write_tokens_per_s": write_tps, "ratio": ratio,
        "target": target, "verdict": common.verdict(ratio, target), "ray_job": ray, "ray_error": ray_error,
        "load_average": load,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="softlabels-bench-") as tmp:
        t0 = time.perf_counter()
        runner, fp, desc = load_teacher(args, Path(tmp))
        print(f"teacher loaded in {time.perf_counter() - t0:.1f} s: {desc}", flush=True)
        server = common.seaweedfs() if args.output == "seaweedfs" else contextlib.nullcontext(args.output)
        with server as root:
            timings, tokens = measure(args, runner, fp, common.unique_prefix(root, "overhead"))
            ray, ray_error = None, None
            if args.ray_job:
                if args.teacher.startswith("random:"):
                    ray_error = "--ray-job needs a teacher with a tokenizer (not random:)"
                else:
                    del runner  # one teacher in memory at a time
                    # The job reports its plan and progress through logging.
                    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                                        datefmt="%H:%M:%S")
                    try:
                        ray = ray_job(args, common.unique_prefix(root, "rayjob"))
                    except Exception as e:  # optional figure: report why it is missing, keep (a) vs (b)
                        ray_error = f"{type(e).__name__}: {e}"
        figures = report(args, desc, timings, tokens, ray, ray_error, (load_before, os.getloadavg()[0]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
