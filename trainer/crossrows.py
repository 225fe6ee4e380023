"""The teacher's label rows rewritten for a student with another tokenizer (:mod:`softlabels.trainer.crosstok`
aligns the two tokenizations; this is the arithmetic on the rows): teacher ids that map to one student id summed
(:func:`merge`), the student's longer tokens given the teacher's probability of them along the text
(:func:`whole_next`), and the chunks of text both tokenizations split at (:func:`chunks`)."""

from __future__ import annotations

import numpy as np
import torch
from softlabels.schemas import Sample


def merge(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the probabilities of teacher entries that map to one student id summed into one entry; entries
    that map nowhere (-1) stay apart. Returns ``(student ids, log-probs, mapped)`` ``[n, k]``, rows in descending
    order of probability (ties in the teacher's order), emptied slots at the end (log-prob -1e30, unmapped)."""
    n, k = ids.shape
    key = np.where(ids >= 0, ids, -1 - np.arange(k))
    order = np.argsort(key, axis=1, kind="stable")
    key_s = np.take_along_axis(key, order, 1)
    p_s = np.exp(np.take_along_axis(logprobs.astype(np.float64), order, 1))
    new = np.ones((n, k), bool)
    new[:, 1:] = key_s[:, 1:] != key_s[:, :-1]
    group = np.cumsum(new, 1) - 1
    r = np.broadcast_to(np.arange(n)[:, None], (n, k))
    prob = np.zeros((n, k))
    np.add.at(prob, (r, group), p_s)
    gid = np.full((n, k), -1, np.int64)
    gid[r, group] = key_s
    first = np.full((n, k), k, np.int64)
    np.minimum.at(first, (r, group), order)
    o = np.argsort(first, axis=1, kind="stable")  # teacher order, then by probability (stable: ties keep it)
    o = np.take_along_axis(o, np.argsort(-np.take_along_axis(prob, o, 1), axis=1, kind="stable"), 1)
    prob, gid = np.take_along_axis(prob, o, 1), np.take_along_axis(gid, o, 1)
    mapped = (gid >= 0) & (prob > 0)
    with np.errstate(divide="ignore"):
        lp = np.where(prob > 0, np.log(np.maximum(prob, 1e-300)), -1e30)
    return np.where(mapped, gid, 0), lp.astype(np.float32), mapped


def target_sums(s: Sample, row_of: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Prefix counts over the teacher positions of those without a stored ``target_logprob`` (untrained, or no
    next token) and prefix sums of those with one: ``(bad, sums)``, each of length positions + 1, so that the span
    ``[a, b)`` has every log-prob iff ``bad[b] == bad[a]``, and then log-probability ``sums[b] - sums[a]``.
    None for a set without target log-probs."""
    if s.target_logprob is None:
        return None
    target = np.where(row_of >= 0, s.target_logprob[row_of.clip(0)], np.nan)
    good = np.isfinite(target)
    return (np.concatenate([[0], np.cumsum(~good)]),
            np.concatenate([[0.0], np.cumsum(np.where(good, target, 0).astype(np.float64))]))


def whole_next(s: Sample, ids: list[int], p: np.ndarray, aligned: np.ndarray, kd: np.ndarray, row_of: np.ndarray,
               to: np.ndarray, lp: np.ndarray, tail: np.ndarray,
               sums_t: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's rows at the KD positions (``to``: their ids mapped to student ids) with one more column:
    where the student's next token is longer than the teacher's and ends where a teacher token ends (the
    student writes `` learning`` where the teacher writes `` learn`` then ``ing``), the teacher's probability
    of the student's whole token is known along the text (the product of its ``target_logprob`` s over the
    teacher tokens it spans). That much of the mass on the teacher's first token (mapped to a shorter student
    token, which the student does not write here) goes to the student's own token. Rows elsewhere, and every
    row of a set without target log-probs (``sums_t`` None; else :func:`target_sums`), get an empty column."""
    m = len(to)
    extra_id = np.full((m, 1), -1, np.int64)
    extra_lp = np.full((m, 1), -1e30, np.float32)
    qs = np.flatnonzero(kd)
    if sums_t is not None and m:
        bad, sums = sums_t
        nxt = np.minimum(qs + 1, len(ids) - 1)
        ta, tb = p[qs], p[nxt]
        hit = (qs + 1 < len(ids)) & aligned[nxt] & (tb >= ta + 2) & (bad[tb] == bad[ta])
        if hit.any():
            lp, tail = lp.copy(), tail.copy()
            r = np.flatnonzero(hit)
            whole = np.exp(sums[tb[r]] - sums[ta[r]])  # the teacher's probability of the student's token
            first = np.asarray(s.input_ids)[ta[r] + 1]
            col = s.topk_ids[row_of[ta[r]]][:, :lp.shape[1]] == first[:, None]
            inside = col.any(1)
            j = col.argmax(1)
            have = np.where(inside, np.exp(lp[r, j].astype(np.float64)), np.exp(tail[r].astype(np.float64)))
            whole = np.minimum(whole, have)  # the stored values are rounded: never more than the first token's
            left = np.log(np.maximum(have - whole, 1e-30)).astype(np.float32)
            lp[r[inside], j[inside]] = left[inside]
            tail[r[~inside]] = left[~inside]
            extra_id[r, 0] = np.asarray(ids)[qs[r] + 1]
            extra_lp[r, 0] = np.log(np.maximum(whole, 1e-30))
    return np.concatenate([to, extra_id], 1), np.concatenate([lp, extra_lp], 1), tail


def chunks(aligned: np.ndarray, p: np.ndarray, ce: np.ndarray,
           sums_t: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
    """The text between consecutive aligned positions (both tokenizations have a boundary at both ends) as
    chunks: ``chunk_len`` at each chunk's first student position (its student positions), ``chunk_logprob``
    there (the teacher's log-probability of its bytes: the sum of the stored ``target_logprob`` along its
    teacher positions). A chunk counts only if every teacher position in it has that log-prob (trained, with
    a next token) and every student position in it has a trained next token. ``sums_t``: :func:`target_sums`."""
    n = len(aligned)
    chunk_len = np.zeros(n, np.int64)
    chunk_lp = np.zeros(n, np.float32)
    at = np.flatnonzero(aligned)
    if len(at) >= 2:
        bad_t, sum_t = sums_t
        bad_s = np.concatenate([[0], np.cumsum(~ce)])
        a, b = at[:-1], at[1:]
        ta, tb = p[a], p[b]
        ok = (tb > ta) & (bad_t[tb] == bad_t[ta]) & (bad_s[b] == bad_s[a])
        chunk_len[a[ok]] = (b - a)[ok]
        chunk_lp[a[ok]] = (sum_t[tb] - sum_t[ta])[ok]
    return {"chunk_len": torch.from_numpy(chunk_len), "chunk_logprob": torch.from_numpy(chunk_lp)}
