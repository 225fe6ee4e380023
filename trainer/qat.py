"""Quantization-aware distillation: ``softlabels train --qat q8_0|q4``.

The student's forward uses its weights as llama.cpp will store them after
``softlabels export --format gguf --quant q8_0|q4_0``: every weight matrix of
the decoder blocks, the embedding and the LM head (tied or not) whose rows are a multiple of 32
long goes through the same block quantization llama.cpp's reference quantizer applies (ggml-quants.c,
``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``), as the export (``--pure``) writes it; a matrix whose rows
are not (``tiny``'s 688-wide ``down_proj``) is rounded to fp16, as the file stores it. The backward is straight-through
(the gradient of the quantized weight goes to the fp32 weight unchanged), so the
weights learn to sit where quantization costs least. What is saved is the fp32
weights; the export quantizes them to exactly the forward's values (tested:
the quantized GGUF read back equals this forward's weights).

q8_0, per block of 32 values x: ``d = max|x| / 127`` (stored as fp16), ``q = round(x / d)``,
value ``q * d``. q4_0: ``m`` the value of largest magnitude (the first one), ``d = m / -8`` (fp16),
``q = min(15, floor(x / d + 8.5))``, value ``(q - 8) * d``.
"""

from __future__ import annotations

from typing import Any

import torch

from softlabels.trainer.config import QAT_MODES

QAT_EXPORT = {"q8_0": "q8_0", "q4": "q4_0"}  # the --quant whose file holds exactly the trained forward's weights
BLOCK = 32


def _blocks(w: torch.Tensor) -> torch.Tensor:
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even). Not ``floor(|x| + 0.5)``: for the float
    just below 0.5 that sum rounds up to 1.0 in fp32, where roundf gives 0."""
    t = torch.trunc(x)
    return torch.where((x - t).abs() == 0.5, t + torch.sign(x), torch.round(x))


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """``w`` (last dim a multiple of 32) as q8_0 stores it, dequantized, in ``w``'s dtype."""
    x = _blocks(w)
    d = x.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = _round_away(x * inv)
    return (q * d.half().float()).reshape(w.shape).to(w.dtype)


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """``w`` (last dim a multiple of 32) as q4_0 stores it, dequantized, in ``w``'s dtype."""
    x = _blocks(w)
    first = x.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes, as the C loop keeps it
    d = x.gather(-1, first) / -8
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.floor(x * inv + 8.5), max=15)
    return ((q - 8) * d.half().float()).reshape(w.shape).to(w.dtype)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fn: Any) -> torch.Tensor:  # noqa: ARG004
        return fn(w.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ARG004
        return grad, None


def fake_quant(w: torch.Tensor, fn: Any) -> torch.Tensor:
    """``fn(w)`` forward, identity backward (straight-through)."""
    return _STE.apply(w, fn)


def plan(model: Any, mode: str) -> dict[str, str]:
    """``{parameter name: 'q8_0'|'q4_0'|'f16'}``: the type the GGUF export gives each weight matrix of
    ``model`` (``f16`` where rows are not a multiple of 32: llama.cpp's fallback, rounded to fp16 here too)."""
    if mode not in QAT_MODES:
        raise ValueError(mode)
    body = QAT_EXPORT[mode]
    out = {}
    for name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        fits = p.shape[-1] % BLOCK == 0
        out[name] = body if fits else "f16"
    return out


def round_f16(w: torch.Tensor) -> torch.Tensor:
    """``w`` as an fp16 tensor of the file stores it (llama.cpp's fallback for rows that fit no block)."""
    return w.half().to(w.dtype)


_FNS = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "f16": round_f16}


def apply_qat(model: Any, mode: str) -> dict[str, str]:
    """Make ``model``'s forward use its weights as the ``mode`` GGUF export stores them (see the module doc).

    Patches the ``forward`` of the decoder's linear layers and of the embedding and LM head (tied or not);
    the parameters and ``state_dict`` stay the fp32 weights. Returns :func:`plan`'s map. Idempotent.
    """
    import torch.nn.functional as F

    if getattr(model, "_softlabels_qat", None) == mode:
        return plan(model, mode)
    if getattr(model, "_softlabels_qat", None):
        raise ValueError(f"already quantization-aware ({model._softlabels_qat})")
    kinds = plan(model, mode)
    by_param = {id(p): kinds[n] for n, p in model.named_parameters() if n in kinds}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()

    def linear(mod: torch.nn.Linear, fn: Any) -> None:
        mod.forward = lambda x: F.linear(x, fake_quant(mod.weight, fn), mod.bias)

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) in by_param:
            linear(mod, _FNS[by_param[id(mod.weight)]])
    if id(emb.weight) in by_param:
        fn = _FNS[by_param[id(emb.weight)]]
        emb.forward = lambda ids: F.embedding(ids, fake_quant(emb.weight, fn), emb.padding_idx)
    model._softlabels_qat = mode
    del head  # patched above as a Linear (tied or not)
    return kinds
