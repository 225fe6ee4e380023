"""The labeler on a real local Ray, with a tiny teacher, on local disk and the real S3 server."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch

from softlabels.labeler.config import LabelConfig
from softlabels.labeler.job import run
from softlabels.common.commit import OutputError
from softlabels.schemas import open_label_set, resolve_url, tokenizer_fingerprint, sample_id

from conftest import ACCESS_KEY, SECRET_KEY, cli_in_process, run_cli


def cfg(teacher: str, output: str, **kw) -> LabelConfig:
    # fp16 (lossless but for fp16 rounding) so tests of the teacher math can compare exactly;
    # the default compact encoding is checked against the same direct computation below.
    base = dict(teacher=teacher, corpus="pydoc", output=output, top_k=8, max_length=64, limit=24,
                shard_tokens=400, batch_tokens=512, encoding="fp16")
    base.update(kw)
    return LabelConfig(**base)


def direct_labels(teacher_dir: str, ids: np.ndarray, k: int, follows: bool = False):
    """Full-softmax labels of one sequence, computed directly in fp64 (``follows``: also each position's
    log-prob of the token after it, NaN at the last)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(ids, dtype=torch.long)[None]).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    vals, top = torch.topk(logp, k, -1)
    rest = torch.logsumexp(logp.scatter(-1, top, float("-inf")), -1)
    if not follows:
        return top.numpy(), vals.numpy(), rest.numpy()
    nxt = np.full(len(ids), np.nan)
    nxt[:-1] = logp[torch.arange(len(ids) - 1), torch.tensor(np.array(ids[1:]), dtype=torch.long)].numpy()
    return top.numpy(), vals.numpy(), rest.numpy(), nxt


def read_all_bytes(root: str) -> dict[str, bytes]:
    fs, path = resolve_url(root)
    fs.invalidate_cache()
    out = {}
    for f in sorted(fs.find(path)):
        rel = f[len(path) + 1 :]
        if rel.startswith(("shards/", "_commits/")):
            out[rel] = fs.cat_file(f)
    return out


def assert_within_encoding_error(s, teacher_dir: str, max_kl: float) -> None:
    """A lossy sample vs the direct fp64 softmax: same id sets, KL(exact buckets || stored) within budget."""
    top, _, _ = direct_labels(teacher_dir, s.input_ids, s.topk_ids.shape[1])
    assert (np.sort(top, 1) == np.sort(s.topk_ids, 1)).all(1).mean() > 0.95  # k-th/k+1-th near-ties may swap
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(s.input_ids, dtype=torch.long)[None]).logits[0].double(), -1)
    stored = torch.tensor(s.topk_ids, dtype=torch.long)
    exact = logp.gather(-1, stored).numpy()
    exact_tail = torch.logsumexp(logp.scatter(-1, stored, float("-inf")), -1).numpy()
    p = np.exp(np.concatenate([exact, exact_tail[:, None]], 1))
    q = np.exp(np.concatenate([s.topk_logprobs, s.tail_logprob[:, None]], 1).astype(np.float64))
    kl = (p * (np.log(p) - np.log(q / q.sum(1, keepdims=True)))).sum(1)
    assert 0 < kl.mean() < 1.5 * max_kl, kl.mean()  # 1.5: the budget is per shard, this is one sequence


@pytest.mark.slow
def test_labels_match_direct_full_softmax(ray_local, tiny_teacher, storage_root):
    if not storage_root.startswith("/"):  # S3 run: the default, lossy compact encoding
        run(cfg(tiny_teacher, storage_root, encoding="compact"))
        ls = open_label_set(storage_root)
        budget = ls.manifest.label_encoding.max_kl
        assert budget == 1e-4
        for s in list(ls.iter_samples())[:3]:
            assert_within_encoding_error(s, tiny_teacher, budget)
        return
    summary = run(cfg(tiny_teacher, storage_root))
    ls = open_label_set(storage_root)
    m = ls.manifest
    assert summary.sequences == m.totals.sequences == 24
    assert len(m.shards) > 1 and m.top_k == 8
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    assert m.tokenizer.fingerprint == tokenizer_fingerprint(tok)
    samples = list(ls.iter_samples())
    assert sum(len(s.input_ids) for s in samples) == m.totals.tokens
    for s in samples[:4] + samples[-2:]:
        assert s.sample_id == sample_id(m.tokenizer.fingerprint, s.input_ids)
        top, vals, tail, nxt = direct_labels(tiny_teacher, s.input_ids, 8, follows=True)
        np.testing.assert_array_equal(s.topk_ids, top)
        np.testing.assert_allclose(s.topk_logprobs, vals, atol=2e-3 + 1e-3 * np.abs(vals).max())  # fp16 storage
        np.testing.assert_allclose(s.tail_logprob, tail, atol=1e-4)
        np.testing.assert_allclose(s.target_logprob, nxt, atol=1e-4)  # float32, in the top-k or not; NaN last
    assert m.target_logprobs and m.schema_version == 7 and not m.sampler_logprobs and m.generation is None
    # the manifest records what was labeled, and never the credentials
    text = json.dumps(json.loads(m.to_json()))
    assert SECRET_KEY not in text and ACCESS_KEY not in text


@pytest.mark.slow
def test_sequences_cover_documents_without_loss(ray_local, tiny_teacher, tmp_path):
    """Per-document chunks: concatenating a document's chunks gives back its tokens."""
    from transformers import AutoTokenizer
    from pydoc_data.topics import topics

    run(cfg(tiny_teacher, str(tmp_path / "ls"), limit=None, max_length=128, shard_tokens=20000, batch_tokens=4096,
            corpus=str(_small_corpus(tmp_path))))
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    samples = list(open_label_set(str(tmp_path / "ls")).iter_samples())
    by_doc: dict[str, list] = {}
    for s in samples:
        doc, chunk = s.source.rsplit("#", 1)
        by_doc.setdefault(doc, []).append((int(chunk), s.input_ids))
    names = sorted(topics)[:5]
    assert len(by_doc) == len(names)
    for i, name in enumerate(names):
        chunks = [ids for _, ids in sorted(by_doc[f"{tmp_path / 'corpus.jsonl'}:{i + 1}"], key=lambda c: c[0])]
        assert all(len(c) <= 128 for c in chunks)
        np.testing.assert_array_equal(np.concatenate(chunks), tok(topics[name], add_special_tokens=False)["input_ids"])


def _small_corpus(tmp_path):
    from pydoc_data.topics import topics

    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:5]))
    return p


@pytest.mark.slow
def test_rerun_is_a_no_op_and_resume_redoes_only_missing_units(ray_local, tiny_teacher, s3_server):
    # On S3; on local disk the same resume runs in tests/test_labeler_faults.py (after real SIGKILLs).
    storage_root = f"{s3_server}/rerun-{uuid.uuid4().hex[:8]}"
    c = cfg(tiny_teacher, storage_root, shard_tokens=300)  # 6 units: one indexed block of 4, two markers
    run(c)
    before = read_all_bytes(storage_root)
    again = run(c)
    assert again.status == "already complete" and again.labeled_tokens == 0
    n_units = len(open_label_set(storage_root).manifest.shards)
    fs, path = resolve_url(storage_root)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path + "/_commits")}
    # Blocks of 4 units (SOFTLABELS_INDEX_UNITS) are gathered into an index and their markers deleted;
    # the last, partial block keeps its markers.
    assert n_units % 4 and names == {"index"} | {f"part-{i:06d}.json" for i in range(n_units // 4 * 4, n_units)}, names
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(path + "/_commits/index")} == {
        f"{b:06d}.json" for b in range(n_units // 4)}
    # Simulate a crash: the last unit lost its marker; an indexed unit's shard is truncated.
    last = f"part-{n_units - 1:06d}"
    fs.rm(f"{path}/_commits/{last}.json")
    fs.pipe_file(path + "/shards/part-000002.parquet", before["shards/part-000002.parquet"][:100])
    fs.rm(path + "/manifest.json")
    resumed = run(c)
    assert resumed.resumed_units == n_units - 2
    assert resumed.labeled_tokens == sum(
        s.tokens for s in open_label_set(storage_root).manifest.shards if s.path.endswith(("002.parquet", f"{last}.parquet"))
    )
    assert read_all_bytes(storage_root) == before


@pytest.mark.slow
def test_resume_with_different_settings_is_refused(ray_local, tiny_teacher, tmp_path):
    out = str(tmp_path / "ls")
    run(cfg(tiny_teacher, out))
    with pytest.raises(OutputError, match=r"top_k: stored 8, now 4"):
        run(cfg(tiny_teacher, out, top_k=4))
    with pytest.raises(OutputError, match=r"max_length"):
        run(cfg(tiny_teacher, out, max_length=32))
    summary = run(cfg(tiny_teacher, out, top_k=4, overwrite=True))
    assert summary.status == "written" and open_label_set(out).manifest.top_k == 4


@pytest.mark.slow
def test_cli_wrong_credentials_fail_clearly(tiny_teacher, tmp_path, s3_server):
    import os
    import subprocess
    import sys

    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="wrong")
    proc = subprocess.run(
        [sys.executable, "-m", "softlabels", "label", "--teacher", tiny_teacher, "--output", f"{s3_server}/x", "--limit", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("softlabels label: error: output") and ("denied" in last or "reachable" in last), last


@pytest.mark.slow
def test_a_dead_ray_address_fails_fast_in_one_line(tiny_teacher, tmp_path):
    # ray.init() retries a dead GCS for minutes; a hang would hit run_cli's timeout instead.
    proc = run_cli("label", "--teacher", tiny_teacher, "--output", str(tmp_path / "dead"), "--limit", "2",
                   "--max-length", "32", "--ray-address", "127.0.0.1:1", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("softlabels label: error: cannot join the Ray cluster at '127.0.0.1:1'"), last
    assert not (tmp_path / "dead" / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 300])
def test_labels_match_direct_full_softmax_at_extreme_k(ray_local, tiny_teacher, tmp_path, k):
    """k = 1 and k = the whole vocabulary (tail = -inf: nothing outside the top-k)."""
    out = str(tmp_path / "ls")
    run(cfg(tiny_teacher, out, top_k=k, limit=6))
    ls = open_label_set(out)
    assert ls.manifest.tokenizer.vocab_size == 300
    for s in list(ls.iter_samples())[:3]:
        top, vals, tail = direct_labels(tiny_teacher, s.input_ids, k)
        np.testing.assert_array_equal(s.topk_ids[:, :8], top[:, :8])  # beyond that, near-ties may swap
        got = np.take_along_axis(vals, np.argsort(top, -1), -1)  # compare log-probs id by id
        want = np.take_along_axis(s.topk_logprobs.astype(np.float64), np.argsort(s.topk_ids, -1), -1)
        np.testing.assert_allclose(want, got, atol=2e-3 + 1e-3 * np.abs(got).max())
        if k == 300:
            assert np.isneginf(s.tail_logprob).all()
            assert (np.sort(s.topk_ids, -1) == np.arange(300)).all()
        else:
            np.testing.assert_allclose(s.tail_logprob, tail, atol=1e-4)


@pytest.mark.slow
def test_packing_joins_documents_with_eos_and_keeps_the_remainder(ray_local, tiny_teacher, tmp_path):
    from transformers import AutoTokenizer
    from pydoc_data.topics import topics

    out = str(tmp_path / "ls")
    run(cfg(tiny_teacher, out, limit=None, packing=True, max_length=100, shard_tokens=20000, batch_tokens=1000,
            corpus=str(_small_corpus(tmp_path))))
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    samples = list(open_label_set(out).iter_samples())
    stream = np.concatenate([
        np.append(tok(topics[k], add_special_tokens=False)["input_ids"], tok.eos_token_id) for k in sorted(topics)[:5]
    ])
    assert [s.source for s in samples] == [f"packed:{i}" for i in range(len(samples))]
    assert all(len(s.input_ids) == 100 for s in samples[:-1]) and 0 < len(samples[-1].input_ids) <= 100
    np.testing.assert_array_equal(np.concatenate([s.input_ids for s in samples]), stream)
    # Each row records the documents in it (pieces of the stream between EOS tokens); a document's EOS
    # position, whose label would predict another document, is not trained; everything else is.
    ends = np.flatnonzero(stream == tok.eos_token_id)
    for i, s in enumerate(samples):
        start = 100 * i
        cuts = [e + 1 - start for e in ends if start <= e < start + len(s.input_ids)]
        bounds = sorted(set([0, *cuts, len(s.input_ids)]))
        np.testing.assert_array_equal(s.doc_lengths if s.doc_lengths is not None else [len(s.input_ids)], np.diff(bounds))
        want = np.ones(len(s.input_ids), bool)
        want[[c - 1 for c in cuts]] = False
        np.testing.assert_array_equal(s.trained if s.trained is not None else np.ones(len(s.input_ids), bool), want)
        # the token that follows: none after a row's last position (a document's EOS is not trained)
        np.testing.assert_array_equal(np.isnan(s.target_logprob), s.label_positions == len(s.input_ids) - 1)


@pytest.mark.slow
def test_resume_with_different_teacher_or_corpus_is_refused(ray_local, tiny_teacher, tmp_path):
    import shutil

    corpus = _small_corpus(tmp_path)
    out = str(tmp_path / "ls")
    base = dict(limit=None, corpus=str(corpus), shard_tokens=300)
    run(cfg(tiny_teacher, out, **base))
    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_teacher, other)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.save_pretrained(other)
    with pytest.raises(OutputError, match=r"teacher\.(id|weights_sha256)"):
        run(cfg(str(other), out, **base))
    # A file added to the corpus changes its listing: refused before any work.
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines) + json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(OutputError, match=r"corpus\.listing"):
        run(cfg(tiny_teacher, out, **base))
    # Same size, different text inside a committed unit (the first document's first two letters swapped, so the
    # change lies in unit 0 whatever the tokenizer makes of it): caught by the unit's input digest.
    at = lines[0].index('"text": "') + len('"text": "')
    assert lines[0][at:at + 2].isalpha()
    lines[0] = lines[0][:at] + lines[0][at + 1] + lines[0][at] + lines[0][at + 2:]
    corpus.write_text("".join(lines))
    fs, path = resolve_url(out)
    fs.rm(path + "/manifest.json")
    with pytest.raises(OutputError, match=r"part-000000 was labeled from different input"):
        run(cfg(tiny_teacher, out, **base))


@pytest.mark.slow
def test_bad_rows_fail_with_file_and_row_or_are_skipped_and_counted(ray_local, tiny_teacher, tmp_path):
    from softlabels.labeler.corpus import BadRow

    corpus = tmp_path / "c.jsonl"
    rows = [json.dumps({"text": "good one"}), "{not json", json.dumps({"text": ""}), json.dumps({"text": 7}),
            json.dumps({"text": "good two"})]
    corpus.write_bytes(("\n".join(rows) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(BadRow, match=rf"{corpus}:2: not valid JSON"):
        run(cfg(tiny_teacher, str(tmp_path / "a"), corpus=str(corpus), limit=None))
    summary = run(cfg(tiny_teacher, str(tmp_path / "b"), corpus=str(corpus), limit=None, on_error="skip"))
    m = open_label_set(str(tmp_path / "b")).manifest
    assert (m.corpus.documents, m.corpus.empty_documents, m.corpus.skipped_documents) == (6, 1, 3)
    assert summary.skipped_documents == 3 and summary.sequences == 2
    assert [s.source for s in open_label_set(str(tmp_path / "b")).iter_samples()] == [f"{corpus}:1#0", f"{corpus}:5#0"]


@pytest.mark.slow
def test_inspect_statistics_match_a_direct_computation_and_plot(ray_local, tiny_teacher, tmp_path):
    out = str(tmp_path / "ls")
    run(cfg(tiny_teacher, out))
    png = tmp_path / "stats.png"
    code, stdout, err = cli_in_process("inspect", out, "--max-shards", "100", "--plot", str(png))
    assert code == 0, err[-3000:]
    report = json.loads(stdout)
    lp = np.concatenate([s.topk_logprobs.astype(np.float64) for s in open_label_set(out).iter_samples()])
    tail = np.concatenate([s.tail_logprob.astype(np.float64) for s in open_label_set(out).iter_samples()])
    p = np.exp(np.concatenate([lp, tail[:, None]], -1))
    entropy = -(p * np.log(p)).sum(-1)
    assert report["sampled_positions"] == len(lp) == report["tokens"]
    assert report["entropy"]["mean"] == pytest.approx(entropy.mean(), rel=1e-9)
    assert report["tail_mass"]["p50"] == pytest.approx(np.median(p[:, -1]), rel=1e-9)
    assert report["topk_mass"]["mean"] == pytest.approx(p[:, :-1].sum(-1).mean(), rel=1e-9)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.slow
def test_tail_samples_are_drawn_outside_the_topk_reproducibly_and_train(ray_local, tiny_teacher, label_set, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        run(cfg(tiny_teacher, out, limit=8, tail_samples=8, encoding="compact"))
    assert read_all_bytes(a) == read_all_bytes(b)  # seeded by the tokens: a resumed unit draws the same
    ls = open_label_set(a)
    assert ls.manifest.tail_samples == 8
    n_positions = 0
    for s in ls.iter_samples():
        counts = s.tail_sample_counts.astype(int)
        assert (counts.sum(1) == 8).all()
        for row in range(len(s.input_ids)):
            drawn = s.tail_sample_ids[row][counts[row] > 0]
            assert len(set(drawn.tolist())) == len(drawn) and not set(drawn.tolist()) & set(s.topk_ids[row].tolist())
        n_positions += len(s.input_ids)
    assert n_positions == ls.manifest.totals.tokens
    from softlabels.trainer.loop import TrainConfig, train

    summary = train(TrainConfig(labels=a, output=str(tmp_path / "student"), steps=3, batch_size=2,
                                loss="tail-sampled", eval_fraction=0.25))
    assert np.isfinite(summary["after"]["kl"]) and summary["steps"] == 3
    # refused before training: truncating k (the draws never saw what k' drops), or a set without draws
    with pytest.raises(ValueError, match="cannot use --top-k"):
        TrainConfig(labels=a, output=str(tmp_path / "s2"), loss="tail-sampled", top_k=4)
    with pytest.raises(ValueError, match="has no tail samples"):
        train(TrainConfig(labels=label_set, output=str(tmp_path / "s3"), steps=1, loss="tail-sampled"))
    assert not (tmp_path / "s3").exists() or not any((tmp_path / "s3").iterdir())


def test_corpus_edge_cases_read_as_a_user_means(tmp_path):
    """Any-case extensions, a BOM, a name with brackets taken literally, and the run's own output left out."""
    from pathlib import Path

    from softlabels.labeler.corpus import Corpus

    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.TXT").write_text("upper case extension")
    (d / "b.JSONL").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a BOM before the first line"}).encode() + b"\n")
    (d / "data[1].txt").write_text("brackets in the name")
    out = d / "labels"  # the run's own output inside the corpus folder: never read back as corpus
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "part-000000.jsonl").write_text('{"not": "text"}\n')
    corpus = Corpus(str(d), exclude=str(out))
    assert [Path(f).name for f in corpus.files] == ["a.TXT", "b.JSONL", "data[1].txt"]
    texts = [doc.text for b in corpus.blocks() for doc in corpus.reader.read(b)[0]]
    assert texts == ["upper case extension", "a BOM before the first line", "brackets in the name"]
    assert [Path(f).name for f in Corpus(str(d / "data[1].txt")).files] == ["data[1].txt"]


def test_a_long_document_is_tokenized_only_as_far_as_the_limit_needs(tiny_teacher):
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    from softlabels.labeler.corpus import Document
    from softlabels.labeler.plan import tokenize

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    text = " ".join(topics[k] for k in sorted(topics)) * 2  # ~0.9 MB on one line
    full = tok(text, add_special_tokens=False)["input_ids"]
    ((_, ids),) = tokenize([Document("long", text)], tok, max_tokens=3000)
    assert len(full) > 100_000 and ids.tolist() == full[:3000]


@pytest.mark.slow
def test_on_error_may_change_on_resume(tiny_teacher, tmp_path, ray_local):
    """The hint after a bad row, `--on-error skip`, is accepted on the same output."""
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import run
    from softlabels.schemas.errors import UserError

    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 40}) + "\n" for i in range(30)))
    (d / "b.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{ not json\n")
    cfg = dict(teacher=tiny_teacher, corpus=str(d), output=str(tmp_path / "out"), top_k=4, max_length=64,
               shard_tokens=256, batch_tokens=256)
    with pytest.raises(UserError, match="b.jsonl:2: not valid JSON"):
        run(LabelConfig(**cfg))
    summary = run(LabelConfig(**cfg, on_error="skip"))
    assert summary.status == "written" and summary.skipped_documents == 1


@pytest.mark.slow
def test_a_teacher_with_a_padded_head_labels_trains_and_evaluates(ray_local, tiny_teacher, tmp_path):
    """Head rows past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens): the manifest records the id
    space the stored ids live in, and a `tiny` student built from the set has a row for each."""
    import shutil

    from transformers import AutoModelForCausalLM

    from softlabels.trainer.config import TrainConfig
    from softlabels.trainer.evaluate import evaluate
    from softlabels.trainer.loop import train
    from softlabels.trainer.data import LabelDataset

    padded = tmp_path / "padded-teacher"
    shutil.copytree(tiny_teacher, padded)
    model = AutoModelForCausalLM.from_pretrained(padded)
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + 20)
    with torch.no_grad():  # the padded rows score like real ones, so they reach the top-k
        model.lm_head.weight[rows:] = model.lm_head.weight[:20] * 1.2
    model.save_pretrained(padded)
    out = str(tmp_path / "ls")
    run(cfg(str(padded), out, limit=12, encoding="packed"))
    ls = open_label_set(out)
    assert ls.manifest.tokenizer.vocab_size == rows and ls.manifest.id_space == rows + 20
    assert max(int(s.topk_ids.max()) for s in ls.iter_samples()) >= rows  # ids past the tokenizer are stored
    summary = train(TrainConfig(labels=out, output=str(tmp_path / "student"), steps=2, batch_size=4,
                                eval_fraction=0.2, warmup_steps=0))
    assert np.isfinite(summary["after"]["kl"])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.get_output_embeddings().weight.shape[0] == rows + 20
    scores = evaluate(student, LabelDataset(out, split="all", shuffle=False), batch_size=4)
    assert np.isfinite(scores["kl"]) and scores["positions"] > 0
