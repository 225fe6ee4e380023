"""The work plan: documents -> token sequences -> units (one unit, one shard).

The plan depends only on the corpus, the tokenizer and the sequence config,
never on how many workers run it, so a resumed or rescaled run produces the
same units and the same shard names.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from softlabels.labeler.corpus import Block, BlockReader, BlockStats, Document
from softlabels.labeler.tokens import PROBE_TEXT, BackendTokenizer, reading_tokenizer  # noqa: F401 (re-exported)
from softlabels.schemas import SequenceConfig
from softlabels.schemas.errors import UserError


@dataclass(frozen=True)
class Sequence:
    source: str  # "<doc_id>#<chunk>" or "packed:<n>"
    input_ids: np.ndarray  # int32
    trained: np.ndarray | None = None  # [L] bool: label positions trained (the token after is); None: all
    doc_lengths: tuple[int, ...] | None = None  # documents packed into it, when more than one
    spans: np.ndarray | None = None  # [L] bytes of the text each token covers (--store-spans)
    sample: int | None = None  # --generate-with: a prompt, to become its sample-th response (labeler.generation)


@dataclass(frozen=True)
class Rendering:
    """How documents become token ids and trained-token masks (what read tasks need to know)."""

    format: str = "text"  # text, chat, prompt-completion
    train_on: str = "all"  # all, assistant, completion
    chat_template: str | None = None  # --chat-template (None: the tokenizer's own)
    bos: int | None = None  # plain text and completions: prepended once per document (the tokenizer adds one)
    eos: int | None = None  # prompt-completion: ends the completion (trained: the student learns to stop)
    spans: Any = None  # the teacher tokenizer's TokenBytes (softlabels.common.tokenbytes): store token spans
    max_tokens: int | None = None  # conversations: render only the turns that can fit this many tokens
    date: str = "2024-07-26"  # what a chat template's strftime_now() sees (--chat-date)
    render_steps: int = 50_000_000  # what rendering one conversation may take (labeler.chattemplate.render_bounds)
    render_seconds: float = 300.0
    prompts: bool = False  # --generate-with: documents are prompts (labeler.generation.render_prompts)


def tokenizer_bos(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer itself puts before a text (None if it adds none): plain text gets the same."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if with_special and with_special[0] == bos and tokenizer("x", add_special_tokens=False)["input_ids"][:1] != [bos] else None


@dataclass
class PlanCounts:
    """What cutting documents into sequences did, for the summary."""

    truncated: int = 0  # conversations cut after their last assistant turn that fits --max-length
    too_long: int = 0  # conversations whose first trained turn does not fit: skipped
    untrained: int = 0  # documents with no trained token (e.g. an empty completion): skipped


@dataclass(frozen=True)
class Unit:
    index: int
    sequences: tuple[Sequence, ...]

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"

    @property
    def tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)


# With --limit, a document far longer than the limit needs is tokenized from a prefix: the
# tokens wanted, then MARGIN_TOKENS more, at CHARS_PER_TOKEN characters per token at most.
# Tokenizers work word by word (a pre-tokenizer, then BPE inside each word), so cutting the
# text changes only the tokens next to the cut, far past the ones kept.
MARGIN_TOKENS = 1024
CHARS_PER_TOKEN = 32


# (doc_id, int32 ids, bool trained-token mask or None, byte spans or None), and a fifth item, False, for a
# conversation whose later turns were left unrendered because they cannot fit --max-length
Tokenized = tuple


def _template_error(e: BaseException) -> bool:
    """A conversation the template cannot render (its own ``raise_exception``, or a refusal of ours)."""
    if isinstance(e, UserError):
        return True
    try:
        from jinja2 import TemplateError
    except ImportError:
        return False
    return isinstance(e, TemplateError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _spans(rendering: Rendering, doc_id: str, parts: list[tuple[list[int] | np.ndarray, str]],
           cut: bool = False) -> np.ndarray | None:
    """The byte spans of the tokens of each ``(ids, text)`` part, joined (None without --store-spans).

    Raises:
        UserError: the tokens do not reproduce the text (a normalizer changed it, an unknown token).
    """
    if rendering.spans is None:
        return None
    from softlabels.common.tokenbytes import spans_for

    out = []
    for ids, text in parts:
        r = spans_for(rendering.spans, ids, text.encode("utf-8"), cut)
        if isinstance(r, str):
            raise UserError(f"{doc_id}: the teacher's tokenizer does not reproduce its text ({r}), so its token spans "
                            "cannot be stored (--no-store-spans labels without them)")
        out.append(r)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def _zeros_around(spans: np.ndarray | None, before: int, after: int = 0) -> np.ndarray | None:
    """Spans with ``before``/``after`` added tokens (BOS, EOS: no bytes of the text) around them."""
    return None if spans is None else np.concatenate([np.zeros(before, np.int64), spans, np.zeros(after, np.int64)])


def render(docs: list[Document], tokenizer: Any, rendering: Rendering, max_tokens: int | None = None,
           on_bad: Callable[[Any], None] | None = None) -> list[Tokenized]:
    """``(doc_id, ids, token mask, spans)`` per document: plain text as :func:`tokenize` (BOS as the tokenizer
    intends, every token trained), conversations through the chat template (:func:`labeler.chat.render_chat`),
    prompt + completion as the prompt's tokens (not trained) then the completion's and EOS (trained).
    Spans (``rendering.spans``): per token, the bytes of the text it covers (0 for an added BOS/EOS).
    ``on_bad``: told of each document that cannot be rendered (else it is raised)."""

    def refused(e: BaseException) -> None:
        if on_bad is None:
            raise e
        on_bad(e)

    if rendering.prompts:
        from softlabels.labeler.generation import render_prompts

        return render_prompts(docs, tokenizer, rendering, refused)
    if rendering.format == "text":
        out = []
        for (doc_id, ids), d in zip(tokenize(docs, tokenizer, max_tokens), docs):
            try:
                spans = _spans(rendering, doc_id, [(ids, d.text)], cut=max_tokens is not None)
            except UserError as e:
                refused(e)
                continue
            if rendering.bos is not None and (not len(ids) or ids[0] != rendering.bos):
                ids = np.concatenate([[rendering.bos], ids]).astype(np.int32)
                spans = _zeros_around(spans, 1)
            out.append((doc_id, ids, None, spans))
        return out
    from softlabels.labeler.chat import render_chat

    out = []
    for d in docs:
        msgs = d.messages or []
        if rendering.format == "chat":
            try:
                r = render_chat(tokenizer, msgs, rendering.chat_template, rendering.train_on, where=d.doc_id,
                                max_tokens=rendering.max_tokens, date=rendering.date, steps=rendering.render_steps,
                                seconds=rendering.render_seconds)
            except Exception as e:  # the template refused the conversation (its own raise_exception, or ours)
                if on_bad is None or not _template_error(e):
                    raise
                on_bad(e if isinstance(e, UserError) else f"{d.doc_id}: the chat template refused it "
                       f"({_first_line(e)})")
                continue
            try:
                spans = _spans(rendering, d.doc_id, [(r.input_ids, r.text)])
            except UserError as e:
                refused(e)
                continue
            done = (d.doc_id, np.asarray(r.input_ids, np.int32), np.asarray(r.trained, bool), spans)
            out.append(done if r.complete else (*done, False))
            continue
        prompt = tokenizer(msgs[0]["content"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(msgs[1]["content"], add_special_tokens=False)["input_ids"]
        head = [rendering.bos] if rendering.bos is not None else []
        tail = [rendering.eos] if rendering.eos is not None else []
        try:
            spans = _spans(rendering, d.doc_id, [(prompt, msgs[0]["content"]), (completion, msgs[1]["content"])])
        except UserError as e:
            refused(e)
            continue
        ids = np.asarray(head + prompt + completion + tail, np.int32)
        spans = _zeros_around(spans, len(head), len(tail))
        mask = np.zeros(len(ids), bool)
        mask[len(head) + len(prompt):] = True
        if rendering.train_on == "all":
            mask[:] = True
        out.append((d.doc_id, ids, mask, spans))
    return out


def tokenize(docs: list[Document], tokenizer: Any, max_tokens: int | None = None) -> list[tuple[str, np.ndarray]]:
    """``(doc_id, int32 token ids)`` per document, without special tokens (one batched call).

    ``max_tokens``: no document needs more tokens than this (``--limit`` x ``--max-length``);
    longer documents are tokenized from a prefix and cut to it, so a 50 MB line costs what
    the limit needs, not the memory of tokenizing it whole.
    """
    if not docs:
        return []
    texts = [d.text for d in docs]
    cut = None if max_tokens is None else (max_tokens + MARGIN_TOKENS) * CHARS_PER_TOKEN
    if cut is not None:
        texts = [t[:cut] for t in texts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for d, t, ids in zip(docs, texts, encoded):
        if cut is not None and len(d.text) > len(t):
            if len(ids) < max_tokens + MARGIN_TOKENS // 2:  # unusually long tokens: the prefix is not enough
                ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
            ids = ids[:max_tokens]
        out.append((d.doc_id, np.asarray(ids, dtype=np.int32)))
    return out


# With --limit, a read task renders its documents a step at a time (steps double), so reading can stop.
READ_STEP_CHARS = 1 << 20


def read_and_tokenize(
    reader: BlockReader, block: Block, tokenizer: Any, max_tokens: int | None = None, rendering: Rendering | None = None,
    enough: tuple[SequenceConfig, int | None] | None = None,
) -> tuple[list[Tokenized], BlockStats]:
    """One block, read and tokenized: the body of the parallel reading tasks.

    ``enough``: ``(sequence config, EOS id)`` of a run with ``--limit``: reading stops once this block's own
    documents make more sequences than the limit, since the run labels none past them (a 2 MB file that
    expands to 800 MB is read as far as the limit needs, not whole). Per-document chunks never depend on
    earlier blocks; packed text only gains sequences from tokens carried over; packed conversations after
    another block's half-full sequence can close one later, hence one sequence more than the limit.
    """
    rendering = rendering or Rendering()
    stats = BlockStats()

    def bad(e: Any) -> None:  # as a bad row: one line naming it, or skipped and counted (--on-error)
        reader._bad(stats, str(e))
        stats.documents -= 1  # it was counted when read

    with contextlib.closing(reader.documents(block, stats)) as docs:
        if enough is None or enough[0].limit is None:
            return render(list(docs), tokenizer, rendering, max_tokens, bad), stats
        cfg, eos = replace(enough[0], limit=enough[0].limit + 1), enough[1]
        out: list[Tokenized] = []
        step: list[Document] = []
        chars = read = 0
        for doc in docs:
            step.append(doc)
            chars += len(doc.text) + sum(len(m.get("content") or "") for m in doc.messages or ())
            if chars >= max(READ_STEP_CHARS, read):
                out += render(step, tokenizer, rendering, max_tokens, bad)
                read, step, chars = read + chars, [], 0
                if sum(1 for _ in build_sequences(out, eos, cfg)) >= cfg.limit:
                    return out, stats
        return out + render(step, tokenizer, rendering, max_tokens, bad), stats


def _label_mask(token_mask: np.ndarray) -> np.ndarray:
    """Label positions trained from trained tokens: position t predicts token t + 1; the last predicts nothing."""
    out = np.zeros(len(token_mask), bool)
    out[:-1] = token_mask[1:]
    return out


def fit_conversation(ids: np.ndarray, mask: np.ndarray, max_length: int, counts: PlanCounts,
                     complete: bool = True) -> int | None:
    """How many tokens of a masked document to keep within ``max_length``: whole trailing turns dropped, i.e. cut right after the last
    run of trained tokens that ends within it (counted); None when no trained run fits (skipped, counted).
    With every token trained (``--train-on all``) there is no turn to go by: cut at ``max_length``.
    ``complete=False``: later turns were not rendered (they cannot fit), so it is cut the same way even if it fits."""
    if len(ids) <= max_length and complete:
        return len(ids)
    if mask.all():  # --train-on all: no turn to go by; cut at the length (counted as truncated)
        counts.truncated += 1
        return min(max_length, len(ids))
    m = mask[:max_length]
    ends = np.flatnonzero(m & ~np.append(mask[1:max_length + 1], False)[:max_length])
    if not len(ends):
        counts.too_long += 1
        return None
    counts.truncated += 1
    return int(ends[-1]) + 1


def build_sequences(docs: Iterable[Tokenized], eos: int | None, cfg: SequenceConfig,
                    counts: PlanCounts | None = None) -> Iterator[Sequence]:
    """Cut tokenized documents into sequences of at most ``max_length`` tokens.

    Plain text, per document (default): each document is chunked on its own; a short final
    chunk is kept. Conversations (a token mask): one sequence each, longer ones cut after their
    last assistant turn that fits (:func:`fit_conversation`). Packing: documents share sequences,
    each a segment of its own (``doc_lengths``: the teacher and the student attend within a
    segment only, positions restart); text is joined with EOS and cut every ``max_length`` tokens,
    conversations are placed whole. The label at a document's end (what follows it) is not trained.
    """
    if (cfg.packing or cfg.add_eos) and eos is None:
        raise ValueError("packing/add_eos needs a tokenizer with an EOS token")
    counts = counts or PlanCounts()
    count = 0
    segments: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []  # packing: (ids, label mask, spans)
    filled = 0
    packed = 0

    def emit_packed() -> Sequence:
        nonlocal segments, filled, packed
        ids = np.concatenate([a for a, _, _ in segments]).astype(np.int32)
        lab = np.concatenate([m for _, m, _ in segments])
        lengths = tuple(len(a) for a, _, _ in segments)
        spans = None if segments[0][2] is None else np.concatenate([sp for _, _, sp in segments])
        seq = Sequence(f"packed:{packed}", ids, None if lab.all() else lab, lengths if len(lengths) > 1 else None, spans)
        segments, filled, packed = [], 0, packed + 1
        return seq

    for doc_id, ids, mask, *more in docs:
        spans = more[0] if more else None
        complete = more[1] if len(more) > 1 else True
        if mask is not None:
            if not mask.any():
                if complete:
                    counts.untrained += 1
                else:  # its first trained turn lay past what could fit, so it was not rendered
                    counts.too_long += 1
                continue
            keep = fit_conversation(ids, mask, cfg.max_length, counts, complete)
            if keep is None:
                continue
            ids, mask, spans = ids[:keep], mask[:keep], None if spans is None else spans[:keep]
        if mask is not None:
            lab = _label_mask(mask)
            if cfg.packing:
                if filled + len(ids) > cfg.max_length and segments:
                    yield emit_packed()
                    count += 1
                    if cfg.limit is not None and count >= cfg.limit:
                        return
                segments.append((ids, lab, spans))
                filled += len(ids)
                continue
            yield Sequence(f"{doc_id}#0", ids, lab, spans=spans)
        elif cfg.packing:
            ids = np.append(ids, np.int32(eos)).astype(np.int32)
            spans = None if spans is None else np.append(spans, 0)
            start = 0
            while start < len(ids):
                take = min(cfg.max_length - filled, len(ids) - start)
                lab = np.ones(take, bool)
                if start + take == len(ids):
                    lab[-1] = False  # the document's EOS: what follows is another document
                segments.append((ids[start:start + take], lab, None if spans is None else spans[start:start + take]))
                filled += take
                start += take
                if filled == cfg.max_length:
                    yield emit_packed()
                    count += 1
                    if cfg.limit is not None and count >= cfg.limit:
                        return
            continue
        else:
            if cfg.add_eos:
                ids = np.append(ids, np.int32(eos)).astype(np.int32)
                spans = None if spans is None else np.append(spans, 0)
            for c, start in enumerate(range(0, len(ids), cfg.max_length)):
                end = start + cfg.max_length
                yield Sequence(f"{doc_id}#{c}", ids[start:end], spans=None if spans is None else spans[start:end])
                count += 1
                if cfg.limit is not None and count >= cfg.limit:
                    return
            continue
        count += 1
        if cfg.limit is not None and count >= cfg.limit:
            return
    if cfg.packing and segments:
        yield emit_packed()


def iter_units(sequences: Iterable[Sequence], shard_tokens: int, grow: int = 0) -> Iterator[Unit]:
    """Group sequences, in order, into units of about ``shard_tokens`` tokens (streaming). ``grow``: tokens each
    sequence may gain before it is labeled (a prompt's response, at most ``--max-new-tokens``)."""
    index = 0
    cur: list[Sequence] = []
    n = 0
    for s in sequences:
        cur.append(s)
        n += len(s.input_ids) + grow
        if n >= shard_tokens:
            yield Unit(index, tuple(cur))
            index, cur, n = index + 1, [], 0
    if cur:
        yield Unit(index, tuple(cur))


def unit_digest(unit: Unit) -> str:
    """sha256 of what a unit labels (sources and token ids): a resume skips a
    committed unit only if the unit planned now has the same digest."""
    h = hashlib.sha256()
    for s in unit.sequences:
        h.update(s.source.encode("utf-8") + b"\x00")
        h.update(np.ascontiguousarray(s.input_ids, dtype="<i4").tobytes())
        h.update(len(s.input_ids).to_bytes(8, "little"))
        if s.trained is not None:
            h.update(b"trained" + np.packbits(s.trained).tobytes())
        if s.doc_lengths is not None:
            h.update(b"docs" + np.asarray(s.doc_lengths, "<i8").tobytes())
        if s.spans is not None:
            h.update(b"spans" + np.asarray(s.spans, "<i8").tobytes())
    return h.hexdigest()
