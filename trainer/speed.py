"""How ``softlabels compare`` times a model and weighs its memory: a fixed prompt set cut into rows, the fastest of
repeated passes, a PyTorch model's prompt and generation speed with its KV cache, and this process's memory."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

# The fixed prompt set: cut into rows x length tokens with the label set's tokenizer.
PROMPTS = (
    "The quick brown fox jumps over the lazy dog while the farmer counts his sheep before the storm.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Knowledge distillation trains a small student model to imitate the output distribution of a large teacher.",
    "In 1969 the first humans landed on the Moon, and the pictures were broadcast to millions of viewers.",
    "A list comprehension creates a new list by applying an expression to each item of an iterable.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on a mountain.",
    "The committee met on Tuesday to discuss the budget, and after a long debate the proposal was approved.",
    "import json\nwith open('config.json') as f:\n    config = json.load(f)\nprint(config['name'])\n",
)


def prompt_batch(tokenizer: Any, rows: int, length: int) -> Any:
    """``[rows, length]`` int64 ids: the prompts, in order and repeated, cut into equal rows."""
    import torch

    ids: list[int] = []
    pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    i = 0
    while len(ids) < rows * length:
        ids.extend(pieces[i % len(pieces)])
        i += 1
    return torch.tensor(ids[: rows * length], dtype=torch.int64).reshape(rows, length)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes() -> int:
    """This process's peak RSS. Linux: ``VmHWM``, the high-water mark of this process's own memory map, which
    ``execve`` starts afresh; ``ru_maxrss`` is inherited across fork and kept across exec, so a child started by a
    big process (a benchmark holding trained students) would report its parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def tokens_per_s(run: Any, tokens: int, seconds: float, sync: Any = None, passes: int = 5) -> float:
    """Throughput of the fastest of at least ``passes`` timed calls of ``run()`` (and ``seconds``), after a warm-up.

    The fastest pass, not the median: on a shared machine other work only ever slows
    a pass down, so the minimum is the figure that repeats.
    """
    run()
    if sync:
        sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < passes or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return tokens / min(times)


def torch_speed(model: Any, prompt: list[int], new_tokens: int, seconds: float) -> dict[str, float]:
    """Prompt and generation tokens/s of a PyTorch model on the CPU, timed as :meth:`trainer.gguf.GGUFCausalLM.speed`
    times llama.cpp: the fastest of repeated passes (at least 3, the first a warm-up, and ``seconds``) of one
    prompt row from an empty cache, then ``new_tokens`` greedy steps one at a time with the KV cache."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.int64)
    best_p = best_g = float("inf")
    start, passes = time.perf_counter(), 0
    with torch.inference_mode():
        while passes < 3 or time.perf_counter() - start < seconds:
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            tp = time.perf_counter() - t
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tg = time.perf_counter() - t
            if passes:
                best_p, best_g = min(best_p, tp), min(best_g, tg)
            passes += 1
    return {"prompt_tokens_per_s": len(prompt) / best_p, "gen_tokens_per_s": new_tokens / best_g}
