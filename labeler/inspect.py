"""``labeler inspect``: manifest summary plus statistics of the stored labels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from schemas import open_label_set


def inspect_label_set(url: str, storage_options: Mapping[str, Any] | None = None, max_shards: int = 8) -> dict[str, Any]:
    """Summarize a label set: sizes, and top-k mass / tail mass / entropy of a sample of shards."""
    ls = open_label_set(url, storage_options)
    m = ls.manifest
    topk_mass, tail_mass, top1 = [], [], []
    for sample in ls.iter_samples(m.shards[:max_shards]):
        p = np.exp(sample.topk_logprobs.astype(np.float64))
        topk_mass.append(p.sum(-1))
        tail_mass.append(np.exp(sample.tail_logprob.astype(np.float64)))
        top1.append(p[:, 0])

    def stats(parts: list[np.ndarray]) -> dict[str, float]:
        if not parts:
            return {}
        x = np.concatenate(parts)
        q = np.quantile(x, [0.05, 0.5, 0.95])
        return {"mean": float(x.mean()), "p05": float(q[0]), "p50": float(q[1]), "p95": float(q[2])}

    return {
        "url": url,
        "schema_version": m.schema_version,
        "teacher": m.teacher.id,
        "tokenizer": m.tokenizer.name,
        "vocab_size": m.tokenizer.vocab_size,
        "top_k": m.top_k,
        "temperature": m.temperature,
        "corpus": m.corpus.source,
        "sequences": m.totals.sequences,
        "tokens": m.totals.tokens,
        "shards": len(m.shards),
        "bytes": m.totals.bytes,
        "bytes_per_token": m.totals.bytes / max(1, m.totals.tokens),
        "created_at": m.created_at,
        "sampled_shards": min(max_shards, len(m.shards)),
        "topk_mass": stats(topk_mass),
        "tail_mass": stats(tail_mass),
        "top1_prob": stats(top1),
    }
