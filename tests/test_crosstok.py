"""Token spans in label sets and students with another tokenizer (issue 22).

Tokenizers here are real ones trained by the ``tokenizers`` library on pydoc text: the tests'
byte-level teacher tokenizer (conftest), a byte-level one with other merges and vocabulary size, and a
SentencePiece-style one with byte fallback (``▁`` for spaces, ``<0xNN>`` pieces for bytes it lacks).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, cli_in_process

from softlabels.common.tokenbytes import spans_for, text_of, token_bytes
from softlabels.labeler.corpus import Document
from softlabels.labeler.plan import Rendering, build_sequences, render
from softlabels.schemas import SCHEMA_VERSION, Sample, SequenceConfig, decode_table, encode_samples, open_label_set
from softlabels.schemas.errors import UserError
from softlabels.trainer.batch import collate, sample_to_tensors
from softlabels.trainer.crosstok import CrossTokenizer, attach
from softlabels.trainer.losses import chunked_loss, position_loss
from softlabels.trainer.student import build_student, load_label_tokenizer

TEXT = ("naïve  café\t\t東京 🙂   spaces\n\n\nend Ünïcödé ☃☃ " * 3).strip()


def _topics(lo: int, hi: int) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][lo:hi]


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A byte-level BPE tokenizer with other merges and another vocabulary size than the tests' teacher's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_topics(20, 80), trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("byte-level-700")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def byte_fallback():
    """A SentencePiece-style BPE (prefix space, ``▁``, byte fallback) that lacks CJK, emoji and most accents."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    pieces = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_topics(0, 20), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *pieces], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "byte-fallback"])
def test_spans_slice_the_text_into_the_tokens_bytes(kind, label_set, byte_fallback):
    """Per position, the stored id decoded to bytes and the text sliced by the stored spans are the same bytes:
    multi-byte UTF-8 (split across chunks too), whitespace runs, byte-fallback pieces; through a shard and back."""
    tok = load_label_tokenizer(open_label_set(label_set)) if kind == "byte-level" else byte_fallback
    tb = token_bytes(tok)
    docs = [Document("d0", TEXT), Document("d1", "x" + TEXT[::-1])]
    tokenized = render(docs, tok, Rendering(spans=tb))
    seqs = list(build_sequences(tokenized, tok.eos_token_id, SequenceConfig(max_length=7, add_eos=True)))
    if kind == "byte-fallback":
        pieces = {tok.convert_ids_to_tokens(int(i)) for s in seqs for i in s.input_ids}
        assert {"<0xE6>", "<0x9D>", "<0xB1>"} <= pieces  # 東 as three byte pieces
        assert tb.prefix_space
    samples = []
    for d in docs:
        text, at = d.text.encode("utf-8"), 0
        mine = [s for s in seqs if s.source.startswith(f"{d.doc_id}#")]
        for s in mine:
            for i, n in zip(s.input_ids.tolist(), s.spans.tolist()):
                assert text[at:at + n] == (tb.table[i][-n:] if n else b"")
                at += n
        assert at == len(text) and mine[-1].spans[-1] == 0  # every byte once; the added EOS covers none
        assert any(0x80 <= text[sum(int(x) for s in mine[:j] for x in s.spans)] < 0xC0 for j in range(1, len(mine)))
        rows = [Sample(f"{j:016x}", s.source, s.input_ids, np.zeros((len(s.input_ids), 1), np.int32),
                       np.zeros((len(s.input_ids), 1), np.float32), np.full(len(s.input_ids), -30, np.float32),
                       spans=s.spans) for j, s in enumerate(mine)]
        back = list(decode_table(encode_samples(rows, 1)))
        assert b"".join(text_of(tb, r.input_ids, r.spans) for r in back) == text
        samples += back
    assert all(r.spans.dtype == np.uint16 for r in samples)


def test_labeler_stores_spans_that_give_back_each_document(label_set):
    """The fixture set (the real labeler, default settings) has spans; a document's chunks join to its text."""
    from pydoc_data.topics import topics

    ls = open_label_set(label_set)
    assert ls.manifest.spans and ls.manifest.schema_version == SCHEMA_VERSION
    tb = token_bytes(load_label_tokenizer(ls))
    by_doc: dict[str, list] = {}
    for s in ls.iter_samples():
        doc, chunk = s.source.rsplit("#", 1)
        by_doc.setdefault(doc, []).append((int(chunk), text_of(tb, s.input_ids, s.spans)))
    whole = 0
    for doc, parts in by_doc.items():
        got = b"".join(t for _, t in sorted(parts))
        want = topics[doc.removeprefix("pydoc:")].encode("utf-8")
        assert want.startswith(got)  # --limit may stop inside the last document
        whole += got == want
    assert whole >= len(by_doc) - 1


def test_same_tokenizer_cross_losses_equal_tail_kl(label_set):
    """Through the cross-tokenizer path with the set's own tokenizer: the same tokens and positions, every id
    mapped to itself, and xtok-kl and xtok-uld equal tail-kl on the same batch (and bits per byte agree)."""
    ls = open_label_set(label_set)
    samples = list(ls.iter_samples(ls.manifest.shards[:2]))
    cross = CrossTokenizer(ls, load_label_tokenizer(ls), load_label_tokenizer(ls), "same")
    assert cross.coverage() == 1.0
    plain = collate([sample_to_tensors(s) for s in samples[:6]])
    items = [cross(s) for s in samples[:6]]
    crossed = collate(items)
    assert torch.equal(crossed["input_ids"], plain["input_ids"]) and torch.equal(crossed["kd_mask"], plain["label_mask"])
    assert torch.equal(crossed["targets"], plain["targets"]) and bool(crossed["topk_mapped"][crossed["kd_mask"]].all())
    assert torch.equal(crossed["topk_ids"][crossed["kd_mask"]], plain["topk_ids"][plain["label_mask"]])
    assert sum(float(i["xtok_stats"][1]) for i in items) == sum(float(i["xtok_stats"][0]) for i in items)
    model, _ = build_student("tiny", ls, seed=1)
    hidden = model.get_decoder()(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).last_hidden_state
    head = model.get_output_embeddings()
    ref, ref_parts = chunked_loss(hidden, head, "tail-kl", plain, alpha=0.7, chunk=50)
    for kind in ("xtok-kl", "xtok-uld"):
        got, parts = chunked_loss(hidden, head, kind, crossed, alpha=0.7, chunk=50)
        assert abs(got.item() - ref.item()) < 1e-5 and abs(parts["kd"] - ref_parts["kd"]) < 1e-5, kind
    with_bytes = collate([sample_to_tensors(s) for s in samples[:6]])
    assert torch.equal(with_bytes["target_bytes"], crossed["target_bytes"])
    # bits per byte: the CE sum over the bytes of the predicted tokens, both against a direct computation
    from softlabels.trainer.evaluate import score_batch

    sums = score_batch(hidden.detach(), head, with_bytes, 50)
    tb = token_bytes(load_label_tokenizer(ls))
    real = plain["targets"] != -100
    assert sums[5] == sum(len(tb.table[int(t)]) for t in plain["targets"][real])
    direct = torch.nn.functional.cross_entropy(head(hidden.detach()[real]).float(), plain["targets"][real], reduction="sum")
    assert abs(sums[0] - direct.item()) < 1e-3 * direct.item()


@pytest.mark.parametrize("token_map", ["first", "exact"])
def test_another_tokenizer_aligns_where_both_have_a_boundary(label_set, byte_level, byte_fallback, token_map):
    """Aligned positions, the id map and the merged teacher distribution against a direct computation."""
    from transformers import AutoTokenizer

    for student in (AutoTokenizer.from_pretrained(byte_level), byte_fallback):
        ls = open_label_set(label_set)
        samples = list(ls.iter_samples(ls.manifest.shards[:2]))
        cross = CrossTokenizer(ls, load_label_tokenizer(ls), student, "other", token_map=token_map)
        t_tb, s_tb = cross.teacher, cross.student
        ordinary = {b: i for i, b in enumerate(s_tb.table) if b and not s_tb.special[i]}
        for t_id, b in enumerate(t_tb.table):  # the map, token by token
            if t_tb.special[t_id] or not b:
                continue
            if b in ordinary:
                assert s_tb.table[cross.map[t_id]] == b
            elif token_map == "exact":
                assert cross.map[t_id] == -1
            else:  # the longest student token these bytes begin with
                prefixes = [n for n in range(1, len(b) + 1) if b[:n] in ordinary]
                assert cross.map[t_id] == (ordinary[b[:max(prefixes)]] if prefixes else -1)
        assert 0.05 < cross.coverage() <= 1 and (cross.coverage() == 1) == (token_map == "first")
        total = aligned = moved = 0
        for s in samples[:8]:
            item = cross(s)
            text = text_of(t_tb, s.input_ids, s.spans)
            ids = student(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
            assert item["input_ids"].tolist() == ids
            ends_t = list(np.cumsum(s.spans.astype(int)))
            ends_s = list(np.cumsum(spans_for(s_tb, ids, text)))
            want = [e in ends_t for e in ends_s]  # every teacher position of the fixture set holds labels
            assert item["kd_mask"].tolist() == want
            for q in np.flatnonzero(want):
                p = ends_t.index(ends_s[q])
                entries = [(int(cross.map[t]), float(np.exp(lp))) for t, lp in zip(s.topk_ids[p].tolist(),
                                                                               s.topk_logprobs[p].tolist())]
                tail = float(np.exp(s.tail_logprob[p]))
                # the student's next token longer than the teacher's, ending where a teacher token ends: the
                # teacher's probability of it along the text moves there from the teacher's first token
                p2 = ends_t.index(ends_s[q + 1]) if q + 1 < len(ids) and ends_s[q + 1] in ends_t else None
                if p2 is not None and p2 >= p + 2:
                    moved += 1
                    whole = float(np.exp(sum(float(s.target_logprob[j]) for j in range(p, p2))))
                    first = s.input_ids[p + 1]
                    at = [j for j, t in enumerate(s.topk_ids[p].tolist()) if t == first]
                    have = entries[at[0]][1] if at else tail
                    whole = min(whole, have)
                    if at:
                        entries[at[0]] = (entries[at[0]][0], max(have - whole, 1e-30))
                    else:
                        tail = max(have - whole, 1e-30)
                    entries.append((ids[q + 1], whole))
                merged: dict[int, float] = {}
                for i, pr in entries:
                    if i >= 0:
                        merged[i] = merged.get(i, 0.0) + pr
                kept = len([i for i, _ in entries if i < 0]) + len(merged)
                if kept > s.topk_ids.shape[1]:  # k + 1 entries: the least probable goes to the tail
                    low = min(merged, key=merged.get)
                    tail += merged.pop(low)
                got = {int(i): float(np.exp(lp)) for i, lp, m in
                       zip(item["topk_ids"][q], item["topk_logprobs"][q], item["topk_mapped"][q]) if m}
                assert got.keys() == merged.keys()
                assert all(abs(got[i] - merged[i]) < 1e-5 for i in got)
                assert abs(float(np.exp(item["tail_logprob"][q])) - tail) < 1e-5
                probs = item["topk_logprobs"][q].exp()
                assert bool((probs[:-1] >= probs[1:] - 1e-7).all())  # still in descending order
            total, aligned = total + len(s.input_ids), aligned + sum(want)
            # CE targets: the student's own next tokens (no -100 but the last position: plain text trains all)
            assert int(item["ce_mask"].sum()) == len(ids) - 1
        assert 0.2 < aligned / total < 1 and moved > 0
        # Where the teacher's mass goes, entry by entry, against CrossTokenizer.mass_report
        want = dict.fromkeys(("exact", "prefix", "tail", "special", "split_utf8", "no_token", "unaligned"), 0.0)
        next_n = agree = 0
        for s in samples[:8]:
            text = text_of(t_tb, s.input_ids, s.spans)
            ids = student(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
            at_end = {e: i for i, e in enumerate(np.cumsum(spans_for(s_tb, ids, text)).tolist())}
            ends_s = set(at_end)
            for p, end in enumerate(np.cumsum(s.spans.astype(int)).tolist()):
                if end not in ends_s:
                    want["unaligned"] += 1
                    continue
                if p + 1 < len(s.input_ids) and at_end[end] + 1 < len(ids):  # both go on: do their next tokens agree?
                    next_n += 1
                    agree += int(cross.map[s.input_ids[p + 1]]) == ids[at_end[end] + 1]
                whole = np.exp(s.topk_logprobs[p].astype(float)).sum() + np.exp(float(s.tail_logprob[p]))
                want["tail"] += np.exp(float(s.tail_logprob[p])) / whole
                for t_id, lp in zip(s.topk_ids[p].tolist(), s.topk_logprobs[p].tolist()):
                    b, to = t_tb.table[t_id], int(cross.map[t_id])
                    kind = ("exact" if s_tb.table[to] == b else "prefix") if to >= 0 else \
                        "special" if t_tb.special[t_id] else "no_token" if b.decode("utf-8", "replace") == \
                        b.decode("utf-8", "ignore") else "split_utf8"
                    want[kind] += np.exp(lp) / whole
        got = cross.mass_report(samples[:8])
        assert got["positions"] == total and abs(got["aligned"] - aligned / total) < 1e-12
        assert all(abs(got[k] - v / total) < 1e-6 for k, v in want.items()), (got, want)
        assert 0 < next_n and abs(got["next_agree"] - agree / next_n) < 1e-12 and 0 < agree < next_n
        assert abs(sum(want.values()) / total - 1) < 1e-4 and (got["prefix"] > 0) == (token_map == "first")


def _direct_chunk_term(hidden, head, batch, distance):
    """The chunk term written out: full log-softmax, each chunk's student log-probability summed position by
    position in Python, the distance to the teacher's (the generalized KL of the two surprisals, or the binary KL),
    mean over chunks."""
    logq = torch.log_softmax(head(hidden).double(), -1)
    terms = []
    b, t = batch["chunk_len"].shape
    for i in range(b):
        for q in range(t):
            m = int(batch["chunk_len"][i, q])
            if not m:
                continue
            ls = sum(logq[i, j, batch["targets"][i, j]] for j in range(q, q + m))
            lt = torch.tensor(float(batch["chunk_logprob"][i, q]), dtype=torch.float64)
            if distance == "surprisal":
                u, v = -lt, -ls
                terms.append(u * torch.log(u / v) - u + v)
            else:
                a = lt.exp()
                terms.append(a * (lt - ls) + (1 - a) * (torch.log1p(-a) - torch.log1p(-ls.exp())))
    return torch.stack(terms).mean()


def test_chunk_likelihoods_against_a_direct_computation(label_set, byte_level):
    """Chunks (spans where both tokenizations have a boundary at both ends) and the teacher's log-probability of
    each from the stored target_logprob, against a walk over byte offsets; the chunk term and its gradient
    against autograd of the direct form; with one tokenizer every chunk is one token (the same on both paths)."""
    from transformers import AutoTokenizer

    ls = open_label_set(label_set)
    assert ls.manifest.target_logprobs
    samples = list(ls.iter_samples(ls.manifest.shards[:2]))[:6]
    student = AutoTokenizer.from_pretrained(byte_level)
    cross = CrossTokenizer(ls, load_label_tokenizer(ls), student, "other")
    cross.with_chunks = False  # as the trainer sets it without a chunk term: the rest of the item unchanged
    bare = cross(samples[0])
    cross.with_chunks = True
    items = [cross(s) for s in samples]
    assert "chunk_len" not in bare and bare.keys() | {"chunk_len", "chunk_logprob"} == items[0].keys()
    assert all(torch.equal(bare[k], items[0][k]) for k in bare)
    n_chunks = 0
    for s, item in zip(samples, items):
        text = text_of(cross.teacher, s.input_ids, s.spans)
        ids = student(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
        ends_t = list(np.cumsum(s.spans.astype(int)))
        ends_s = list(np.cumsum(spans_for(cross.student, ids, text)))
        aligned = [q for q, e in enumerate(ends_s) if e in ends_t]
        want_len, want_lp = np.zeros(len(ids), int), np.zeros(len(ids))
        for q0, q1 in zip(aligned, aligned[1:]):
            t0, t1 = ends_t.index(ends_s[q0]), ends_t.index(ends_s[q1])
            lps = s.target_logprob[t0:t1]  # teacher positions predicting the chunk's tokens (every one trained here)
            if q1 < len(ids) and np.isfinite(lps).all() and t1 > t0:
                want_len[q0], want_lp[q0] = q1 - q0, lps.astype(np.float64).sum()
        assert item["chunk_len"].tolist() == want_len.tolist()
        np.testing.assert_allclose(item["chunk_logprob"].numpy(), want_lp, rtol=1e-5, atol=1e-5)
        assert want_len.max() > 1  # some chunks span several student tokens
        n_chunks += int((want_len > 0).sum())
    batch = collate(items)
    model, _ = build_student("tiny", ls, seed=1, student_tokenizer=byte_level)
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    head = model.get_output_embeddings()
    h = hidden.detach().requires_grad_(True)
    values = {}
    for distance in ("surprisal", "binary"):
        without, _ = chunked_loss(h, head, "xtok-kl", batch, chunk=50)
        with_chunks, parts = chunked_loss(h, head, "xtok-kl", batch, chunk=50, chunk_weight=0.5,  # 50: several pieces
                                          chunk_distance=distance)
        direct = _direct_chunk_term(h, head, batch, distance)
        assert n_chunks > 20 and abs(parts["chunk"] - direct.item()) < 1e-4 * max(1, direct.item()), distance
        assert abs((with_chunks - without).item() - 0.5 * direct.item()) < 1e-4 * max(1, direct.item())
        got = torch.autograd.grad(with_chunks - without, h)[0]
        want = torch.autograd.grad(0.5 * direct, h)[0]
        torch.testing.assert_close(got, want.float(), rtol=1e-3, atol=1e-6)
        values[distance] = direct.item()
    assert values["surprisal"] != values["binary"]
    # one tokenizer: each trained position with a next token is a chunk of one, the same through either path
    same = CrossTokenizer(ls, load_label_tokenizer(ls), load_label_tokenizer(ls), "same")
    for s in samples:
        a, b = same(s), sample_to_tensors(s)
        assert torch.equal(a["chunk_len"], b["chunk_len"]) and torch.equal(a["chunk_logprob"], b["chunk_logprob"])
        assert a["chunk_len"].tolist() == [1] * (len(s.input_ids) - 1) + [0]
        assert torch.equal(a["chunk_logprob"][:-1], torch.tensor(s.target_logprob[:-1]))


def test_uld_term_against_a_direct_computation():
    """xtok-uld = xtok-kl + sum over the unmapped entries of |sorted teacher p - sorted student q outside the mapped ids|."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=g) * 2
    ids = torch.tensor([[4, 1, 7, 0], [2, 3, 5, 9], [11, 10, 8, 6]])
    lp = torch.log_softmax(torch.randn(3, 13, generator=g), -1)[:, :4].sort(-1, descending=True).values
    tail = torch.log1p(-lp.exp().sum(-1))
    mapped = torch.tensor([[True, False, True, False], [True, True, True, True], [False, False, True, False]])
    kl = position_loss(logits, "xtok-kl", ids, lp, tail, mapped=mapped)
    uld = position_loss(logits, "xtok-uld", ids, lp, tail, mapped=mapped)
    q = torch.softmax(logits, -1)
    for r in range(3):
        p = lp[r].exp() / (lp[r].exp().sum() + tail[r].exp())
        m = mapped[r]
        rest_t = 1 - p[m].sum()
        direct_kl = float((p[m] * (p[m].log() - q[r, ids[r][m]].log())).sum() + rest_t * (rest_t.log() - (1 - q[r, ids[r][m]].sum()).log()))
        assert abs(float(kl[r]) - direct_kl) < 1e-5
        others = torch.ones(12, dtype=torch.bool)
        others[ids[r][m]] = False
        n = int((~m).sum())
        t_sorted = p[~m].sort(descending=True).values
        s_sorted = q[r][others].sort(descending=True).values[:n]
        assert abs(float(uld[r] - kl[r]) - float((t_sorted - s_sorted).abs().sum())) < 1e-5
    assert float(uld[1]) == float(kl[1])  # every entry mapped: no ULD term


@pytest.mark.slow
def test_student_with_another_tokenizer_trains_and_resumes(label_set, byte_level, tmp_path):
    """A tiny student built for the 700-token byte-level tokenizer, with the chunk term: bits per byte and coverage reported; stopped at
    its step-2 checkpoint and resumed to step 4 (2 DataLoader workers), it ends as the uninterrupted run (a constant
    learning rate: the schedule does not depend on --steps)."""
    def args(out, *extra, steps="4"):
        return ["train", "--labels", label_set, "--output", str(out), "--student-tokenizer", byte_level, "--steps", steps,
                "--batch-size", "3", "--lr", "3e-3", "--warmup-steps", "0", "--min-lr-ratio", "1", "--eval-batches", "1",
                "--checkpoint-every", "2", "--num-workers", "2", "--chunk-weight", "0.5", "--json", *extra]

    code, out, err = cli_in_process(*args(tmp_path / "a"))
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    after = summary["after"]
    assert 0.2 < after["aligned"] < 1 and 0 < after["mapped_mass"] < 1 and after["bpb"] > 0
    run = json.loads((tmp_path / "a" / "checkpoints" / "step-000004" / "run.json").read_text())
    assert run["loss"] == "xtok-uld" and run["student_tokenizer"] == byte_level and run["token_map"] == "first"
    assert run["chunk_weight"] == 0.5  # the chunk term trained here (and a resume keeps it)
    assert run["alpha"] == 0.5  # unset: the default across tokenizers
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["chunk"] > 0 for r in rows if "loss" in r) and any("loss" in r for r in rows)
    code, _, err = cli_in_process(*args(tmp_path / "b", steps="2"))
    assert code == 0, err
    code, _, err = cli_in_process(*args(tmp_path / "b", "--resume"))
    assert code == 0, err
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert wa["model.embed_tokens.weight"].shape[0] == 700
    # A loss that compares ids one by one is refused with another tokenizer
    code, _, err = cli_in_process(*args(tmp_path / "c", "--loss", "topk-kl"))
    assert_one_line_error(code, err, "train", "--loss topk-kl", "another tokenizer", "xtok-uld")


def test_bad_input_across_tokenizers(label_set, tmp_path):
    """A student tokenizer that changes text, and spans that do not match the tokens: one line each."""
    from tokenizers import normalizers

    ls = open_label_set(label_set)
    lower = load_label_tokenizer(ls)
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(UserError, match=r"^student tokenizer lowercased does not reproduce text exactly, at byte 0 "):
        CrossTokenizer(ls, load_label_tokenizer(ls), lower, "lowercased")
    same = load_label_tokenizer(ls)
    cross = CrossTokenizer(ls, same, same, "same")
    s = next(ls.iter_samples())
    bad = Sample(s.sample_id, s.source, s.input_ids, s.topk_ids, s.topk_logprobs, s.tail_logprob,
                 spans=np.where(np.arange(len(s.spans)) == 3, 40, s.spans).astype(np.uint16))
    with pytest.raises(UserError, match=rf"^sample {s.sample_id} \(.+\): its spans do not match its tokens: position 3: "
                                        r"span of 40 bytes for token"):
        cross(bad)
    only_eos = Sample(s.sample_id, s.source, s.input_ids[:1] * 0 + same.eos_token_id, s.topk_ids[:1], s.topk_logprobs[:1],
                      s.tail_logprob[:1], spans=np.zeros(1, np.uint16))
    assert cross(only_eos) is None  # a chunk holding only an added EOS has no text: skipped
    # a set whose manifest says spans, with a shard that has none: the reader names the shard
    data = tmp_path / "nospans"
    import shutil

    shutil.copytree(label_set, data)
    m = json.loads((data / "manifest.json").read_text())
    m["spans"] = False
    (data / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Exception, match="has a spans column; the manifest says it has none"):
        next(open_label_set(str(data)).iter_samples())
    attach([], ls, same, "same")  # the set's own tokenizer: nothing to align
    # the chunk term on a set labeled before target log-probs (the stored v5 fixture): one line, before training
    v5 = str(__import__("pathlib").Path(__file__).parent / "fixtures" / "v5-sets" / "fp16")
    code, _, err = cli_in_process("train", "--labels", v5, "--output", str(tmp_path / "s"), "--chunk-weight", "0.5")
    assert_one_line_error(code, err, "train", "--chunk-weight", "holds no target log-probs", "schema v5")
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "s"), "--chunk-weight", "-1")
    assert_one_line_error(code, err, "train", "chunk_weight must be a finite number in [0, inf)")
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "s"),
                                  "--chunk-distance", "kl")
    assert_one_line_error(code, err, "train", "--chunk-distance", "surprisal")


def test_weights_default_by_tokenizer_and_a_resume_keeps_what_its_checkpoint_recorded():
    """--alpha / --chunk-weight / --chunk-distance unset: 0.5, 1 and binary with the set's tokenizer on a set with
    target log-probs (no chunk term without), 0.5 and no chunk term with another tokenizer (since 0.11); a resumed
    run takes what its checkpoint recorded (one of 0.8-0.10 across tokenizers keeps its chunk term), and a checkpoint
    written before 0.8.0 (no chunk weight recorded) continues with alpha 1 and without the chunk term; set values
    always win."""
    from softlabels.trainer.config import resolve_weights

    def weights(alpha, chunk, distance="binary"):
        return {"alpha": alpha, "chunk_weight": chunk, "chunk_distance": distance}

    assert resolve_weights(None, None, cross=False, has_targets=True) == weights(0.5, 1.0)
    assert resolve_weights(None, None, cross=False, has_targets=False) == weights(0.5, 0.0)
    assert resolve_weights(None, None, cross=True, has_targets=True) == weights(0.5, 0.0)
    assert resolve_weights(None, None, cross=True, has_targets=False) == weights(0.5, 0.0)
    old = {"alpha": 1.0, "loss": "xtok-uld"}  # a 0.7 checkpoint across tokenizers
    assert resolve_weights(None, None, True, True, recorded=old) == weights(1.0, 0.0)
    assert resolve_weights(None, None, True, True, recorded={"alpha": 0.5, "chunk_weight": 1.0}) == weights(0.5, 1.0)
    assert resolve_weights(0.3, 2.0, True, True, recorded=old, chunk_distance="surprisal") == weights(
        0.3, 2.0, "surprisal")
    assert resolve_weights(None, None, False, True, recorded={"alpha": 0.5, "chunk_weight": 1.0,
                                                             "chunk_distance": "surprisal"}) == weights(
        0.5, 1.0, "surprisal")
