"""Labeler memory: peak memory of the chunked top-k head vs a full-logits forward.

For a tiny random Llama (small hidden size, so the LM head dominates) and a
sweep of vocabulary sizes and batch x sequence shapes, measure the peak extra
memory (over the loaded model and its inputs) of two ways to get the top-k:

  full logits: ``model(input_ids, attention_mask).logits`` -> ``log_softmax``
               (in fp32) -> ``topk``, as a naive labeler would;
  labeler:     the body's hidden states at the real positions ->
               ``softlabels.labeler.topk.topk_with_tail`` (LM head over ``head_chunk``
               positions at a time, top-k + exact tail), as ``TeacherRunner`` does.

The first grows with batch x sequence x vocab; the labeler's is bounded by
``head_chunk x vocab`` whatever the batch. On a GPU the figures come from
``torch.cuda.max_memory_allocated``; on CPU each measurement runs in a fresh
subprocess and reads the kernel's resident-set high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs``), falling back to sampling
``/proc/self/statm`` every millisecond where that reset is not allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import common

MIB = 1024**2
METHODS = ("full", "labeler")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", default="32000,128000,256000",
                   help="comma-separated vocabulary sizes (default: %(default)s)")
    p.add_argument("--shapes", default="1x512,4x512,4x1024,8x1024",
                   help="comma-separated BATCHxSEQ shapes (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=64, help="default: %(default)s")
    p.add_argument("--head-chunk", type=int, default=1024,
                   help="labeler positions per LM-head chunk, TeacherRunner's default (default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--max-gib", type=float, default=10.0,
                   help="skip a full-logits run whose estimated peak exceeds this many GiB (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = p.parse_args(argv)
    try:
        args.vocab_list = [int(v) for v in args.vocabs.split(",")]
        args.shape_list = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
    except ValueError:
        p.error(f"bad --vocabs {args.vocabs!r} or --shapes {args.shapes!r} (want e.g. 32000,128000 and 1x512,4x512)")
    if any(len(s) != 2 or min(s) < 1 for s in args.shape_list):
        p.error(f"--shapes must be BATCHxSEQ with positive numbers, got {args.shapes!r}")
    if args.hidden % 4:
        p.error(f"--hidden must be a multiple of 4 (4 attention heads), got {args.hidden}")
    return args


# -- one measurement -----------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRSS:
    """Peak resident memory of this process during a block, in bytes above the RSS at its start."""

    def __init__(self) -> None:
        self.peak = 0
        self.method = ""
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = _status_kib("VmRSS") * 1024
        try:
            # "5" resets the high-water mark to the current RSS (Linux >= 4.0).
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "statm sampling"
            self._page = os.sysconf("SC_PAGE_SIZE")
            self._max = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self._max = max(self._max, int(f.read().split()[1]) * self._page)
                time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.method == "VmHWM":
            self.peak = _status_kib("VmHWM") * 1024 - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._max - self.start


def build(vocab: int, hidden: int, layers: int, max_len: int, device: str, dtype: str) -> Any:
    import torch

    model = common.random_llama(
        "tiny", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=max_len,
    )
    return model.to(device=device, dtype=getattr(torch, dtype))


def run_method(method: str, model: Any, ids: Any, mask: Any, k: int, chunk: int) -> Any:
    """One top-k labeling of ``ids``, results on the host."""
    import torch

    from softlabels.labeler.topk import topk_with_tail

    with torch.inference_mode():
        if method == "full":
            logits = model(input_ids=ids, attention_mask=mask).logits
            vals, idx = torch.topk(torch.log_softmax(logits.float(), dim=-1), k, dim=-1)
            return vals.cpu(), idx.cpu()
        # As TeacherRunner.label: body, real positions only, chunked head + top-k + tail.
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        flat = hidden[mask.bool()]
        softcap = getattr(model.config, "final_logit_softcapping", None)
        return topk_with_tail(flat, model.get_output_embeddings(), k, 1.0, chunk, softcap)


def measure_one(method: str, vocab: int, batch: int, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    """Peak extra bytes and seconds of one labeling of a random ``batch x seq`` batch."""
    import gc

    import torch

    torch.manual_seed(0)
    model = build(vocab, args.hidden, args.layers, max(seq, 64), args.device, args.dtype)
    ids = torch.randint(0, vocab, (batch, seq), device=args.device)
    mask = torch.ones_like(ids)
    run_method(method, model, ids[:1, :8], mask[:1, :8], args.top_k, args.head_chunk)  # warm-up: library init
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = run_method(method, model, ids, mask, args.top_k, args.head_chunk)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak, how = torch.cuda.max_memory_allocated() - base, "max_memory_allocated"
    else:
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            out = run_method(method, model, ids, mask, args.top_k, args.head_chunk)
            seconds = time.perf_counter() - t0
        peak, how = rss.peak, rss.method
    del out
    return {"method": method, "vocab": vocab, "batch": batch, "seq": seq, "peak_bytes": peak, "seconds": seconds,
            "how": how}


def measure_isolated(method: str, vocab: int, batch: int, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    """On CPU, :func:`measure_one` in a fresh Python, so no measurement sees another's memory."""
    if args.device.startswith("cuda"):
        return measure_one(method, vocab, batch, seq, args)  # the CUDA allocator's counters are exact per call
    child = json.dumps({"method": method, "vocab": vocab, "batch": batch, "seq": seq})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--top-k", str(args.top_k), "--head-chunk", str(args.head_chunk),
           "--device", args.device, "--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {child} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def full_estimate(positions: int, vocab: int, dtype: str) -> int:
    """Bytes of the full-logits path's big tensors: logits, their fp32 copy (if not fp32), log-probs."""
    elem = 4 if dtype == "float32" else 2
    return positions * vocab * (elem + (0 if elem == 4 else 4) + 4)


# -- the sweep -----------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.child:
        c = json.loads(args.child)
        print(json.dumps(measure_one(c["method"], c["vocab"], c["batch"], c["seq"], args)))
        return 0

    print(f"device: {common.device_name(args.device)}, {args.dtype}; {common.versions()}")
    print(f"tiny Llama: hidden {args.hidden}, {args.layers} layers; top-{args.top_k}; labeler head_chunk "
          f"{args.head_chunk}", flush=True)
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    rows = []
    for vocab in args.vocab_list:
        for batch, seq in args.shape_list:
            r: dict[str, Any] = {"vocab": vocab, "batch": batch, "seq": seq}
            est = full_estimate(batch * seq, vocab, args.dtype)
            if est > args.max_gib * 1024**3:
                r["full"] = None
                full_cell = f"skipped (~{est / 1024**3:.0f} GiB)"
            else:
                r["full"] = measure_isolated("full", vocab, batch, seq, args)
                full_cell = f"{r['full']['peak_bytes'] / MIB:,.0f}"
            r["labeler"] = measure_isolated("labeler", vocab, batch, seq, args)
            lab = r["labeler"]["peak_bytes"]
            ratio = f"{r['full']['peak_bytes'] / lab:.1f}x" if r["full"] and lab > 0 else "-"
            times = (f"{r['full']['seconds']:.2f}" if r["full"] else "-") + f" / {r['labeler']['seconds']:.2f}"
            rows.append([f"{vocab:,}", f"{batch} x {seq}", full_cell, f"{lab / MIB:,.0f}", ratio, times])
            results.append(r)
            print(f"  vocab {vocab:>7,}  {batch} x {seq:<5}  full {full_cell:>18}  labeler {lab / MIB:8,.0f}  (MiB)",
                  flush=True)
    how = results[0]["labeler"]["how"]
    print()
    print(f"peak memory above the loaded model and inputs ({how}), MiB:")
    print()
    print(common.markdown_table(
        ["vocab", "batch x seq", "full logits peak MiB", "labeler peak MiB", "full / labeler",
         "seconds full / labeler"],
        rows,
    ))
    print()
    v = max(args.vocab_list)
    print(f"expected: full logits hold positions x vocab x 4 B twice (logits and log-probs); the labeler holds "
          f"min(positions, {args.head_chunk}) x vocab x 4 B about twice (a chunk's logits and logsumexp's "
          f"temporary), e.g. 2 x {args.head_chunk * v * 4 / MIB:,.0f} MiB at vocab {v:,}, whatever the batch")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "device": common.device_name(args.device), "dtype": args.dtype, "hidden": args.hidden,
            "layers": args.layers, "top_k": args.top_k, "head_chunk": args.head_chunk, "how": how,
            "results": results,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
