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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label ``hidden`` ([N, H]) with the teacher's top-k and tail.

    Args:
        head: the LM head (``model.get_output_embeddings()``), mapping H -> V.
        k: entries kept per position; must be <= V.
        temperature: labeling temperature T; log-probs are of softmax(z / T).
        chunk: positions per head application (bounds peak memory, not results).
        softcap: final-logit soft-capping of models that use it (e.g. Gemma 2).

    Returns:
        ``(ids [N, k] int32, logprobs [N, k] float32, tail [N] float32)`` on the CPU.
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
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        logits = _logits(hidden[start:end], head, temperature, softcap)
        if k > logits.shape[-1]:
            raise ValueError(f"k={k} exceeds the teacher's vocabulary of {logits.shape[-1]}")
        vals, ids = torch.topk(logits, k, dim=-1, sorted=True)
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
        ids_out[start:end] = ids
        lp_out[start:end] = vals - norm.unsqueeze(-1)
        tail_out[start:end] = tail
    return ids_out.cpu(), lp_out.cpu(), tail_out.cpu()


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
