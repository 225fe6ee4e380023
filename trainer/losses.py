"""Distillation losses against stored top-k + tail labels.

All losses work on the student's hidden states one chunk of positions at a
time (:func:`chunked_loss`), so the full ``[positions, vocab]`` student
logits are never held at once; when a batch spans several chunks, each chunk
is recomputed in backward (activation checkpointing) instead of being kept in
fp32 (a batch of one chunk is not: that would save no memory, only add work).

Per position, with teacher buckets ``t = [log p_1..log p_k, log p_tail]``:

- ``tail-kl`` (default): KL(p || q) over the k+1 buckets; the student's tail
  bucket is the log of its mass outside the teacher's top-k ids. Equals the
  full-vocabulary KL when k = |V|.
- ``topk-kl``: KL over the top-k only, both sides renormalized (drops the
  tail; biased, kept for comparison).
- ``reverse-kl``: KL(q || p) over the k+1 buckets (exact over them, gradient included).
- ``reverse-kl-sampled``: the per-token reverse-KL estimate of on-policy distillation on responses a model
  wrote: at each position, ``log q(y) - log p(y)`` for the token ``y`` that follows (``p`` from the stored
  ``target_logprob``, exact even outside the top-k), with the score-function gradient
  ``(log q(y) - log p(y)) * grad log q(y)``, whose expectation over ``y ~ q`` is the gradient of KL(q || p)
  at that position. The value is the estimate; positions without a target log-prob carry none. On a set that
  stores the generator's log-probs (``sampler_logprob``), each position is weighted by the truncated importance
  ratio ``min(q(y) / q_sampler(y), cap)`` (detached; ``--importance-cap``, 0: none), so responses written by another
  model, or by the student before this run's updates, estimate the current student's reverse KL.
- ``kl-mix``: ``(1 - w) KL(p || q) + w KL(q || p)`` over the k+1 buckets (``--reverse-weight w``).
- ``tail-sampled``: ``tail-kl`` plus an unbiased estimate of what the tail
  bucket hides, from S tokens the labeler drew from the teacher's tail
  (``--tail-samples``): ``p_tail * sum_j c_j/S * -log(q_j / q_tail)``, the
  cross-entropy between teacher and student *within* the tail. Its expectation
  adds ``p_tail * (KL_within + H_within(teacher))`` to ``tail-kl``: the gradient is
  that of the full-vocabulary KL (unbiased); the value is offset by a constant.
- ``xtok-kl`` (students with another tokenizer, :mod:`softlabels.trainer.crosstok`): ``tail-kl`` over
  the teacher ids that map to student ids (the same byte string), with the teacher's mass on ids that
  do not map joined to its tail bucket, against the student's mass outside the mapped ids.
- ``xtok-uld`` (the default with another tokenizer): ``xtok-kl`` plus a ULD term (Boizard et al. 2024)
  for the mass that does not map: the L1 distance between the teacher's unmapped top-k probabilities,
  sorted, and the student's largest probabilities outside the mapped ids, sorted, entry by entry.
  With every id mapped (the same tokenizer) it is 0: both reduce to ``tail-kl`` exactly.
  Student positions that align with no teacher position take CE on their true next token in the
  KD term instead (:func:`chunked_loss`).
- ``ce``: cross-entropy on the true next tokens (no teacher).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from softlabels.trainer.config import DEFAULT_CHUNK_DISTANCE, LOSSES  # names live with the config (no torch)
from torch.utils.checkpoint import checkpoint

_NEG = -1e30  # stands in for log(0) where -inf would poison gradients


_TAIL_EPS = 1e-6  # smallest student tail mass represented (fp32 cannot tell 1 - 1e-8 from 1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Maechler 2012)."""
    x = x.clamp(max=torch.log1p(torch.tensor(-_TAIL_EPS)).item())
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _buckets(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float, extra_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Student log-probs gathered at the teacher's top-k ids, of the rest, and at ``extra_ids``.

    The rest is ``log1mexp(logsumexp(top))``: no second ``[N, V]`` pass over
    the vocabulary (a masked logsumexp would cost as much as the softmax).
    """
    logits = student_logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    ls = torch.log_softmax(logits, dim=-1)
    top = ls.gather(-1, topk_ids)
    rest = log1mexp(torch.logsumexp(top, dim=-1))
    return top, rest, None if extra_ids is None else ls.gather(-1, extra_ids)


def _teacher_buckets(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    t = torch.cat([topk_logprobs.float(), tail_logprob.float().unsqueeze(-1)], dim=-1)
    t = t.clamp_min(_NEG)
    # Stored log-probs are rounded (fp16); renormalize so the k+1 buckets sum to 1 exactly.
    return t - torch.logsumexp(t, dim=-1, keepdim=True)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) over the last dim, with 0 log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def position_loss(
    student_logits: torch.Tensor,
    kind: str,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    tail_logprob: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    tail_samples: tuple[torch.Tensor, torch.Tensor] | None = None,
    mapped: torch.Tensor | None = None,
    reverse_weight: float = 0.5,
) -> torch.Tensor:
    """Per-position loss ``[N]`` for student logits ``[N, V]``.

    KD kinds need the teacher columns; ``ce`` needs ``targets`` (positions with
    target -100 get 0); ``tail-sampled`` needs ``tail_samples`` = (ids, counts)
    ``[N, S]``; ``xtok-*`` take ``mapped`` ``[N, k]`` (which teacher entries map to a student
    id; None: all). KD losses are scaled by ``temperature ** 2`` (Hinton).
    """
    if kind == "ce":
        return F.cross_entropy(student_logits.float(), targets, ignore_index=-100, reduction="none")
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")
    if kind == "tail-sampled" and tail_samples is None:
        raise ValueError("loss 'tail-sampled' needs tail samples (label with --tail-samples S)")
    if kind == "reverse-kl-sampled":
        raise ValueError("reverse-kl-sampled is a per-token estimate over whole batches: use chunked_loss")
    if kind.startswith("xtok-"):
        return _cross_tokenizer(student_logits, kind, topk_ids, topk_logprobs, tail_logprob, temperature, mapped)
    top, rest, drawn = _buckets(student_logits, topk_ids, temperature, tail_samples[0] if kind == "tail-sampled" else None)
    if kind == "topk-kl":
        t = topk_logprobs.float()
        t = t - torch.logsumexp(t, -1, keepdim=True)
        s = top - torch.logsumexp(top, -1, keepdim=True)
        loss = _kl(t, s)
    else:
        t = _teacher_buckets(topk_logprobs, tail_logprob)
        s = torch.cat([top, rest.unsqueeze(-1)], dim=-1).clamp_min(_NEG)
        if kind == "kl-mix":
            loss = (1 - reverse_weight) * _kl(t, s) + reverse_weight * _kl(s, t)
        else:
            loss = _kl(s, t) if kind == "reverse-kl" else _kl(t, s)
        if kind == "tail-sampled":
            counts = tail_samples[1].float()
            weights = counts / counts.sum(-1, keepdim=True).clamp_min(1)  # rows without a tail: all 0
            within = -(weights * (drawn - rest.unsqueeze(-1))).sum(-1)  # -E_j[log q(j | tail)]
            loss = loss + t[..., -1].exp() * within
    return loss * temperature**2


def _cross_tokenizer(logits: torch.Tensor, kind: str, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                     tail_logprob: torch.Tensor, temperature: float, mapped: torch.Tensor | None) -> torch.Tensor:
    """``xtok-kl`` / ``xtok-uld`` per position (see the module doc)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    ls = torch.log_softmax(x, dim=-1)
    if mapped is None:
        mapped = torch.ones_like(topk_ids, dtype=torch.bool)
    t = _teacher_buckets(topk_logprobs, tail_logprob)
    k = topk_ids.shape[-1]
    t_top, t_tail = t[..., :k], t[..., k:]
    neg = torch.full_like(t_top, _NEG)
    t_rest = torch.logsumexp(torch.cat([t_tail, torch.where(mapped, neg, t_top)], -1), -1, keepdim=True)
    s_top = torch.where(mapped, ls.gather(-1, topk_ids), neg)
    s_rest = log1mexp(torch.logsumexp(s_top, dim=-1, keepdim=True))
    loss = _kl(torch.cat([torch.where(mapped, t_top, neg), t_rest], -1), torch.cat([s_top, s_rest], -1).clamp_min(_NEG))
    if kind == "xtok-uld" and bool((~mapped).any()):
        unmapped = torch.where(mapped, torch.zeros_like(t_top), t_top.exp()).sort(-1, descending=True).values
        taken = torch.zeros_like(ls, dtype=torch.uint8).scatter_reduce(-1, topk_ids, mapped.to(torch.uint8), "amax")
        q = ls.exp().masked_fill(taken.bool(), 0.0).topk(k, dim=-1).values
        n_unmapped = (~mapped).sum(-1, keepdim=True)
        within = torch.arange(k, device=q.device).expand_as(q) < n_unmapped
        loss = loss + torch.where(within, (unmapped - q).abs(), torch.zeros_like(q)).sum(-1)
    return loss * temperature**2


def sampled_reverse_kl(student_logq: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Per position, the reverse-KL estimate ``log q(y) - log p(y)`` as the value, with the score-function gradient
    ``(log q(y) - log p(y)) * grad log q(y)`` (see the module doc); ``y`` is the token that follows."""
    advantage = (student_logq - teacher_logp).detach()
    return advantage + advantage * (student_logq - student_logq.detach())


def binary_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(a) || Bernoulli(b)) from ``log a`` and ``log b`` (both <= 0), elementwise: the distance
    approximate likelihood matching puts between two probabilities of one event (here, a chunk of text)."""
    log_a = log_a.clamp(max=-1e-7)
    log_b = log_b.clamp(max=-1e-7)
    a = log_a.exp()
    return a * (log_a - log_b) + (1 - a) * (log1mexp(log_a) - log1mexp(log_b))


def surprisal_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """The generalized KL between the two surprisals ``u = -log a`` and ``v = -log b`` of one event, elementwise:
    ``u log(u / v) - u + v`` (>= 0, 0 where they are equal). It is the binary KL of the tempered probabilities
    ``a**(1/T)`` and ``b**(1/T)``, times T, as T grows (approximate likelihood matching's temperature, in its limit).
    Unlike :func:`binary_kl` it weighs an unlikely chunk as much as a likely one: its gradient in ``log b`` is
    ``u / v - 1``, the student's log-probability of the text pulled up by the share its surprisal exceeds the
    teacher's (down where it is below)."""
    u = (-log_a).clamp(min=1e-6)
    v = (-log_b).clamp(min=1e-6)
    return u * (u / v).log() - u + v


CHUNK_DISTANCE = {"surprisal": surprisal_kl, "binary": binary_kl}


def chunk_members(chunk_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``chunk_len`` (per flat position: a chunk's length at its first position, 0 elsewhere): the chunks'
    first positions ``[C]``, and every member position ``[M]`` with the chunk it belongs to ``[M]``."""
    flat = chunk_len.reshape(-1)
    starts = flat.nonzero().squeeze(-1)
    lens = flat[starts]
    which = torch.repeat_interleave(torch.arange(len(starts), device=flat.device), lens)
    offsets = torch.arange(len(which), device=flat.device) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    return starts, starts[which] + offsets, which


def chunk_likelihood(student_logq: torch.Tensor, positions: torch.Tensor, batch: dict[str, torch.Tensor],
                     distance: str = DEFAULT_CHUNK_DISTANCE) -> tuple[torch.Tensor, int]:
    """The chunk term: ``sum over chunks of D(P_teacher(chunk), P_student(chunk))``, ``D`` the ``distance``:
    ``binary`` (default), KL(Bernoulli(P_teacher) || Bernoulli(P_student)) (:func:`binary_kl`), or ``surprisal``
    (:func:`surprisal_kl`, since 0.11).

    A chunk is a span of the text where both tokenizations have a boundary at both ends (with one tokenizer:
    one token); ``batch["chunk_len"]`` marks each at its first position with its number of student positions,
    ``batch["chunk_logprob"]`` holds there the teacher's log-probability of the chunk (the sum of the stored
    ``target_logprob`` along it). The student's is the sum of its own log-probs of its next tokens along it:
    ``student_logq`` at the flat ``positions`` it was computed for (which hold every chunk's members).
    Returns the sum over chunks and their number."""
    starts, members, which = chunk_members(batch["chunk_len"])
    if not len(starts):
        return student_logq.new_zeros(()), 0
    where = torch.full((batch["chunk_len"].numel(),), -1, dtype=torch.long, device=student_logq.device)
    where[positions] = torch.arange(len(positions), device=student_logq.device)
    at = where[members]
    if bool((at < 0).any()):
        raise ValueError("a chunk covers a position without a label (the batch's chunks and masks disagree)")
    student = torch.zeros(len(starts), dtype=student_logq.dtype, device=student_logq.device).index_add(
        0, which, student_logq[at])
    teacher = batch["chunk_logprob"].reshape(-1)[starts].to(student.dtype)
    return CHUNK_DISTANCE[distance](teacher, student).sum(), len(starts)


def label_positions(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[Any, ...]:
    """Flatten a batch to its labeled positions.

    Returns ``(hidden [N, H], topk_ids, topk_logprobs, tail, targets, tail_samples, extra)``;
    ``tail_samples`` is ``(ids, counts) [N, S]`` when the batch carries them, else None; ``extra``
    holds what the batch has of ``mapped`` ``[N, k]``, ``kd`` ``[N]`` (positions with KD: a student
    with another tokenizer) and ``bytes`` ``[N]`` (of each next token).
    """
    idx = batch["label_mask"].reshape(-1).nonzero().squeeze(-1)
    k = batch["topk_ids"].shape[-1]
    samples = None
    if "tail_sample_ids" in batch:
        draws = batch["tail_sample_ids"].shape[-1]
        samples = (batch["tail_sample_ids"].reshape(-1, draws)[idx], batch["tail_sample_counts"].reshape(-1, draws)[idx])
    extra = {}
    for key, name in (("topk_mapped", "mapped"), ("kd_mask", "kd"), ("target_bytes", "bytes"), ("chunk_len", "chunk"),
                      ("chunk_logprob", "target"), ("sampler_logprob", "sampler")):
        if key in batch:
            v = batch[key]
            extra[name] = (v.reshape(-1, k) if key == "topk_mapped" else v.reshape(-1))[idx]
    return (
        hidden.reshape(-1, hidden.shape[-1])[idx],
        batch["topk_ids"].reshape(-1, k)[idx],
        batch["topk_logprobs"].reshape(-1, k)[idx],
        batch["tail_logprob"].reshape(-1)[idx],
        batch["targets"].reshape(-1)[idx],
        samples,
        extra,
    )


def chunked_loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    kind: str,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    alpha: float = 1.0,
    chunk: int = 1024,
    chunk_weight: float = 0.0,
    reverse_weight: float = 0.5,
    importance_cap: float = 2.0,
    chunk_distance: str = DEFAULT_CHUNK_DISTANCE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch from student hidden states ``[B, T, H]``.

    ``alpha`` weighs the KD term against CE on the true next tokens:
    ``alpha * KD + (1 - alpha) * CE`` (ignored for ``kind="ce"``). A student with another tokenizer
    (a batch with ``kd_mask``) has teacher labels at its aligned positions only: its KD term takes the
    true next token's CE at the others (the only label there), so no trained position goes untrained.
    ``chunk_weight`` adds that weight times the chunk likelihood term (:func:`chunk_likelihood` with
    ``chunk_distance``, mean over chunks): it needs a batch with ``chunk_len``/``chunk_logprob`` (a label set with
    ``target_logprob``).
    Returns the scalar loss and its parts (KD over label positions, CE over
    positions with a true next token, the chunk term), for logging.
    """
    h, ids, lps, tail, targets, drawn, extra = label_positions(hidden, batch)
    mapped, kd_at = extra.get("mapped"), extra.get("kd")
    sampled = kind == "reverse-kl-sampled"
    if sampled:
        if "target" not in extra or kd_at is not None:
            raise ValueError("loss 'reverse-kl-sampled' needs the teacher's log-prob of each next token (a label set "
                             "with target_logprob) and the set's tokenizer")
        # one tokenizer: a position whose next token the teacher scored is a chunk of one token
        kd_at = (extra["chunk"] == 1) & (targets != -100)
        target_lp = extra["target"]
        sampler_lp = extra.get("sampler") if importance_cap > 0 else None
    if kind == "tail-sampled" and drawn is None:
        raise ValueError("loss 'tail-sampled' needs a label set with tail samples (labeler --tail-samples S)")
    use_kd = kind != "ce" and alpha > 0
    use_ce = kind == "ce" or alpha < 1
    kd_sum = h.new_zeros((), dtype=torch.float32)
    ce_sum = h.new_zeros((), dtype=torch.float32)
    use_chunks = chunk_weight > 0
    if use_chunks and "chunk_len" not in batch:
        raise ValueError("a chunk term needs batches with chunk_len and chunk_logprob (a label set with target_logprob)")
    logq = []  # the student's log-prob of each position's next token, for the chunk term

    def piece(hc: torch.Tensor, ic: torch.Tensor, lc: torch.Tensor, tc: torch.Tensor, tg: torch.Tensor,
              di: torch.Tensor | None, dc: torch.Tensor | None, mc: torch.Tensor | None, kc: torch.Tensor | None,
              tl: torch.Tensor | None, sl: torch.Tensor | None):
        logits = head(hc)
        ts = (di, dc) if di is not None else None
        ce_at = (position_loss(logits, "ce", targets=tg) if use_ce or use_chunks or sampled or (use_kd and kc is not None)
                 else None)
        if use_kd and sampled:  # the reverse-KL estimate where the teacher scored the next token, nothing elsewhere
            lq = -ce_at.float()
            per = sampled_reverse_kl(lq, tl)
            if sl is not None:  # truncated importance weights: the current student over the sampler
                per = per * (lq.detach() - sl).clamp(max=math.log(importance_cap)).exp()
            kd = torch.where(kc, per, torch.zeros_like(tl)).sum()
        elif use_kd:
            per = position_loss(logits, kind, ic, lc, tc, temperature=temperature, tail_samples=ts, mapped=mc,
                                reverse_weight=reverse_weight)
            if kc is not None:  # across tokenizers: the teacher's label where aligned, the true next token elsewhere
                per = torch.where(kc, per, ce_at)
            kd = per.sum()
        else:
            kd = hc.new_zeros(())
        ce = ce_at.sum() if use_ce else hc.new_zeros(())
        return kd.float(), ce.float(), (-ce_at.float() if use_chunks else hc.new_zeros((0,)))

    # Several chunks: each chunk's logits are recomputed in the backward (checkpoint), so one chunk's [chunk, V]
    # logits live at a time. One chunk: nothing to save by recomputing (its logits are rebuilt while the model's
    # activations are alive either way), and the recompute is a third more head work, which dominates a small
    # student's step (tiny student, 1,024 positions x 49,152 rows: 2.14 -> 1.5-1.6 s a step on the 2-core host).
    recompute = torch.is_grad_enabled() and h.requires_grad and h.shape[0] > chunk
    for s in range(0, h.shape[0], chunk):
        e = min(h.shape[0], s + chunk)
        args = (h[s:e], ids[s:e], lps[s:e], tail[s:e], targets[s:e],
                *((drawn[0][s:e], drawn[1][s:e]) if drawn is not None else (None, None)),
                None if mapped is None else mapped[s:e], None if kd_at is None else kd_at[s:e],
                target_lp[s:e] if sampled else None,
                sampler_lp[s:e] if sampled and sampler_lp is not None else None)
        if recompute:
            kd, ce, lq = checkpoint(piece, *args, use_reentrant=False)
        else:
            kd, ce, lq = piece(*args)
        kd_sum = kd_sum + kd
        ce_sum = ce_sum + ce
        logq.append(lq)
    n_kd = max(1, h.shape[0] if kd_at is None else int(kd_at.sum() if sampled else (kd_at | (targets != -100)).sum()))
    n_ce = max(1, int((targets != -100).sum()))
    kd_mean, ce_mean = kd_sum / n_kd, ce_sum / n_ce
    if kind == "ce":
        total = ce_mean
    else:
        total = alpha * kd_mean + (1 - alpha) * ce_mean if use_ce else kd_mean
    parts = {"ce": float(ce_mean.detach()) if use_ce else float("nan")}
    if use_kd:
        parts["kd"] = float(kd_mean.detach())
    if use_chunks:
        chunk_sum, n_chunks = chunk_likelihood(torch.cat(logq), batch["label_mask"].reshape(-1).nonzero().squeeze(-1), batch,
                                               chunk_distance)
        chunk_mean = chunk_sum / max(1, n_chunks)
        total = total + chunk_weight * chunk_mean
        parts["chunk"] = float(chunk_mean.detach())
    return total, parts
