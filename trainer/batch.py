"""From decoded samples to training batches: tensors over positions, masks, padding, packing.

:func:`collate` is what every DataLoader of the trainer uses; :func:`model_inputs` is what the
student's forward takes from a batch (block-diagonal masks for packed documents).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from softlabels.schemas import Sample


def truncate_topk(topk_logprobs: np.ndarray, tail_logprob: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first ``k`` entries; the dropped mass joins the tail exactly (in fp64)."""
    kept = topk_logprobs[..., :k]
    dropped = topk_logprobs[..., k:].astype(np.float64)
    parts = np.concatenate([dropped, tail_logprob[..., None].astype(np.float64)], -1)
    with np.errstate(divide="ignore"):
        tail = np.logaddexp.reduce(parts, axis=-1)
    return kept, tail.astype(np.float32)


def _at_positions(rows: np.ndarray, trained: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor:
    """Label rows (one per trained position) laid out over every position of the sequence (0 elsewhere)."""
    if trained is None:
        return torch.tensor(rows, dtype=dtype)  # decoded arrays may be read-only views: torch.tensor copies
    full = torch.zeros((len(trained), *rows.shape[1:]), dtype=dtype)
    full[torch.from_numpy(np.flatnonzero(trained))] = torch.tensor(np.asarray(rows), dtype=dtype)  # a copy: rows may be read-only
    return full


def sample_to_tensors(s: Sample, top_k: int | None = None, byte_lengths: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """A sample as tensors over its positions; ``label_mask`` marks the trained ones (where labels are).

    ``target_bytes`` (bytes of the text each position's next token covers, for bits per byte) comes from the
    sample's spans, or else from ``byte_lengths`` (per id; 0 for special tokens) when given."""
    lp, tail = s.topk_logprobs, s.tail_logprob
    ids = s.topk_ids
    if top_k is not None:
        lp, tail = truncate_topk(lp, tail, top_k)
        ids = ids[:, :top_k]
    out = {
        "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
        "topk_ids": _at_positions(ids, s.trained, torch.long),
        "topk_logprobs": _at_positions(lp, s.trained, torch.float32),
        "tail_logprob": _at_positions(tail, s.trained, torch.float32),
    }
    if s.trained is not None:
        out["label_mask"] = torch.tensor(s.trained, dtype=torch.bool)
    per_token = s.spans if s.spans is not None else None if byte_lengths is None else byte_lengths[s.input_ids]
    if per_token is not None:
        nxt = np.zeros(len(s.input_ids), np.int64)
        nxt[:-1] = per_token[1:]
        out["target_bytes"] = torch.from_numpy(nxt)
    if s.doc_lengths is not None and len(s.doc_lengths) > 1:
        out["doc_lengths"] = torch.tensor(s.doc_lengths, dtype=torch.long)
    if s.target_logprob is not None:
        # One tokenizer: each trained position whose next token the teacher scored is a chunk of its own.
        target = np.asarray(s.target_logprob, np.float32)
        ok = np.isfinite(target)
        out["chunk_len"] = _at_positions(ok.astype(np.int64), s.trained, torch.long)
        out["chunk_logprob"] = _at_positions(np.where(ok, target, 0), s.trained, torch.float32)
    if s.sampler_logprob is not None:  # a set a model wrote: the generator's log-prob of each token it sampled
        out["sampler_logprob"] = _at_positions(np.asarray(s.sampler_logprob, np.float32), s.trained, torch.float32)
    # Tail draws describe the tail of the stored k; a truncated k' has a larger tail they never saw.
    if s.tail_sample_ids is not None and (top_k is None or top_k >= s.topk_ids.shape[1]):
        out["tail_sample_ids"] = _at_positions(s.tail_sample_ids, s.trained, torch.long)
        out["tail_sample_counts"] = _at_positions(s.tail_sample_counts, s.trained, torch.float32)
    return out


def model_inputs(batch: dict[str, torch.Tensor], model: Any = None) -> dict[str, torch.Tensor]:
    """What the student's forward takes from a batch: with packed documents, the block-diagonal mask
    (additive for eager attention) and restarting positions, so no document attends to another."""
    if "doc_lengths" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    from softlabels.common.packing import packed_inputs

    cfg = getattr(model, "config", None)
    eager = getattr(cfg, "_attn_implementation", "sdpa") == "eager"
    docs = [[int(n) for n in row if n > 0] or None for row in batch["doc_lengths"].tolist()]
    extra = packed_inputs(docs, batch["input_ids"].shape[1], batch["attention_mask"].cpu(),
                          additive=next(model.parameters()).dtype if eager else None)
    device = batch["input_ids"].device
    return {"input_ids": batch["input_ids"], **{k: v.to(device) for k, v in extra.items()}}


_ROW_KEYS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "tail_sample_ids", "tail_sample_counts",
             "topk_mapped", "kd_mask", "ce_mask", "target_bytes", "chunk_len", "chunk_logprob",
             "sampler_logprob")  # from topk_mapped: extras
# Per-position extras, right-padded like the labels: a student with another tokenizer (trainer.crosstok), bytes,
# chunks of text and the teacher's log-probability of each (a set with target_logprob: the chunk term).
_EXTRA_KEYS = {"topk_mapped": torch.bool, "kd_mask": torch.bool, "ce_mask": torch.bool, "target_bytes": torch.long,
               "chunk_len": torch.long, "chunk_logprob": torch.float32, "sampler_logprob": torch.float32}


def pack(samples: list[dict[str, torch.Tensor]], length: int) -> list[dict[str, torch.Tensor]]:
    """Samples joined, in order, into rows of at most ``length`` tokens (a longer one keeps a row of its
    own); each keeps its own attention block and positions (``doc_lengths``), labels and mask."""
    rows: list[list[dict[str, torch.Tensor]]] = []
    filled = length
    for s in samples:
        n = len(s["input_ids"])
        if filled + n > length:
            rows.append([])
            filled = 0
        rows[-1].append(s)
        filled += n
    out = []
    for parts in rows:
        if len(parts) == 1:
            out.append(parts[0])
            continue
        row = {k: torch.cat([p[k] for p in parts]) for k in _ROW_KEYS if k in parts[0]}
        row["label_mask"] = torch.cat([p.get("label_mask", torch.ones(len(p["input_ids"]), dtype=torch.bool))
                                       for p in parts])
        row["doc_lengths"] = torch.cat([p.get("doc_lengths", torch.tensor([len(p["input_ids"])])) for p in parts])
        for key in ("position", "sample_key"):
            if key in parts[0]:
                row[key] = torch.stack([p[key] for p in parts])
        if "xtok_stats" in parts[0]:
            row["xtok_stats"] = torch.stack([p["xtok_stats"] for p in parts]).sum(0)
        out.append(row)
    return out


def collate(samples: list[dict[str, torch.Tensor]], pack_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into a batch.

    Adds ``attention_mask`` (real tokens), ``label_mask`` (positions with a
    teacher label: the trained ones, every real position of a set without a mask) and
    ``targets`` (the true next token at trained positions, -100 elsewhere, at the last
    real position and on padding). ``doc_lengths`` (packed documents, zero-padded) when a
    sample has several. ``position`` (where each sample sits in the data order) is stacked
    when present. ``pack_to``: first join the samples into rows of at most that many tokens
    (:func:`pack`, the trainer's ``--packing``); ``position`` and ``sample_key`` then stay one
    per sample, not per row.
    """
    keys = {k: [] for k in ("position", "sample_key") if k in samples[0]}
    if pack_to is not None:
        for s in samples:
            for k in keys:
                keys[k].append(s[k])
        samples = pack(samples, pack_to)
    b = len(samples)
    t = max(len(s["input_ids"]) for s in samples)
    k = samples[0]["topk_ids"].shape[-1]
    out = {
        "input_ids": torch.zeros((b, t), dtype=torch.long),
        "attention_mask": torch.zeros((b, t), dtype=torch.long),
        "topk_ids": torch.zeros((b, t, k), dtype=torch.long),
        "topk_logprobs": torch.zeros((b, t, k), dtype=torch.float32),
        "tail_logprob": torch.zeros((b, t), dtype=torch.float32),
        "targets": torch.full((b, t), -100, dtype=torch.long),
    }
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        out["input_ids"][i, :n] = s["input_ids"]
        out["attention_mask"][i, :n] = 1
        out["topk_ids"][i, :n] = s["topk_ids"]
        out["topk_logprobs"][i, :n] = s["topk_logprobs"]
        out["tail_logprob"][i, :n] = s["tail_logprob"]
        out["targets"][i, : n - 1] = s["input_ids"][1:]
    if "tail_sample_ids" in samples[0]:
        draws = samples[0]["tail_sample_ids"].shape[-1]
        out["tail_sample_ids"] = torch.zeros((b, t, draws), dtype=torch.long)
        out["tail_sample_counts"] = torch.zeros((b, t, draws), dtype=torch.float32)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            out["tail_sample_ids"][i, :n] = s["tail_sample_ids"]
            out["tail_sample_counts"][i, :n] = s["tail_sample_counts"]
    for key, dtype in _EXTRA_KEYS.items():
        if key in samples[0]:
            out[key] = torch.zeros((b, t, k) if key == "topk_mapped" else (b, t), dtype=dtype)
            for i, s in enumerate(samples):
                out[key][i, : len(s[key])] = s[key]
    out["label_mask"] = out["attention_mask"].bool()
    for i, s in enumerate(samples):
        if "label_mask" in s:
            out["label_mask"][i, : len(s["label_mask"])] = s["label_mask"]
    out["targets"] = out["targets"].masked_fill(~out.get("ce_mask", out["label_mask"]), -100)
    if "xtok_stats" in samples[0]:
        out["xtok_stats"] = torch.stack([s["xtok_stats"] for s in samples]).sum(0)
    docs = [s.get("doc_lengths") for s in samples]
    if any(d is not None for d in docs):
        width = max(1 if d is None else len(d) for d in docs)
        out["doc_lengths"] = torch.zeros((b, width), dtype=torch.long)
        for i, (d, s) in enumerate(zip(docs, samples)):
            if d is None:
                continue
            out["doc_lengths"][i, : len(d)] = d
            out["targets"][i, torch.cumsum(d, 0) - 1] = -100  # a document's last token: the next is another's
        out["doc_lengths"][out["doc_lengths"].sum(1) == 0, 0] = out["attention_mask"].sum(1)[out["doc_lengths"].sum(1) == 0]
    for key in ("position", "sample_key"):
        if key in keys and pack_to is not None:
            out[key] = torch.stack(keys[key])
        elif key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    return out


