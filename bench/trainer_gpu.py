"""Trainer step time on a GPU: tail-kl vs ce, the tiny student and a 135M-parameter one, bf16 (issue 21).

Run by ``bench/gpu.sh`` (or alone: ``python bench/trainer_gpu.py``; ``--cpu-smoke`` for tiny
sizes on CPU). Students are randomly initialized Llamas of two shapes (the built-in ``tiny``,
and SmolLM2-135M's: 30 layers, width 576, 49,152-token vocabulary, tied head): step time does
not depend on the weights. Batches are synthetic label-set rows (random ids, top-k log-probs
normalized with their tail) turned into tensors by the trainer's own ``collate``; a step is what
``softlabels train`` does: autocast forward through ``KDModule`` (body, chunked head + loss),
backward, clip, AdamW. Modes interleaved round by round; median step time, tokens/s, the
tail-kl / ce ratio and the peak CUDA memory of each. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

import common

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
}


def batch(rng: np.random.Generator, n: int, length: int, k: int, vocab: int) -> dict[str, torch.Tensor]:
    from softlabels.schemas import Sample
    from softlabels.trainer.batch import collate, sample_to_tensors

    rows = []
    for i in range(n):
        logits = rng.normal(size=(length, k + 1)).astype(np.float32) * 3
        lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        order = np.argsort(-lp[:, :k], axis=1)
        rows.append(sample_to_tensors(Sample(
            sample_id=f"{i:064x}", source="synthetic", input_ids=rng.integers(0, vocab, length).astype(np.int32),
            topk_ids=rng.integers(0, vocab, (length, k)).astype(np.int32),
            topk_logprobs=np.take_along_axis(lp[:, :k], order, 1), tail_logprob=lp[:, k])))
    return collate(rows)


def build(shape: str, loss: str, device: torch.device) -> tuple[Any, Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from softlabels.trainer.config import TrainConfig
    from softlabels.trainer.sharding import KDModule

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096))
    model.to(device).train()
    fn = KDModule(model, TrainConfig(labels="unused", output="unused", loss=loss))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    return fn, model, opt


def step(fn: Any, model: Any, opt: Any, b: dict[str, torch.Tensor], precision: str, device: torch.device) -> None:
    from softlabels.trainer.precision import autocast

    opt.zero_grad(set_to_none=True)
    with autocast(precision, device):
        loss, _ = fn(b)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--shapes", default="tiny,smollm2-135m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per mode, modes interleaved")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks the script end to end")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.precision, args.shapes, args.batch_size, args.length, args.repeats = \
            "cpu", "bf16", "tiny", 2, 64, 2
    device = torch.device(args.device)
    from softlabels.trainer.precision import resolve

    precision = resolve(args.precision, device)
    rng = np.random.default_rng(0)
    b = {k: v.to(device) for k, v in batch(rng, args.batch_size, args.length, args.top_k, 49152).items()}
    tokens = int(b["attention_mask"].sum())
    rows, ratios = [], []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        runs = {loss: build(shape, loss, device) for loss in ("ce", "tail-kl")}
        times: dict[str, list[float]] = {loss: [] for loss in runs}
        peak: dict[str, float] = {}
        for loss, r in runs.items():  # warm-up (kernels, allocator), then each mode's own peak memory
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step(*r, b, precision, device)
            step(*r, b, precision, device)
            sync(device)
            peak[loss] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        for i in range(args.repeats):
            for loss in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                sync(device)
                t0 = time.perf_counter()
                step(*runs[loss], b, precision, device)
                sync(device)
                times[loss].append(time.perf_counter() - t0)
        n_params = sum(q.numel() for q in runs["ce"][1].parameters())
        med = {loss: common.median(t) for loss, t in times.items()}
        for loss in runs:
            rows.append([shape, f"{n_params / 1e6:.0f}M", loss, f"{med[loss] * 1e3:.1f}", f"{tokens / med[loss]:,.0f}",
                         f"{peak[loss]:.2f}"])
        ratios.append((shape, med["tail-kl"] / med["ce"]))
        del runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else common.cpu_name()
    print(f"device: {name}; {common.versions()}")
    print(f"{precision} autocast, batch {args.batch_size} x {args.length} tokens, k={args.top_k}, median of "
          f"{args.repeats} interleaved steps (forward, backward, clip, AdamW)")
    print()
    print(common.markdown_table(["student", "parameters", "loss", "ms / step", "tokens/s", "peak GiB"], rows))
    print()
    for shape, r in ratios:
        print(f"{shape}: tail-kl / ce step time = {r:.2f}x (the stored labels' cost over plain CE)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
