"""``softlabels inspect``: manifest summary plus statistics of the stored labels.

Per position it reports the teacher's top-1 probability, the mass held by
the top-k, the tail mass outside it, and the entropy of the (k+1)-bucket
distribution ``[p_1..p_k, p_tail]`` (a lower bound of the teacher's full
entropy: the tail counts as one bucket).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from softlabels.schemas import open_label_set
from softlabels.schemas.errors import UserError

from softlabels.common.plot import pyplot, save_png

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def position_stats(topk_logprobs: np.ndarray, tail_logprob: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position top-1 probability, top-k mass, tail mass and (k+1)-bucket entropy (nats)."""
    lp = topk_logprobs.astype(np.float64)
    tail = tail_logprob.astype(np.float64)
    p = np.exp(lp)
    p_tail = np.exp(tail)
    with np.errstate(invalid="ignore"):
        ent = -(p * lp).sum(-1) - np.where(p_tail > 0, p_tail * tail, 0.0)
    return {"top1_prob": p[:, 0], "topk_mass": p.sum(-1), "tail_mass": p_tail, "entropy": ent}


def summarize(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {}
    q = np.quantile(x, QUANTILES)
    return {"mean": float(x.mean()), **{f"p{int(round(a * 100)):02d}": float(v) for a, v in zip(QUANTILES, q)}}


def inspect_label_set(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    max_shards: int = 8,
    plot: str | None = None,
) -> dict[str, Any]:
    """Summarize a label set: sizes, and label statistics over (up to) ``max_shards`` shards."""
    if max_shards < 1:
        raise UserError(f"--max-shards must be >= 1, got {max_shards}")
    if plot is not None:
        pyplot(plot)  # checks the name and that matplotlib is there, before reading shards
    ls = open_label_set(url, storage_options)
    m = ls.manifest
    parts: dict[str, list[np.ndarray]] = {}
    for sample in ls.iter_samples(m.shards[:max_shards]):
        for name, values in position_stats(sample.topk_logprobs, sample.tail_logprob).items():
            parts.setdefault(name, []).append(values)
    stats = {name: np.concatenate(v) for name, v in parts.items()}
    report: dict[str, Any] = {
        "url": url,
        "schema_version": m.schema_version,
        "teacher": m.teacher.id,
        "teacher_dtype": m.teacher.dtype,
        "tokenizer": m.tokenizer.name,
        "vocab_size": m.tokenizer.vocab_size,
        "top_k": m.top_k,
        "temperature": m.temperature,
        "encoding": m.encoding,
        "tail_samples": m.tail_samples,
        "spans": m.spans,  # students with another tokenizer can distill from it
        "target_logprobs": m.target_logprobs,  # the teacher's log-prob of each token that follows (schema v6)
        "sampler_logprobs": m.sampler_logprobs,  # a generator's log-prob of each token it wrote (schema v7)
        "generation": m.generation,  # who wrote the responses, and how (label --generate-with)
        "corpus": m.corpus.source,
        "documents": m.corpus.documents,
        "sequences": m.totals.sequences,
        "tokens": m.totals.tokens,
        "trained_positions": m.totals.trained if m.totals.trained is not None else m.totals.tokens,
        "format": (m.rendering or {}).get("format", "text"),
        "train_on": (m.rendering or {}).get("train_on", "all"),
        "shards": len(m.shards),
        "bytes": m.totals.bytes,
        "bytes_per_token": m.totals.bytes / max(1, m.totals.tokens),
        "labeler_version": m.labeler_version,
        "created_at": m.created_at,
        "sampled_shards": min(max_shards, len(m.shards)),
        "sampled_positions": int(stats["entropy"].size) if stats else 0,
        **{name: summarize(values) for name, values in stats.items()},
    }
    if plot:
        _plot(stats, plot, f"{m.teacher.id}, top-{m.top_k}, {report['sampled_positions']:,} positions")
        report["plot"] = plot
    return report


def _plot(stats: dict[str, np.ndarray], path: str, title: str) -> None:
    plt = pyplot(path)
    labels = {
        "top1_prob": "teacher top-1 probability",
        "topk_mass": "top-k mass",
        "tail_mass": "tail mass (outside the top-k)",
        "entropy": "entropy of top-k + tail (nats)",
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, label) in zip(axes.flat, labels.items()):
        ax.hist(stats.get(name, np.zeros(0)), bins=50, color="#4477aa")
        ax.set_xlabel(label)
        ax.set_ylabel("positions")
    fig.suptitle(title)
    save_png(fig, path)
