"""Packed sequences without cross-document attention, for the teacher (labeler) and the student (trainer).

A packed sequence holds several documents back to back (``doc_lengths``). Each document
must see only itself: positions restart at 0 at each document, and attention is causal
within a document and blocked across documents (a block-diagonal causal mask, given to
the model as a 4-D mask, which transformers passes to SDPA as it is).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def packed_inputs(docs: Sequence[Sequence[int] | None], maxlen: int, mask: Any, additive: Any = None) -> dict[str, Any]:
    """``position_ids`` restarting at each packed document and a block-diagonal causal ``attention_mask``
    ``[B, 1, T, T]`` (bool, True = attend): a token sees the earlier tokens of its own document only.
    Padding attends to itself (a row with no key would give NaN in SDPA). ``additive``: a float dtype
    for models whose attention adds the mask to the scores (eager) instead of a boolean one."""
    import torch

    b = len(docs)
    segment = torch.full((b, maxlen), -1, dtype=torch.long)
    positions = torch.zeros((b, maxlen), dtype=torch.long)
    for row, lengths in enumerate(docs):
        n = int(mask[row].sum())
        start = 0
        for d, length in enumerate(lengths or (n,)):
            segment[row, start:start + length] = d
            positions[row, start:start + length] = torch.arange(length)
            start += length
    causal = torch.ones((maxlen, maxlen), dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
    allowed = (same & causal) | torch.eye(maxlen, dtype=torch.bool)
    blocks: Any = allowed[:, None]
    if additive is not None:  # eager attention adds the mask to the scores
        blocks = torch.zeros(blocks.shape, dtype=additive).masked_fill(~blocks, torch.finfo(additive).min)
    return {"attention_mask": blocks, "position_ids": positions}
