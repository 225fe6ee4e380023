"""Chat and instruction data end to end: corpora as users keep them, trained-position masks,
labels only where trained, packing without cross-document attention, and the trainer's masks.

Masks are compared with a direct computation (render the prefix, count tokens); labels with a
direct full softmax of the teacher; packed labels with the same documents labeled one by one.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from softlabels.labeler.corpus import Corpus, RowFormat
from softlabels.labeler.plan import PlanCounts, Rendering, build_sequences, render
from softlabels.schemas import SCHEMA_VERSION, SequenceConfig, open_label_set
from softlabels.schemas.errors import UserError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def conv(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What is item {i} of the list?"},
            {"role": "assistant", "content": f"Item {i} is the number {i * 7}, which is {'odd' if i % 2 else 'even'}."},
            {"role": "user", "content": "And the next?"},
            {"role": "assistant", "content": f"The next one is {i * 7 + 7}."}]


def write_corpora(d: Path, n: int = 6) -> dict[str, Path]:
    """The same conversations in every file format the labeler reads."""
    rows = [{"messages": conv(i)} for i in range(n)]
    lines = "\n".join(json.dumps(r) for r in rows).encode() + b"\n"
    paths = {name: d / name for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.json", "c.parquet", "c.arrow")}
    paths["c.jsonl"].write_bytes(lines)
    paths["c.jsonl.gz"].write_bytes(gzip.compress(lines))
    with pa.CompressedOutputStream(str(paths["c.jsonl.zst"]), "zstd") as out:
        out.write(lines)
    paths["c.json"].write_text(json.dumps(rows))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, paths["c.parquet"], row_group_size=2)
    with pa.ipc.new_stream(str(paths["c.arrow"]), table.schema) as w:
        w.write_table(table)
    return paths


def test_every_file_format_reads_the_same_conversations(tmp_path, caplog):
    paths = write_corpora(tmp_path)
    import datasets

    datasets.Dataset.from_list([{"messages": conv(i)} for i in range(6)]).save_to_disk(str(tmp_path / "saved"))
    want = [conv(i) for i in range(6)]
    for spec in [*map(str, paths.values()), str(tmp_path / "saved")]:
        with caplog.at_level("INFO", logger="softlabels.labeler.corpus"):
            corpus = Corpus(spec)
        assert corpus.rows.format == "chat" and corpus.rows.train_on == "assistant", spec
        docs = [d for b in corpus.blocks() for d in corpus.reader.read(b)[0]]
        assert [d.messages for d in docs] == want, spec
    assert "corpus format: chat (detected from" in caplog.text


def test_share_gpt_and_prompt_completion_rows(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}) + "\n")
    docs = Corpus(str(tmp_path / "s.jsonl")).reader.read(Corpus(str(tmp_path / "s.jsonl")).blocks()[0])[0]
    assert docs[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "2+2?", "answer": " 4"}) + "\n")
    corpus = Corpus(str(tmp_path / "p.jsonl"), RowFormat("prompt-completion", prompt_field="question",
                                                         completion_field="answer"))
    assert corpus.rows.train_on == "completion"
    (doc,) = corpus.reader.read(corpus.blocks()[0])[0]
    assert doc.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " 4"}]


@pytest.mark.parametrize("row,fragment", [
    ({"messages": [{"role": "user"}]}, "message 0 needs a 'role' and a 'content'"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "message 0 has role 'wizard'"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "has list content; only text is supported"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn to train on"),
    ({"prompt": "only a prompt", "completion": None}, "has NoneType content"),
])
def test_bad_rows_are_one_line_naming_file_and_row_or_skipped_and_counted(tmp_path, row, fragment):
    good = {"messages": conv(0)} if "messages" in row else {"prompt": "p", "completion": "c"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    corpus = Corpus(str(path))  # the first row is good: the bad one is found when its block is read
    with pytest.raises(UserError, match=f"bad.jsonl:2: .*{fragment}"):
        corpus.reader.read(corpus.blocks()[0])
    skipping = Corpus(str(path), on_error="skip")
    docs, stats = skipping.reader.read(skipping.blocks()[0])
    assert len(docs) == 1 and len(stats.skipped) == 1 and fragment.split(" ")[0] in stats.skipped[0]
    # The same row first in its file is refused when the corpus is opened (before any teacher loads).
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1: "):
        Corpus(str(path))


def test_hub_datasets_come_from_the_local_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="hub dataset 'nobody/not-cached' .*not in the local cache"):
        Corpus("hf:nobody/not-cached")
    # A hub name is resolved by `datasets` from its cache (offline here) and read from its Arrow cache files.
    import datasets
    from test_corpus_bounds import cache_hub_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    src = tmp_path / "train.jsonl"
    src.write_text("\n".join(json.dumps({"messages": conv(i)}) for i in range(4)) + "\n")
    cache_hub_dataset(tmp_path / "cache", src, "nobody/cached")
    corpus = Corpus("hf:nobody/cached")
    assert corpus.rows.format == "chat" and all(f.endswith(".arrow") for f in corpus.files)
    assert [d.messages for b in corpus.blocks() for d in corpus.reader.read(b)[0]] == [conv(i) for i in range(4)]


def direct_mask(tok, messages, template):
    """Trained tokens by counting: the conversation up to each assistant turn (with the generation
    prompt) and through it (the end-of-turn token included, the newline after it not)."""
    def count(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def rendered(upto, gen=False):
        return tok.apply_chat_template(messages[:upto], chat_template=template, tokenize=False, add_generation_prompt=gen)

    mask = np.zeros(count(rendered(len(messages))), bool)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            mask[count(rendered(i, True)):count(rendered(i + 1).rstrip())] = True
    return mask


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def test_sequences_carry_label_masks_and_long_conversations_are_cut_at_turns(chatml_tokenizer):
    from softlabels.labeler.corpus import Document

    tok = chatml_tokenizer
    docs = [Document(f"d{i}", "", conv(i)) for i in range(3)]
    tokenized = render(docs, tok, Rendering("chat", "assistant", CHATML))
    for (_, ids, mask, _), d in zip(tokenized, docs):
        np.testing.assert_array_equal(mask, direct_mask(tok, d.messages, CHATML))
    seqs = list(build_sequences(tokenized, tok.eos_token_id, SequenceConfig(max_length=512)))
    for s, (_, ids, mask, _) in zip(seqs, tokenized):
        np.testing.assert_array_equal(s.trained[:-1], mask[1:])  # position t is trained when token t + 1 is
        assert not s.trained[-1]
    # Too long for both turns: cut right after the first assistant turn; too long for that: skipped.
    first_end = int(np.flatnonzero(tokenized[0][2])[0])
    while tokenized[0][2][first_end]:
        first_end += 1
    counts = PlanCounts()
    last_trained = int(np.flatnonzero(tokenized[0][2])[-1])  # the second turn's end-of-turn token
    (cut,) = build_sequences(tokenized[:1], None, SequenceConfig(max_length=last_trained), counts)
    assert len(cut.input_ids) == first_end and counts.truncated == 1
    assert tok.decode(cut.input_ids).endswith("even.<|im_end|>")
    assert not list(build_sequences(tokenized[:1], None, SequenceConfig(max_length=first_end - 1), counts))
    assert counts.too_long == 1
    # Packing: whole conversations share a sequence, each a document of its own.
    packed = list(build_sequences(tokenized, tok.eos_token_id, SequenceConfig(max_length=512, packing=True)))
    assert len(packed) == 1 and packed[0].doc_lengths == tuple(len(t[1]) for t in tokenized)
    np.testing.assert_array_equal(packed[0].trained, np.concatenate([s.trained for s in seqs]))


def test_prompt_completion_trains_the_completion_and_eos(chatml_tokenizer):
    from softlabels.labeler.corpus import Document

    tok = chatml_tokenizer
    doc = Document("p", "", [{"role": "user", "content": "2 + 2 ="}, {"role": "assistant", "content": " 4"}])
    ((_, ids, mask, _),) = render([doc], tok, Rendering("prompt-completion", "completion", None, None, tok.eos_token_id))
    n_prompt = len(tok("2 + 2 =", add_special_tokens=False)["input_ids"])
    assert list(ids[n_prompt:]) == tok(" 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert not mask[:n_prompt].any() and mask[n_prompt:].all()


def test_spans_of_chat_and_prompt_completion_rows_give_back_their_text(chatml_tokenizer):
    """Chat rows' text is the rendered conversation (template markers as their text); a prompt-completion row's
    is prompt + completion, its BOS/EOS covering no byte; cut conversations keep their spans' prefix."""
    from softlabels.common.tokenbytes import text_of, token_bytes
    from softlabels.labeler.chat import render_chat
    from softlabels.labeler.corpus import Document

    tok = chatml_tokenizer
    tb = token_bytes(tok)
    docs = [Document(f"d{i}", "", conv(i)) for i in range(2)]
    for (doc_id, ids, _, spans), d in zip(render(docs, tok, Rendering("chat", "assistant", CHATML, spans=tb)), docs):
        rendered = render_chat(tok, d.messages, CHATML, "assistant").text
        assert text_of(tb, ids, spans) == rendered.encode("utf-8") and rendered.count("<|im_start|>") >= 3
    doc = Document("p", "", [{"role": "user", "content": "Zwei + zwei ="}, {"role": "assistant", "content": " vier ✓"}])
    ((_, ids, _, spans),) = render([doc], tok, Rendering("prompt-completion", "completion", None, tok.bos_token_id,
                                                         tok.eos_token_id, spans=tb))
    assert ids[0] == tok.bos_token_id and spans[0] == 0 and ids[-1] == tok.eos_token_id and spans[-1] == 0
    assert text_of(tb, ids, spans) == "Zwei + zwei = vier ✓".encode("utf-8")
    tokenized = render(docs[:1], tok, Rendering("chat", "assistant", CHATML, spans=tb))
    full = tokenized[0][3]
    (seq,) = build_sequences(tokenized, None, SequenceConfig(max_length=len(full) - 1))
    assert len(seq.spans) == len(seq.input_ids) < len(full) and np.array_equal(seq.spans, full[:len(seq.spans)])


@pytest.fixture(scope="module")
def runner(tiny_teacher):
    from softlabels.labeler.seams import LabelSettings
    from softlabels.labeler.teacher import TeacherRunner, resolve_teacher

    return TeacherRunner(resolve_teacher(tiny_teacher), "float32", "cpu", LabelSettings(top_k=8, batch_tokens=512))


def test_labels_exist_only_at_trained_positions_and_equal_a_full_softmax(runner):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 300, size=n).astype(np.int32) for n in (40, 25)]
    trained = [rng.random(len(s)) < 0.4 for s in seqs]
    labels = runner.label(seqs, trained)
    assert labels.lengths == tuple(int(t.sum()) for t in trained)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            logits = runner.model(input_ids=torch.from_numpy(s.astype(np.int64))[None]).logits[0]
        full = torch.log_softmax(logits.double(), -1)[torch.from_numpy(np.flatnonzero(trained[i]))]
        got = labels.sequence(i)
        want_lp, want_ids = full.topk(8, -1)
        np.testing.assert_array_equal(got["topk_ids"], want_ids.numpy())
        np.testing.assert_allclose(got["topk_logprobs"], want_lp.numpy(), atol=1e-4)
        tail = torch.log1p(-want_lp.exp().sum(-1).clamp(max=1 - 1e-12))
        np.testing.assert_allclose(got["tail_logprob"], tail.numpy(), atol=1e-3)


def test_packed_documents_get_the_labels_they_get_alone(runner):
    """Block-diagonal attention and restarting positions: no document sees another."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 300, size=n).astype(np.int32) for n in (17, 30, 9)]
    alone = runner.label(docs)
    packed = runner.label([np.concatenate(docs), docs[0]], doc_lengths=[tuple(len(d) for d in docs), None])
    joined = packed.sequence(0)
    start = 0
    for i, d in enumerate(docs):
        one = alone.sequence(i)
        np.testing.assert_array_equal(joined["topk_ids"][start:start + len(d)], one["topk_ids"])
        np.testing.assert_allclose(joined["topk_logprobs"][start:start + len(d)], one["topk_logprobs"], atol=2e-5)
        start += len(d)
    np.testing.assert_allclose(packed.sequence(1)["topk_logprobs"], alone.sequence(0)["topk_logprobs"], atol=2e-5)
    # Without the block mask the later documents would see the earlier ones (the test can fail).
    leaky = runner.label([np.concatenate(docs)])
    assert not np.allclose(leaky.sequence(0)["topk_logprobs"][17:47], alone.sequence(1)["topk_logprobs"], atol=1e-3)


@pytest.mark.slow
def test_chat_label_set_end_to_end(ray_local, tiny_teacher, tmp_path, chatml_tokenizer):
    """The labeler on a chat corpus: stored masks equal the direct count, labels only where trained,
    packed documents recorded; the trainer learns only there."""
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import run

    paths = write_corpora(tmp_path, n=10)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    out = str(tmp_path / "set")
    summary = run(LabelConfig(teacher=tiny_teacher, corpus=str(paths["c.jsonl"]), output=out, top_k=8, max_length=256,
                              shard_tokens=400, batch_tokens=1024, chat_template=str(template), encoding="fp16"))
    assert summary.format == "chat" and summary.train_on == "assistant" and 0 < summary.trained_tokens < summary.tokens
    ls = open_label_set(out)
    m = ls.manifest
    assert m.schema_version == SCHEMA_VERSION and m.rendering["format"] == "chat"
    assert m.rendering["date"] == "2024-07-26"  # what strftime_now() saw: pinned (--chat-date), never the clock
    assert m.rendering["chat_template_sha256"] == __import__("hashlib").sha256(CHATML.encode()).hexdigest()
    assert m.totals.trained == sum(s.trained for s in m.shards) == summary.trained_tokens
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)  # the teacher's own: the template's markers are plain text
    samples = list(ls.iter_samples())
    assert len(samples) == 10
    for s in samples:
        i = int(s.source.split(":")[-1].split("#")[0]) - 1
        mask = direct_mask(tok, conv(i), CHATML)
        np.testing.assert_array_equal(s.trained[:-1], mask[1:])
        assert len(s.topk_ids) == int(s.trained.sum()) < len(s.input_ids)  # nothing stored where untrained
    # What is stored at the trained positions is the teacher's full softmax there (fp16 encoding).
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    s = samples[0]
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=torch.tensor(s.input_ids, dtype=torch.long)[None]).logits[0], -1)
    at = full[torch.from_numpy(s.label_positions)]
    want_lp, _ = at.topk(8, -1)
    # Near-ties may swap places between a batched and a single forward: compare values, and the
    # direct log-probs of the stored ids.
    np.testing.assert_allclose(s.topk_logprobs, want_lp.numpy(), atol=2e-2, rtol=1e-3)
    np.testing.assert_allclose(s.topk_logprobs, at.gather(-1, torch.tensor(s.topk_ids, dtype=torch.long)).numpy(),
                               atol=2e-2, rtol=1e-3)

    # convert keeps the masks (and the counts of trained positions).
    from softlabels.convert import convert

    convert(out, str(tmp_path / "compact"), "compact")
    converted = open_label_set(str(tmp_path / "compact"))
    assert converted.manifest.totals.trained == m.totals.trained and converted.manifest.rendering == m.rendering
    for a, b in zip(samples, converted.iter_samples()):
        np.testing.assert_array_equal(a.trained, b.trained)
        assert [set(r) for r in a.topk_ids] == [set(r) for r in b.topk_ids]  # compact may reorder near-ties

    # The trainer: loss and gradient ignore untrained positions (labels there may be anything).
    from softlabels.trainer.data import collate, sample_to_tensors
    from softlabels.trainer.losses import chunked_loss

    batch = collate([sample_to_tensors(s) for s in samples[:3]])
    assert torch.equal(batch["label_mask"][0, : len(samples[0].input_ids)], torch.from_numpy(samples[0].trained))
    assert ((batch["targets"] != -100) <= batch["label_mask"]).all()
    head = torch.nn.Linear(16, len(tok), bias=False)
    hidden = torch.randn(*batch["input_ids"].shape, 16, requires_grad=True)
    loss, _ = chunked_loss(hidden, head, "tail-kl", batch, 1.0, 0.5, 64)
    loss.backward()
    untrained = ~batch["label_mask"]
    assert hidden.grad[untrained].abs().max() == 0 and hidden.grad[batch["label_mask"]].abs().max() > 0
    noisy = dict(batch, topk_logprobs=batch["topk_logprobs"].masked_fill(untrained[..., None], -0.1))
    again, _ = chunked_loss(hidden.detach(), head, "tail-kl", noisy, 1.0, 0.5, 64)
    assert torch.allclose(again, loss.detach())


def test_chat_corpus_without_a_chat_template_is_refused(tiny_teacher, tmp_path):
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import _check_teacher

    with pytest.raises(UserError, match="has no chat template: give one with --chat-template FILE"):
        _check_teacher(LabelConfig(teacher=tiny_teacher, output=str(tmp_path / "o"), top_k=8, max_length=64),
                       __import__("softlabels.labeler.teacher", fromlist=["x"]).resolve_teacher(tiny_teacher), "chat")


def test_builtin_chat_corpus_is_offline_and_deterministic():
    corpus = Corpus("pydoc-chat")
    assert corpus.rows.format == "chat" and corpus.rows.train_on == "assistant"
    first = corpus.reader.read(corpus.blocks()[0])
    again = Corpus("pydoc-chat").reader.read(corpus.blocks()[0])
    assert first[1].sha256 == again[1].sha256 and len(first[0]) > 20
    for d in first[0]:
        roles = [m["role"] for m in d.messages]
        assert roles[:2] == ["user", "assistant"] and all(m["content"].strip() for m in d.messages)


def test_large_files_are_read_in_pieces_that_add_up_to_the_whole(tmp_path, monkeypatch):
    """JSON Lines by byte ranges (a line belongs to the piece its first byte is in), Parquet by row
    groups, Arrow by record batches: the pieces' rows are the file's rows, once each, in order."""
    rows = [{"text": f"row {i} " + "x" * (i * 37 % 200)} for i in range(120)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=10)
    with pa.ipc.new_stream(str(tmp_path / "c.arrow"), table.schema) as w:
        for i in range(0, 120, 15):
            w.write_table(table.slice(i, 15))
    monkeypatch.setenv("SOFTLABELS_PIECE_BYTES", "700")
    for name in ("a.jsonl", "b.parquet", "c.arrow"):
        corpus = Corpus(str(tmp_path / name))
        blocks = corpus.blocks()
        assert len(blocks) > 3 and all(b.stop for b in blocks), name
        assert [d.text for b in blocks for d in corpus.reader.read(b)[0]] == [r["text"] for r in rows], name


def test_trainer_packing_gives_the_losses_of_unpacked_rows(runner):
    """--packing joins a batch's sequences into rows, each in its own attention block with its own
    positions: the student's loss (and its CE targets) equal those of the rows fed one per row."""
    from softlabels.schemas import Sample
    from softlabels.trainer.data import collate, model_inputs, sample_to_tensors
    from softlabels.trainer.losses import chunked_loss

    rng = np.random.default_rng(2)
    samples = []
    for n in (12, 20, 7, 15):
        ids = rng.integers(3, 300, size=n).astype(np.int32)
        trained = rng.random(n) < 0.7
        t = int(trained.sum())
        top = np.stack([rng.choice(300, size=4, replace=False) for _ in range(t)]).astype(np.int32)
        lp = np.log(np.full((t, 4), 0.2, np.float32))
        samples.append(Sample(f"{n:016x}", "s", ids, top, lp, np.log(np.full(t, 0.2, np.float32)), trained=trained))
    model = runner.model
    body, head = model.get_decoder(), model.get_output_embeddings()
    tensors = [sample_to_tensors(s) for s in samples]
    plain, packed = collate(tensors), collate(tensors, pack_to=35)
    assert packed["input_ids"].shape[0] == 2 and packed["doc_lengths"].tolist() == [[12, 20], [7, 15]]
    assert int((packed["targets"] != -100).sum()) == int((plain["targets"] != -100).sum())
    with torch.no_grad():
        losses = [chunked_loss(body(**model_inputs(b, model)).last_hidden_state, head, "tail-kl", b, 1.0, 0.5, 64)[0]
                  for b in (plain, packed)]
    assert torch.allclose(losses[0], losses[1], atol=1e-5), losses


def test_chat_template_file_missing_or_empty_is_one_line(tmp_path):
    from softlabels.labeler.job import _chat_template

    with pytest.raises(UserError, match="--chat-template .*nope.jinja: cannot be read"):
        _chat_template(str(tmp_path / "nope.jinja"))
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(UserError, match="the file is empty"):
        _chat_template(str(tmp_path / "empty.jinja"))
    assert _chat_template(None) is None


def test_a_conversation_the_template_refuses_is_a_bad_row(tmp_path, chatml_tokenizer):
    """A template's own raise_exception (e.g. no system turns) is one line naming the row, or skipped and counted."""
    from softlabels.labeler.corpus import BadRow
    from softlabels.labeler.plan import read_and_tokenize

    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System turns are not supported') }}{% endif %}" + CHATML
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": conv(1)[1:]}) + "\n" + json.dumps({"messages": conv(2)}) + "\n")
    rendering = Rendering("chat", "assistant", strict)
    corpus = Corpus(str(path))
    with pytest.raises(BadRow, match="c.jsonl:2: the chat template refused it .*System turns are not supported"):
        read_and_tokenize(corpus.reader, corpus.blocks()[0], chatml_tokenizer, None, rendering)
    skipping = Corpus(str(path), on_error="skip")
    docs, stats = read_and_tokenize(skipping.reader, skipping.blocks()[0], chatml_tokenizer, None, rendering)
    assert len(docs) == 1 and len(stats.skipped) == 1 and stats.documents == 2


def test_format_detection_reads_a_long_first_row_and_odd_inputs(tmp_path, monkeypatch):
    long_chat = {"messages": [{"role": "user", "content": "x" * 100_000}, {"role": "assistant", "content": "ok"}]}
    (tmp_path / "long.jsonl").write_text(json.dumps(long_chat) + "\n")
    assert Corpus(str(tmp_path / "long.jsonl")).rows.format == "chat"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps({"text": f"t{i}"}).encode()
                                                                      for i in range(50)) + b"\n")
    monkeypatch.setenv("SOFTLABELS_PIECE_BYTES", "100")
    corpus = Corpus(str(tmp_path / "bom.jsonl"))
    assert [d.text for b in corpus.blocks() for d in corpus.reader.read(b)[0]] == [f"t{i}" for i in range(50)]
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    fmt = Corpus(str(tmp_path / "q.jsonl"), RowFormat(prompt_field="question", completion_field="answer")).rows
    assert fmt.format == "prompt-completion"


def test_train_on_all_keeps_conversations_whole_and_cuts_long_ones(chatml_tokenizer):
    from softlabels.labeler.corpus import Document

    tok = chatml_tokenizer
    tokenized = render([Document(f"d{i}", "", conv(i)) for i in range(2)], tok, Rendering("chat", "all", CHATML))
    assert all(m.all() for _, _, m, _ in tokenized)
    counts = PlanCounts()
    (cut, _) = build_sequences(tokenized, tok.eos_token_id, SequenceConfig(max_length=30), counts)
    assert len(cut.input_ids) == 30 and counts.truncated == 2 and counts.too_long == 0
    packed = list(build_sequences(tokenized, tok.eos_token_id, SequenceConfig(max_length=512, packing=True)))
    assert len(packed) == 1 and tok.eos_token_id not in packed[0].input_ids  # no EOS added after a conversation
    assert packed[0].doc_lengths == tuple(len(t[1]) for t in tokenized)


def test_templates_that_end_a_conversation_with_eos_mask_every_turn(chatml_tokenizer):
    """Phi-3's shape: an end-of-turn token per turn, and EOS after the last turn only."""
    from softlabels.labeler.chat import render_chat

    phi3 = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% else %}{{ eos_token }}{% endif %}")
    r = render_chat(chatml_tokenizer, conv(3), phi3)
    runs = np.split(np.asarray(r.input_ids), np.flatnonzero(np.diff(np.asarray(r.trained, int))) + 1)
    trained = [chatml_tokenizer.decode(x) for x, on in zip(runs, np.split(np.asarray(r.trained), len(runs) and
               np.flatnonzero(np.diff(np.asarray(r.trained, int))) + 1)) if on[0]]
    assert trained == [conv(3)[2]["content"] + "<|im_end|>", conv(3)[4]["content"] + "<|im_end|>\n</s>"]


def test_plain_text_gets_bos_exactly_when_the_tokenizer_adds_one(tiny_teacher, tmp_path):
    from tokenizers import processors
    from transformers import AutoTokenizer

    from softlabels.labeler.corpus import Document
    from softlabels.labeler.plan import tokenizer_bos

    plain = AutoTokenizer.from_pretrained(tiny_teacher)
    assert tokenizer_bos(plain) is None  # adds none: none is added (the built-in teacher's case too)
    llama_like = AutoTokenizer.from_pretrained(tiny_teacher)
    bos = llama_like.bos_token_id
    llama_like.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    assert tokenizer_bos(llama_like) == bos
    docs = [Document("a", "def f(x): return x"), Document("b", "<s>already there")]
    got = render(docs, llama_like, Rendering("text", "all", None, tokenizer_bos(llama_like)))
    for (_, ids, _, _), d in zip(got, docs):
        assert ids[0] == bos and ids[1] != bos  # one BOS: none missing, none doubled
    assert [int(x) for x in got[0][1][1:]] == plain("def f(x): return x", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_a_corpus_of_conversations_all_too_long_says_so(ray_local, tiny_teacher, tmp_path):
    """Nothing fits --max-length: the refusal counts the conversations skipped as too long (it said '0 skipped')."""
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import run
    from softlabels.labeler.pipeline import NothingToLabel

    paths = write_corpora(tmp_path, n=3)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    with pytest.raises(NothingToLabel, match=r"\(3 documents, 0 empty, 0 skipped; 3 conversation\(s\) whose first "
                                             r"trained turn does not fit --max-length 16\)"):
        run(LabelConfig(teacher=tiny_teacher, corpus=str(paths["c.jsonl"]), output=str(tmp_path / "set"), top_k=8,
                        max_length=16, batch_tokens=1024, chat_template=str(template)))
    assert not (tmp_path / "set" / "manifest.json").exists()
