"""Students with another tokenizer: teacher samples turned into the student's tokens, aligned by bytes.

A label set with token spans (labeler ``--store-spans``, schema v5) says, per position, how many bytes
of the sequence's text its token covers. From that and the set's own tokenizer files the trainer
recovers each sequence's exact text (:func:`softlabels.common.tokenbytes.text_of`), re-tokenizes it with
the student's tokenizer, and lines up the two tokenizations by byte offsets:

* a student position and a teacher position are **aligned** where both contexts end at the same byte
  (both tokenizations have a boundary there): they predict what follows the same text;
* each teacher top-k id is **mapped** to a student id (:func:`id_map`, built once per pair of
  tokenizers): the student token of the same byte string (``exact``, GOLD's rule), else, by
  default (``first``), the student token those bytes begin with, which is what the student's own
  next token is when the teacher's is that one (a teacher's `` function`` is a student's `` func``
  then ``tion``); the probabilities of teacher ids that map to one student id add up. The
  teacher's mass on ids that do not map stays in the distribution as a bucket of its own
  (``xtok-kl``) and is matched by sorted probabilities (``xtok-uld``), see
  :mod:`softlabels.trainer.losses`;
* cross-entropy is on the student's own next tokens, where the teacher's token at that byte is a
  trained one (assistant turns of a chat set, every token of plain text).

With the same tokenizer on both sides every position aligns and every id maps to itself, and the
losses reduce to ``tail-kl`` exactly (tested).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from softlabels.common.tokenbytes import TokenBytes, check_lossless, spans_for, text_of, token_bytes
from softlabels.schemas import LabelSet, Sample, tokenizer_fingerprint
from softlabels.schemas.errors import UserError
from softlabels.trainer.batch import truncate_topk
from softlabels.trainer.crossrows import chunks, merge, target_sums, whole_next

log = logging.getLogger(__name__)


TOKEN_MAPS = ("first", "exact")
_MAPS: dict[tuple[str, str, str], np.ndarray] = {}  # id maps built in this process, per pair of fingerprints


def _build_map(teacher: TokenBytes, student: TokenBytes, mode: str) -> np.ndarray:
    # ordinary tokens by their bytes; of two with the same bytes the later id (SentencePiece's byte pieces
    # <0x20> come first, the "▁" the tokenizer itself produces later)
    index = {b: i for i, b in enumerate(student.table) if b and not student.special[i]}
    specials = {b: i for i, b in enumerate(student.table) if b and student.special[i]}
    longest = max((len(b) for b in index), default=0)
    out = np.full(len(teacher.table), -1, np.int64)
    for i, b in enumerate(teacher.table):
        j = (specials if teacher.special[i] else index).get(b)
        if j is None and mode == "first" and not teacher.special[i]:
            # the student token its own tokenization of these bytes starts with (the longest that is a prefix)
            j = next((index[b[:n]] for n in range(min(len(b), longest), 0, -1) if b[:n] in index), None)
        if j is not None:
            out[i] = j
    return out


def id_map(teacher: TokenBytes, student: TokenBytes, teacher_fp: str = "", student_fp: str = "",
           mode: str = "first") -> np.ndarray:
    """Per teacher id, a student id or -1. ``exact``: the student token of the same byte string (special tokens
    only to special tokens of the same text; GOLD's rule). ``first`` (default): that, else the student token
    these bytes begin with (the longest such), i.e. what the student's own next token is when the teacher's
    would be this one. Cached per pair of tokenizer fingerprints (built once per process)."""
    if mode not in TOKEN_MAPS:
        raise UserError(f"token map must be one of {', '.join(TOKEN_MAPS)}, got {mode!r}")
    if not teacher_fp or not student_fp:
        return _build_map(teacher, student, mode)
    key = (teacher_fp, student_fp, mode)
    if key not in _MAPS:
        _MAPS[key] = _build_map(teacher, student, mode)
    return _MAPS[key]


def _utf8_edges(text: bytes) -> tuple[int, int]:
    """Bytes to drop at the start and end so that the rest is whole UTF-8 characters (a sequence cut from a
    longer document may begin or end inside a character: its token held part of one)."""
    lead = 0
    while lead < min(3, len(text)) and 0x80 <= text[lead] < 0xC0:
        lead += 1
    end = len(text)
    for back in range(1, min(4, end - lead) + 1):
        b = text[end - back]
        if b < 0x80:
            break
        if b >= 0xC0:  # a start byte: is its character whole?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if back < need:
                end -= back
            break
    return lead, len(text) - end


class CrossTokenizer:
    """Turns a teacher :class:`Sample` into a student batch item (the trainer's dataset ``transform``).

    Items carry the student's ``input_ids``; ``topk_ids`` mapped to student ids with ``topk_mapped``
    saying which entries map; ``kd_mask`` (aligned positions with teacher labels), ``ce_mask`` (student
    positions whose next token is trained), ``label_mask`` (either); ``target_bytes`` (bytes of each
    position's next token, for bits per byte) and ``xtok_stats`` (teacher positions with labels,
    of them aligned, teacher mass mapped at the aligned ones). None for a sequence without text.
    """

    def __init__(self, labels: LabelSet, label_tokenizer: Any, student_tokenizer: Any, student_where: str,
                 top_k: int | None = None, token_map: str = "first") -> None:
        if not labels.manifest.spans:
            raise UserError(f"label set {labels.url} has no token spans (labeled without --store-spans, or before "
                            f"softlabels 0.7): a student with another tokenizer ({student_where}) cannot be aligned "
                            "with it; relabel with --store-spans, or train a student with the set's tokenizer")
        if labels.manifest.sequence.packing:
            raise UserError(f"label set {labels.url} packs several documents per sequence: students with another "
                            "tokenizer need sets labeled without --packing")
        self.teacher = token_bytes(label_tokenizer, f"label set {labels.url}'s tokenizer")
        self.student = token_bytes(student_tokenizer, f"student tokenizer {student_where}")
        # Students learn the text's exact bytes: a tokenizer that changes them is refused before any training.
        check_lossless(student_tokenizer, self.student, f"student tokenizer {student_where}")
        self.tokenizer = student_tokenizer
        self.where = student_where
        self.top_k = top_k
        bos = getattr(student_tokenizer, "bos_token_id", None)
        with_special = student_tokenizer("x", add_special_tokens=True)["input_ids"]
        self.bos = bos if bos is not None and with_special[:1] == [bos] else None
        self.fingerprints = (labels.manifest.tokenizer.fingerprint, tokenizer_fingerprint(student_tokenizer))
        self.map = id_map(self.teacher, self.student, *self.fingerprints, token_map)
        self.with_chunks = True  # the chunk columns (a set with target log-probs); the trainer turns them off with the term

    def coverage(self) -> float:
        """Share of the teacher's ordinary tokens that map to a student token."""
        ordinary = ~self.teacher.special & (self.teacher.lengths > 0)
        return float((self.map[ordinary] >= 0).mean()) if ordinary.any() else 0.0

    def mass_report(self, samples: Any) -> dict[str, float]:
        """Where the teacher's probability goes on the way to the student, over ``samples`` (teacher
        :class:`Sample` s): each labeled teacher position's whole distribution (top-k + tail, 1 in all) lands in one
        of these, as shares of all of it (they sum to 1):

        * ``exact``: on the student token of the same bytes; ``prefix``: on the student token those bytes begin
          with (``--token-map first``; 0 with ``exact``);
        * ``tail``: the teacher's mass outside its top-k (a bucket of its own; on no student id);
        * ``special``, ``split_utf8``, ``no_token``: on teacher tokens that map nowhere: special tokens, tokens
          holding part of a multi-byte character (byte-level BPE splits them; a student without a token of those
          bytes has nowhere to put them), and the rest (no student token of the same bytes, nor one they begin with);
        * ``unaligned``: at positions where the student's tokenization has no boundary (the teacher predicts from
          inside a student token): the per-position KL never sees it; the chunk term covers that text.

        Also ``positions`` (labeled teacher positions), ``aligned`` (their aligned share) and ``next_agree``: at the
        aligned positions where both go on, the share at which the teacher's actual next token maps to the student's
        actual next token (where not, its mass lands on another student id than the one the student writes there:
        the student's token is longer, or the map's rule picked another prefix)."""
        exact = id_map(self.teacher, self.student, *self.fingerprints, "exact")
        unmapped_kind = np.full(len(self.teacher.table), 2, np.int64)  # 0 special, 1 split UTF-8, 2 no token
        for i, b in enumerate(self.teacher.table):
            if self.teacher.special[i]:
                unmapped_kind[i] = 0
            else:
                try:
                    b.decode("utf-8")
                except UnicodeDecodeError:
                    unmapped_kind[i] = 1
        sums = dict.fromkeys(("exact", "prefix", "tail", "special", "split_utf8", "no_token", "unaligned"), 0.0)
        positions = aligned_n = next_n = agree = 0
        for s in samples:
            got = self._align(s)
            top, lp, tail = self._labels(s)
            positions += len(tail)  # a label row per labeled position
            if got is None:
                sums["unaligned"] += len(tail)
                continue
            ids_s, _, _, p, aligned, row_of = got
            q = np.flatnonzero(aligned[:-1] & (row_of[p[:-1]] >= 0) & (p[:-1] + 1 < len(s.input_ids)))
            next_n += len(q)
            agree += int((self.map[np.asarray(s.input_ids)[p[q] + 1]] == np.asarray(ids_s)[q + 1]).sum())
            rows = np.unique(row_of[p[aligned]])
            rows = rows[rows >= 0]
            aligned_n += len(rows)
            sums["unaligned"] += len(tail) - len(rows)
            ids, prob = top[rows], np.exp(lp[rows].astype(np.float64))
            total = prob.sum(1) + np.exp(tail[rows].astype(np.float64))  # 1 up to the encoding's rounding
            prob, t = prob / total[:, None], np.exp(tail[rows].astype(np.float64)) / total
            to = self.map[ids]
            sums["exact"] += float(prob[(to >= 0) & (to == exact[ids])].sum())
            sums["prefix"] += float(prob[(to >= 0) & (to != exact[ids])].sum())
            sums["tail"] += float(t.sum())
            kind = unmapped_kind[ids]
            for name, code in (("special", 0), ("split_utf8", 1), ("no_token", 2)):
                sums[name] += float(prob[(to < 0) & (kind == code)].sum())
        out = {k: v / max(1, positions) for k, v in sums.items()}
        return {**out, "positions": float(positions), "aligned": aligned_n / max(1, positions),
                "next_agree": agree / max(1, next_n)}

    def _align(self, s: Sample) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """A teacher sample's text in student tokens, lined up with the teacher's: ``(student ids, their byte
        spans, teacher token ends in bytes, each student position's teacher position p, aligned, the teacher's
        label row per teacher position (-1: none))``; None for a sequence without text."""
        if s.spans is None:
            raise UserError(f"sample {s.sample_id} ({s.source}) has no token spans")
        text = text_of(self.teacher, s.input_ids, s.spans)
        if isinstance(text, str):
            raise UserError(f"sample {s.sample_id} ({s.source}): its spans do not match its tokens: {text}")
        lead, trail = _utf8_edges(text)
        body = text[lead:len(text) - trail]
        try:
            decoded = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"sample {s.sample_id} ({s.source}): its text is not UTF-8 at byte {lead + e.start}") from None
        if not body:  # no text (a chunk holding only an added EOS, spans that cover nothing): nothing to learn
            return None
        ids = list(self.tokenizer(decoded, add_special_tokens=False)["input_ids"])
        spans = spans_for(self.student, ids, body)
        if isinstance(spans, str):
            raise UserError(f"student tokenizer {self.where} cannot encode sample {s.sample_id} ({s.source}) "
                            f"losslessly: {spans}")
        if self.bos is not None and lead == 0 and len(s.spans) and s.spans[0] == 0:  # the teacher had a BOS here
            ids, spans = [self.bos] + ids, np.concatenate([[0], spans])
        if not ids:  # a tokenizer that gives no token for some text (none the lossless check lets through)
            return None
        ends_t = np.cumsum(s.spans.astype(np.int64)) - lead
        ends_s = np.cumsum(spans)
        # Teacher label rows per position (-1: none there).
        trained_t = np.ones(len(s.input_ids), bool) if s.trained is None else s.trained
        row_of = np.where(trained_t, np.cumsum(trained_t) - 1, -1)
        p = np.searchsorted(ends_t, ends_s, "left").clip(max=len(ends_t) - 1)
        aligned = (ends_t[p] == ends_s) & (ends_t[p] >= 0)
        return ids, spans, ends_t, p, aligned, row_of

    def _labels(self, s: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sample's top-k ids, log-probs and tails, cut to ``top_k`` when set."""
        lp, tail, top = s.topk_logprobs, s.tail_logprob, s.topk_ids
        if self.top_k is not None:
            lp, tail = truncate_topk(lp, tail, self.top_k)
            top = top[:, :self.top_k]
        return top, lp, tail

    def __call__(self, s: Sample) -> dict[str, torch.Tensor] | None:
        got = self._align(s)
        if got is None:
            return None
        ids, spans, ends_t, p, aligned, row_of = got
        trained_t = row_of >= 0
        n = len(ids)
        ends_s = np.cumsum(spans)
        kd = aligned & (row_of[p] >= 0)
        # CE: the student's next token starts at byte ends_s[q]; trained if the teacher token there is.
        nxt = np.searchsorted(ends_t, ends_s[:-1], "right")
        if s.trained is None:
            ce_head = nxt < len(ends_t)
        else:
            ce_head = (nxt >= 1) & (nxt < len(ends_t)) & trained_t[(nxt - 1).clip(0)]
        ce = np.zeros(n, bool)
        ce[:-1] = ce_head
        top, lp, tail = self._labels(s)
        k = top.shape[1]
        rows = row_of[p[kd]]
        sums_t = target_sums(s, row_of)  # the teacher's log-prob of the text along any span (sets with them)
        to, row_lp, row_tail = whole_next(s, ids, p, aligned, kd, row_of, self.map[top[rows]], lp[rows], tail[rows],
                                          sums_t)
        # teacher entries that map to one student id (several teacher tokens beginning with it) are summed; the
        # least probable of k + 1 (a student token the text continues with, added above) goes to the tail
        student_ids, merged_lp, mapped = merge(to, row_lp)
        if student_ids.shape[1] > k:
            row_tail = np.where(merged_lp[:, k] > -1e29, np.logaddexp(row_tail, merged_lp[:, k]), row_tail).astype(np.float32)
            student_ids, merged_lp, mapped = student_ids[:, :k], merged_lp[:, :k], mapped[:, :k]
        full_ids = np.zeros((n, k), np.int64)
        full_mapped = np.zeros((n, k), bool)
        full_lp = np.zeros((n, k), np.float32)
        full_tail = np.zeros(n, np.float32)
        full_ids[kd] = student_ids
        full_mapped[kd] = mapped
        full_lp[kd] = merged_lp
        full_tail[kd] = row_tail
        target_bytes = np.zeros(n, np.int64)
        target_bytes[:-1] = spans[1:]
        probs = np.exp(merged_lp.astype(np.float64))
        total = probs.sum(1) + np.exp(row_tail.astype(np.float64))
        mapped_mass = float(((probs * mapped).sum(1) / np.maximum(total, 1e-30)).sum())
        chunk_cols = {} if sums_t is None or not self.with_chunks else chunks(aligned, p, ce, sums_t)
        return {
            **chunk_cols,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "topk_ids": torch.from_numpy(full_ids),
            "topk_mapped": torch.from_numpy(full_mapped),
            "topk_logprobs": torch.from_numpy(full_lp),
            "tail_logprob": torch.from_numpy(full_tail),
            "label_mask": torch.from_numpy(kd | ce),
            "kd_mask": torch.from_numpy(kd),
            "ce_mask": torch.from_numpy(ce),
            "target_bytes": torch.from_numpy(target_bytes),
            "xtok_stats": torch.tensor([len(tail), int(kd.sum()), mapped_mass], dtype=torch.float64),
        }

def attach(datasets: list[Any], labels: LabelSet, tokenizer: Any, where: str,
           allow_vocab_mismatch: bool = False, top_k: int | None = None, token_map: str = "first") -> CrossTokenizer | None:
    """Make ``datasets`` (:class:`~softlabels.trainer.data.LabelDataset`) serve a student with ``tokenizer``.

    The set's own tokenizer: items as they are, with each next token's bytes (bits per byte) from the
    spans or the tokenizer's token bytes (special tokens count none). Another one (not
    ``--allow-vocab-mismatch``): items through a :class:`CrossTokenizer`; returned.
    """
    from softlabels.trainer.student import load_label_tokenizer

    if allow_vocab_mismatch or tokenizer_fingerprint(tokenizer) == labels.manifest.tokenizer.fingerprint:
        try:
            tb = token_bytes(tokenizer, where)
            lengths = np.where(tb.special, 0, tb.lengths)
        except UserError:  # no exact bytes (a WordPiece tokenizer): bits per byte only from spans
            lengths = None
        for ds in datasets:
            ds.byte_lengths = None if allow_vocab_mismatch else lengths
        return None
    cross = CrossTokenizer(labels, load_label_tokenizer(labels), tokenizer, where, top_k, token_map)
    for ds in datasets:
        ds.transform, ds.max_id = cross, None  # items hold the student's ids (its tokenizer's, which fit it)
    log.info("across tokenizers: %.1f%% of the teacher's %d ordinary tokens map to a student token (--token-map %s)",
             100 * cross.coverage(), int((~cross.teacher.special).sum()), token_map)
    return cross
