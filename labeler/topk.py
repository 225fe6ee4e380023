"""Top-k + exact tail from hidden states, one chunk of positions at a time.

The full ``[positions, vocab]`` logits are never held in fp32 at once: the LM
head is applied to ``chunk`` positions, the normalizer, top-k and tail are
computed for that chunk on the device, and only ``[chunk, k]`` ids/values and
one float per position are kept.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def topk_with_tail(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    k: int,
    temperature: float = 1.0,
    chunk: int = 1024,
    softcap: float | None = None,
    tail_samples: int = 0,
    generator: torch.Generator | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Label ``hidden`` ([N, H]) with the teacher's top-k and tail.

    Args:
        head: the LM head (``model.get_output_embeddings()``), mapping H -> V.
        k: entries kept per position; must be <= V.
        temperature: labeling temperature T; log-probs are of softmax(z / T).
        chunk: positions per head application (bounds peak memory, not results).
        softcap: final-logit soft-capping of models that use it (e.g. Gemma 2).
        tail_samples: S > 0 also draws S tokens per position from the teacher's
            distribution restricted to the tail (with replacement, ``generator``).
        targets: ``[N]`` ids of the tokens that follow (-1: none): their log-probs are returned too.

    Returns:
        ``(ids [N, k] int32, logprobs [N, k] float32, tail [N] float32)`` on the CPU,
        plus, with ``tail_samples``, the distinct sampled ids ``[N, S]`` int32 (left
        aligned) and their counts ``[N, S]`` uint8 (0 where unused; all 0 when
        nothing lies outside the top-k), and, with ``targets``, last, each target's log-prob ``[N]`` float32
        (NaN where the target is -1), normalized as the top-k (so a target in the top-k gets its entry's value).
        ``tail`` is ``log(sum of p outside the top-k)``: the sum over the rest
        itself, ``log(sum exp(z_rest/T - m)) - log(sum exp(z/T - m))`` in fp32 with
        ``m`` the top-1 logit, never ``log(1 - sum top-k)``; rows whose rest
        underflows are redone with a masked ``logsumexp`` (``-inf`` when k = V).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = hidden.shape[0]
    # Results stay on the device until the end: one host copy per call, not three per chunk.
    ids_out = torch.empty((n, k), dtype=torch.int32, device=hidden.device)
    lp_out = torch.empty((n, k), dtype=torch.float32, device=hidden.device)
    tail_out = torch.empty((n,), dtype=torch.float32, device=hidden.device)
    if targets is not None:
        if targets.shape != (n,):
            raise ValueError(f"targets {tuple(targets.shape)} for {n} positions")
        target_out = torch.empty((n,), dtype=torch.float32, device=hidden.device)
        targets = targets.to(hidden.device)
    if tail_samples:
        sid_out = torch.zeros((n, tail_samples), dtype=torch.int32, device=hidden.device)
        cnt_out = torch.zeros((n, tail_samples), dtype=torch.uint8, device=hidden.device)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        logits = _logits(hidden[start:end], head, temperature, softcap)
        if k > logits.shape[-1]:
            raise ValueError(f"k={k} exceeds the teacher's vocabulary of {logits.shape[-1]}")
        vals, ids = torch.topk(logits, k, dim=-1, sorted=True)
        if targets is not None:  # before the in-place exponentials below
            t = targets[start:end]
            picked = logits.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        # One exponential pass, in place: e = exp(z - max) (the max is the top-1
        # value), Z = sum(e); then zero the top-k entries and sum what is left.
        # The tail is that sum of the rest itself (no log(1 - p) cancellation).
        top1 = vals[:, :1]
        e = logits.sub_(top1).exp_()
        total = e.sum(-1)
        rest = e.scatter_(-1, ids, 0.0).sum(-1)
        log_total = total.log()
        norm = top1.squeeze(-1) + log_total
        tail = rest.log() - log_total
        if k < e.shape[-1]:
            # Rows whose rest underflowed in fp32 (mass < ~1e-38 of the top-1's): redo exactly.
            lost = (rest == 0).nonzero().squeeze(-1)
            if lost.numel():
                tail[lost] = _masked_tail(hidden[start:end][lost], head, ids[lost], temperature, softcap)
        if tail_samples:
            # e now holds exp(z - max) outside the top-k: the tail distribution, unnormalized.
            sid_out[start:end], cnt_out[start:end] = _sample_tail(e, rest > 0, tail_samples, generator)
        ids_out[start:end] = ids
        lp_out[start:end] = vals - norm.unsqueeze(-1)
        tail_out[start:end] = tail
        if targets is not None:
            target_out[start:end] = torch.where(t >= 0, picked - norm, float("nan"))
    out = (ids_out, lp_out, tail_out, *((sid_out, cnt_out) if tail_samples else ()),
           *((target_out,) if targets is not None else ()))
    return tuple(a.cpu() for a in out)


def _sample_tail(
    weights: torch.Tensor, ok: torch.Tensor, draws: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` ids per row from ``weights`` (rows where ``ok``), as distinct ids + counts."""
    n = weights.shape[0]
    ids = torch.zeros((n, draws), dtype=torch.int64, device=weights.device)
    rows = ok.nonzero().squeeze(-1)
    if rows.numel():
        ids[rows] = torch.multinomial(weights[rows], draws, replacement=True, generator=generator)
    ids, _ = ids.sort(dim=1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    group = first.long().cumsum(1) - 1  # slot of each draw's distinct id
    distinct = torch.zeros_like(ids).scatter_(1, group, ids)
    counts = torch.zeros_like(ids).scatter_add_(1, group, ok.long().unsqueeze(1).expand(-1, draws).contiguous())
    return distinct.to(torch.int32), counts.to(torch.uint8)


def _logits(hidden: torch.Tensor, head: torch.nn.Module, temperature: float, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _masked_tail(
    hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor, temperature: float, softcap: float | None
) -> torch.Tensor:
    """``logsumexp(z_rest) - logsumexp(z)`` with the top-k masked out: exact where exp underflows."""
    logits = _logits(hidden, head, temperature, softcap)
    norm = torch.logsumexp(logits, dim=-1)
    return torch.logsumexp(logits.scatter_(-1, ids, float("-inf")), dim=-1) - norm
