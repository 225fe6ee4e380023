"""Fingerprints and content addresses.

Tokenizer fingerprints are duck-typed (anything with ``get_vocab()`` and
``special_tokens_map``, e.g. a Hugging Face tokenizer) so this module never
imports transformers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Return ``sha256:<hex>`` over the tokenizer's vocabulary and special tokens.

    Two tokenizers with the same token->id map and the same special tokens get
    the same fingerprint, whatever directory or class they were loaded from.
    """
    vocab = tokenizer.get_vocab()
    specials = {k: str(v) for k, v in sorted(dict(tokenizer.special_tokens_map).items())}
    payload = json.dumps(
        {"vocab": sorted((str(t), int(i)) for t, i in vocab.items()), "special": specials},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def sample_id(tokenizer_fp: str, input_ids: np.ndarray) -> str:
    """Content address of a sequence: hash of tokenizer fingerprint + token ids.

    The same tokens under the same tokenizer always get the same id, so ids
    are stable across runs and usable for held-out splits.
    """
    ids = np.ascontiguousarray(np.asarray(input_ids, dtype="<i4"))
    h = hashlib.sha256()
    h.update(tokenizer_fp.encode("utf-8"))
    h.update(b"\x00")
    h.update(ids.tobytes())
    return h.hexdigest()[:32]


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string (the form recorded for shards)."""
    return hashlib.sha256(data).hexdigest()
