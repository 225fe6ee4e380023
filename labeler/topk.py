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
        ``tail`` is ``log(sum of p outside the top-k)``, computed as
        ``logsumexp(z_rest / T) - logsumexp(z / T)`` in fp32 (``-inf`` when k = V).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = hidden.shape[0]
    ids_out = torch.empty((n, k), dtype=torch.int32)
    lp_out = torch.empty((n, k), dtype=torch.float32)
    tail_out = torch.empty((n,), dtype=torch.float32)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        logits = head(hidden[start:end]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if temperature != 1.0:
            logits = logits / temperature
        if k > logits.shape[-1]:
            raise ValueError(f"k={k} exceeds the teacher's vocabulary of {logits.shape[-1]}")
        norm = torch.logsumexp(logits, dim=-1)
        vals, ids = torch.topk(logits, k, dim=-1, sorted=True)
        # The tail: logsumexp over everything not in the top-k, by masking the
        # top-k out in place (the chunk's logits are not needed afterwards).
        logits.scatter_(-1, ids, float("-inf"))
        tail = torch.logsumexp(logits, dim=-1) - norm
        ids_out[start:end] = ids.to("cpu", torch.int32)
        lp_out[start:end] = (vals - norm.unsqueeze(-1)).cpu()
        tail_out[start:end] = tail.cpu()
    return ids_out, lp_out, tail_out
