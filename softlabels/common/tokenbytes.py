"""The exact bytes each token id stands for, and token spans in a text's UTF-8 bytes.

What cross-tokenizer distillation stands on (docs/trainer.md, "Students with another tokenizer"):
the labeler stores, per position, how many bytes of the text its token covers (``spans``), and the
trainer recovers each sample's text from the token ids, re-tokenizes it with the student's tokenizer
and lines the two up by byte offsets.

Decoding never goes through ``tokenizer.decode``, which is not exact (it cleans up spaces, strips a
SentencePiece prefix space, turns partial UTF-8 into U+FFFD). Each id maps to bytes instead:

* byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): the token string's characters map back to bytes
  through GPT-2's byte-to-unicode table: every byte is representable, so any text round-trips;
* SentencePiece-style vocabularies (Llama 2, Mistral, Gemma): ``<0xNN>`` byte-fallback tokens are that
  one byte, ``▁`` is a space, the rest is UTF-8;
* added tokens (special or not) are their content's UTF-8 bytes, as a chat template writes them.

Normalizers are not inverted: a tokenizer that adds a prefix space has it detected (the first token's
span is its bytes less that space); any other change (lowercasing, NFKC, an ``<unk>`` token) makes the
concatenated token bytes differ from the text, which :func:`spans_for` reports instead of guessing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from softlabels.schemas.errors import UserError


# Text tokenizers are checked on before they are used: spaces, tabs, newlines (CRLF too), digits, punctuation,
# accents, CJK, an emoji, a word the vocabulary surely splits, a ligature and a combining accent (which NFKC
# and NFC normalizers change), a no-break space.
PROBE_TEXT = ("Hello, world!\n\n  def f(x):\treturn x**2  # 1234567\r\nÜnïcödé naïve café 東京 🙂 floccinaucinihilipilification"
              " ﬁ\u00a0A\u030a")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _byte_piece(token: str) -> bytes | None:
    """The byte of a SentencePiece byte-fallback piece (``<0x0A>``), else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            return None
    return None


def _kinds(node: Any) -> list[dict[str, Any]]:
    """A decoder/normalizer spec and, for a ``Sequence``, its parts (flattened)."""
    if not isinstance(node, dict):
        return []
    parts = node.get("decoders") or node.get("normalizers") or node.get("pretokenizers")
    return [p for part in parts for p in _kinds(part)] if node.get("type") == "Sequence" and parts else [node]


@dataclass(frozen=True)
class TokenBytes:
    """Per id, the bytes the token stands for in a text (``table``), and their lengths."""

    kind: str  # "byte-level" or "sentencepiece"
    table: tuple[bytes, ...]
    lengths: np.ndarray  # [V] int64
    special: np.ndarray  # [V] bool: special tokens (a chat template writes them; the labeler may add BOS/EOS)
    prefix_space: bool  # the tokenizer puts a space before a text (SentencePiece's dummy prefix)

    def join(self, ids: Any) -> bytes:
        return b"".join([self.table[i] for i in np.asarray(ids).tolist()])


def token_bytes(tokenizer: Any, where: str = "tokenizer") -> TokenBytes:
    """The :class:`TokenBytes` of a fast Hugging Face tokenizer.

    Raises:
        UserError: a slow tokenizer, or a vocabulary whose tokens are not byte-level or SentencePiece pieces
            (WordPiece, for one): their bytes cannot be known exactly.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{where}: a slow (Python) tokenizer; token spans need a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    decoders = {d.get("type") for d in _kinds(spec.get("decoder"))}
    pre = {p.get("type") for p in _kinds(spec.get("pre_tokenizer"))}
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    table: list[bytes] = [b""] * size
    if "ByteLevel" in decoders or "ByteLevel" in pre:
        kind, bd = "byte-level", _byte_decoder()
        for token, i in vocab.items():
            try:
                table[i] = bytes(bd[c] for c in token)
            except KeyError:  # not a byte-level string (an added token): its content, below
                table[i] = token.encode("utf-8")
    elif decoders & {"Metaspace", "Replace", "ByteFallback"} or "Metaspace" in pre:
        kind = "sentencepiece"
        for token, i in vocab.items():
            byte = _byte_piece(token)
            table[i] = token.replace("\u2581", " ").encode("utf-8") if byte is None else byte
    else:
        raise UserError(f"{where}: a {spec.get('model', {}).get('type', 'unknown')} tokenizer with decoder "
                        f"{sorted(d for d in decoders if d) or 'none'}; token spans need byte-level BPE or SentencePiece "
                        "pieces, whose tokens' bytes are exact")
    special = np.zeros(size, bool)
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = str(added.content if hasattr(added, "content") else added)
        if i < size and not (kind == "sentencepiece" and _byte_piece(content) is not None):
            table[i] = content.encode("utf-8")
            special[i] = bool(getattr(added, "special", True))
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix = b"".join(table[i] for i in probe) == b" a"
    lengths = np.fromiter((len(b) for b in table), dtype=np.int64, count=size)
    return TokenBytes(kind, tuple(table), lengths, special, prefix)


def check_lossless(tokenizer: Any, tb: TokenBytes, where: str) -> None:
    """One line when ``tokenizer``'s tokens do not reproduce :data:`PROBE_TEXT` byte for byte."""
    problem = spans_for(tb, tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"], PROBE_TEXT.encode("utf-8"))
    if isinstance(problem, str):
        raise UserError(f"{where} does not reproduce text exactly, {problem}: a normalizer or an unknown token changes it")


def spans_for(tb: TokenBytes, ids: Any, text: bytes, cut: bool = False) -> np.ndarray | str:
    """Per token of ``ids`` (the tokenization of ``text``, no special tokens added), how many of the text's
    bytes it covers; a string saying where the tokens stop matching the text when they do not reproduce it.

    ``cut``: the ids were cut short (the text goes on past them): they must reproduce a prefix of it.
    """
    ids = np.asarray(ids, dtype=np.int64)
    lengths = tb.lengths[ids].copy() if len(ids) else np.zeros(0, np.int64)
    got = tb.join(ids)
    if tb.prefix_space and got[:1] == b" " and not text.startswith(b" ") and len(lengths) and lengths[0] >= 1:
        got, lengths[0] = got[1:], lengths[0] - 1
    if got == text or (cut and text.startswith(got)):
        return lengths
    at = next((i for i, (a, b) in enumerate(zip(got, text)) if a != b), min(len(got), len(text)))
    return (f"at byte {at} the text has {text[at:at + 12]!r} but its tokens give {got[at:at + 12]!r} "
            f"({len(text)} bytes of text, {len(got)} from the tokens)")


def text_of(tb: TokenBytes, ids: Any, spans: Any) -> bytes | str:
    """A sequence's text from its ids and spans: each position's token contributes its last ``span`` bytes
    (all of them, none for an added BOS/EOS, all but a prefix space). A string saying what does not match
    when a span is longer than its token, or cuts anything but a leading space off it."""
    parts = []
    for p, (i, n) in enumerate(zip(np.asarray(ids).tolist(), np.asarray(spans).tolist())):
        if i < 0 or i >= len(tb.table):
            return f"position {p}: token id {i} is outside the tokenizer's {len(tb.table)} ids"
        b = tb.table[i]
        if n == len(b):
            parts.append(b)
        elif n == 0:
            continue
        elif 0 < n < len(b) and b[: len(b) - n].strip(b" ") == b"":
            parts.append(b[len(b) - n:])
        else:
            return f"position {p}: span of {n} bytes for token {i} ({b[:16]!r}, {len(b)} bytes)"
    return b"".join(parts)
