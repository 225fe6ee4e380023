"""Held-out metrics: CE on true tokens, bits per byte, KL(teacher || student), top-1 agreement."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

import torch
from softlabels.schemas.errors import UserError
from softlabels.trainer.data import LabelDataset, collate, model_inputs
from softlabels.trainer.losses import label_positions, position_loss
from torch.utils.data import DataLoader


def _move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


SUMS = 9  # CE, KL, top-1 agreements, labeled positions, true-next-token positions, their bytes (NaN: unknown),
# and (a student with another tokenizer) teacher positions with labels, of them aligned, mapped teacher mass


def score_batch(hidden: torch.Tensor, head: Any, batch: dict[str, torch.Tensor], chunk: int) -> np.ndarray:
    """A batch's sums (:data:`SUMS`)."""
    h, ids, lps, tail, tgt, _, extra = label_positions(hidden, batch)
    mapped, kd = extra.get("mapped"), extra.get("kd")
    out = np.zeros(SUMS)
    for s in range(0, h.shape[0], chunk):
        e = min(h.shape[0], s + chunk)
        logits = head(h[s:e]).float()
        if mapped is None:
            out[1] += float(position_loss(logits, "tail-kl", ids[s:e], lps[s:e], tail[s:e]).sum())
            out[2] += int((logits.argmax(-1) == ids[s:e, 0]).sum())
        else:  # across tokenizers: at aligned positions, over the mapped ids (an unmapped top-1 is never agreed on)
            at = kd[s:e]
            out[1] += float((position_loss(logits, "xtok-kl", ids[s:e], lps[s:e], tail[s:e], mapped=mapped[s:e]) * at).sum())
            out[2] += int(((logits.argmax(-1) == ids[s:e, 0]) & mapped[s:e, 0] & at).sum())
        out[0] += float(position_loss(logits, "ce", targets=tgt[s:e]).sum())
    out[3] = h.shape[0] if kd is None else int(kd.sum())
    out[4] = int((tgt != -100).sum())
    out[5] = int(extra["bytes"][tgt != -100].sum()) if "bytes" in extra else float("nan")
    if "xtok_stats" in batch:
        out[6:] = batch["xtok_stats"].double().cpu().numpy()
    return out


@torch.no_grad()
def evaluate(
    model: Any,
    dataset: LabelDataset,
    batch_size: int = 8,
    max_batches: int | None = None,
    chunk: int = 1024,
    score: Callable[[dict[str, torch.Tensor]], np.ndarray] | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``dataset`` (one pass).

    ``model`` is a transformers causal LM or anything with a
    ``logits(input_ids, attention_mask)`` method, such as an exported model
    (:class:`trainer.export.OnnxCausalLM`, :class:`trainer.gguf.GGUFCausalLM`), which is scored on the CPU.

    Returns ``ce`` (nats per true next token), ``bpb`` (bits per byte of the text those tokens
    cover, comparable across tokenizers; None when the bytes are unknown), ``kl`` (forward KL over the
    stored top-k + tail buckets, nats per labeled position), ``top1`` (share
    of positions where the student's argmax is the teacher's top-1), and the
    counts they were computed over; for a student with another tokenizer also ``aligned`` (share of
    the teacher's labeled positions aligned with a student position, where KL and top-1 are measured)
    and ``mapped_mass`` (the teacher's mean probability on ids that map to student ids there). ``score``: a batch's sums (:func:`score_batch`) computed
    some other way (a sharded student scores inside its own forward).
    """
    if not isinstance(model, torch.nn.Module) and callable(getattr(model, "logits", None)):  # an exported model: full logits, identity head
        was_training, device = False, torch.device("cpu")

        def states(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            if "doc_lengths" in batch:
                if getattr(model, "takes_documents", False):  # a GGUF model runs each document alone
                    return model.logits(batch["input_ids"], batch["attention_mask"], batch["doc_lengths"])
                # an ONNX graph takes a 2-D mask: documents would see each other
                raise UserError(f"{dataset.labels.url} packs several documents per sequence; an ONNX export "
                                "cannot keep them apart: evaluate the PyTorch student (or a GGUF export) instead")
            return model.logits(batch["input_ids"], batch["attention_mask"])

        head: Any = torch.nn.Identity()
    else:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        body, head = model.get_decoder(), model.get_output_embeddings()

        def states(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return body(**model_inputs(batch, model)).last_hidden_state

    sums = np.zeros(SUMS)
    seqs = 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        batch = _move(batch, device)
        sums += score(batch) if score is not None else score_batch(states(batch), head, batch, chunk)
        seqs += batch["input_ids"].shape[0]
    ce_sum, kl_sum, agree, n_pos, n_tgt, n_bytes, t_pos, t_aligned, t_mass = sums.tolist()
    n_pos, n_tgt = int(n_pos), int(n_tgt)
    if was_training:
        model.train()
    if n_pos == 0:
        if getattr(dataset, "textless", 0):  # every sample gave nothing to a model with another tokenizer
            raise UserError(f"the {dataset.split} split of {dataset.labels.url} has no text to score: its "
                            f"{dataset.textless} sample(s) give none (their token spans cover no bytes), and a model "
                            "with another tokenizer is scored on the text: relabel the set, or score a model with the "
                            "set's own tokenizer")
        raise UserError("the eval split is empty: raise --eval-fraction or label more data")
    out = {
        "ce": ce_sum / max(1, n_tgt),
        "ppl": math.exp(min(50.0, ce_sum / max(1, n_tgt))),
        "bpb": ce_sum / math.log(2) / n_bytes if math.isfinite(n_bytes) and n_bytes > 0 else None,  # NaN: bytes unknown
        "kl": kl_sum / n_pos,
        "top1": int(agree) / n_pos,
        "positions": n_pos,
        "sequences": seqs,
    }
    if t_pos > 0:
        out.update(aligned=t_aligned / t_pos, mapped_mass=t_mass / max(1.0, t_aligned))
    return out
