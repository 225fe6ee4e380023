"""The tokenizers read tasks use: the Rust tokenizer behind a fast HF one, checked on a probe text."""

from __future__ import annotations

from typing import Any

from softlabels.common.tokenbytes import PROBE_TEXT


class BackendTokenizer:
    """The Rust tokenizer behind a fast Hugging Face tokenizer, called the way the HF one calls it.

    What the parallel read tasks tokenize with: unpickling it imports ``tokenizers`` only,
    not transformers and torch, which is seconds of CPU per read worker at start-up.
    """

    def __init__(self, tokenizer: Any) -> None:
        import copy

        self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    def __call__(self, texts: str | list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.backend.encode(texts, add_special_tokens=add_special_tokens).ids}
        return {"input_ids": [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]}


def reading_tokenizer(tokenizer: Any) -> Any:
    """What read tasks tokenize with: :class:`BackendTokenizer` when it gives the HF tokenizer's ids on
    :data:`PROBE_TEXT`, else the HF tokenizer itself (a slow tokenizer, or one that adds Python steps)."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return tokenizer
    try:
        light = BackendTokenizer(tokenizer)
        same = light([PROBE_TEXT])["input_ids"] == tokenizer([PROBE_TEXT], add_special_tokens=False)["input_ids"]
    except Exception:  # an unusual backend: the HF tokenizer is always right
        return tokenizer
    return light if same else tokenizer
