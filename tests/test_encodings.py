"""Label encodings: exact where lossless, within budget where lossy, any vocabulary size, v1 still reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softlabels.schemas import Encoding, Sample, UnsupportedSchemaVersion, decode_table, encode_samples, open_label_set, sample_id
from softlabels.schemas.bitpack import from_planes, pack_bits, to_planes, unpack_bits
from softlabels.schemas.encodings import META_ENCODING, kl_buckets
from softlabels.schemas.format import SCHEMA_VERSION, read_parquet_bytes, table_to_parquet_bytes

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "v1-set"
FIXTURE_V2 = Path(__file__).parent / "fixtures" / "v2-sets"
FIXTURE_V3 = Path(__file__).parent / "fixtures" / "v3-sets"
FIXTURES = Path(__file__).parent / "fixtures"


def peaked_samples(n_rows: int, k: int, vocab: int, seed: int = 0, sharp: float = 4.0) -> list[Sample]:
    """Rows of teacher-like labels: a Zipf-ish vocabulary, so some ids recur across positions."""
    rng = np.random.default_rng(seed)
    base = -np.log(np.arange(1, vocab + 1)) * 1.1  # frequent ids have small ids... then shuffled
    perm = rng.permutation(vocab)
    out = []
    for r in range(n_rows):
        length = int(rng.integers(1, 40))
        logits = base[perm][None, :] + rng.normal(size=(length, vocab)) * sharp
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        top = np.argsort(-logp, axis=1, kind="stable")[:, :k]
        lp = np.take_along_axis(logp, top, 1)
        rest = logp.copy()
        np.put_along_axis(rest, top, -np.inf, 1)
        tail = np.logaddexp.reduce(rest, axis=1)
        ids = rng.integers(0, vocab, size=length).astype(np.int32)
        out.append(Sample(sample_id("sha256:t", ids), f"doc{r}#0", ids, top.astype(np.int32), lp.astype(np.float32), tail.astype(np.float32)))
    return out


def round_trip(samples: list[Sample], k: int, enc: Encoding, vocab: int) -> tuple[list[Sample], bytes]:
    data = table_to_parquet_bytes(encode_samples(samples, k, enc, vocab))
    return list(decode_table(read_parquet_bytes(data))), data


def stack(samples: list[Sample], name: str) -> np.ndarray:
    return np.concatenate([getattr(s, name) for s in samples])


@pytest.mark.parametrize("width", [1, 3, 8, 13, 16, 17, 18, 31, 33, 56])
def test_bit_packing_round_trips_every_width(width):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 1 << width, size=(11, 7), dtype=np.int64)
    packed = pack_bits(values, width)
    assert packed.shape == (11, (7 * width + 7) // 8)
    np.testing.assert_array_equal(unpack_bits(packed, 7, width), values)
    np.testing.assert_array_equal(from_planes(to_planes(values, (width + 7) // 8)), values)
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(values + (1 << width), width)


@pytest.mark.parametrize("name", ["fp16", "packed"])
def test_lossless_encodings_round_trip_exactly_up_to_fp16(name):
    samples = peaked_samples(6, 8, 500)
    back, _ = round_trip(samples, 8, Encoding(name), 500)
    for a, b in zip(samples, back):
        assert (a.sample_id, a.source) == (b.sample_id, b.source)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs.astype(np.float16).astype(np.float32), b.topk_logprobs)
        np.testing.assert_array_equal(a.tail_logprob, b.tail_logprob)


@pytest.mark.parametrize("name", ["fp16", "packed", "packed-q8", "compact"])
def test_target_logprobs_round_trip_exactly_in_every_encoding(name):
    """v6: the log-prob of the token that follows is float32 in every encoding, NaN kept; in the decoded table;
    a shard with some samples with it and some without, or a value above 0, is refused."""
    from dataclasses import replace

    from softlabels.schemas.errors import ShardFormatError
    from softlabels.schemas.format import decode_shard, decoded_table

    rng = np.random.default_rng(1)
    samples = [replace(s, target_logprob=np.where(np.arange(len(s.tail_logprob)) == len(s.tail_logprob) - 1, np.nan,
                                                   -rng.exponential(3, len(s.tail_logprob))).astype(np.float32))
               for s in peaked_samples(6, 8, 500)]
    back, data = round_trip(samples, 8, Encoding(name), 500)
    for a, b in zip(samples, back):
        np.testing.assert_array_equal(a.target_logprob, b.target_logprob)  # NaN == NaN here
    table = decoded_table(read_parquet_bytes(data))
    assert table.column("target_logprob").to_pylist()[0][:-1] == samples[0].target_logprob[:-1].tolist()
    assert [len(s.target_logprob) for s in decode_shard(data, 8, "x", target_logprobs=True)] == [len(s.tail_logprob) for s in samples]
    with pytest.raises(ShardFormatError, match="lacks a target_logprob column"):
        decode_shard(table_to_parquet_bytes(encode_samples(peaked_samples(2, 8, 500), 8, Encoding(name), 500)), 8, "x",
                     target_logprobs=True)
    with pytest.raises(ValueError, match="every sample of a shard has a target_logprob column or none"):
        encode_samples([samples[0], peaked_samples(1, 8, 500)[0]], 8, Encoding(name), 500)
    bad = [replace(samples[0], target_logprob=np.abs(samples[0].target_logprob))]
    with pytest.raises(ShardFormatError, match="above 0"):
        decode_shard(table_to_parquet_bytes(encode_samples(bad, 8, Encoding(name), 500)), 8, "x")


@pytest.mark.parametrize("spec", ["packed-q8", "compact", "compact:max_kl=1e-6", "compact:max_kl=1e-3"])
def test_lossy_encodings_keep_ids_and_stay_within_their_error(spec):
    k, vocab = 16, 2000
    samples = peaked_samples(12, k, vocab, seed=3)
    enc = Encoding.parse(spec)
    back, data = round_trip(samples, k, enc, vocab)
    ids, lp, tail = (stack(samples, n) for n in ("topk_ids", "topk_logprobs", "tail_logprob"))
    ids2, lp2, tail2 = (stack(back, n) for n in ("topk_ids", "topk_logprobs", "tail_logprob"))
    # Same k ids per position, in descending order of the decoded values.
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(ids2, 1))
    assert np.all(np.diff(lp2, axis=1) <= 0)
    # The k+1 buckets sum to 1 (the tail is kept, the top-k rescaled to 1 - tail).
    total = np.exp(lp2.astype(np.float64)).sum(1) + np.exp(tail2.astype(np.float64))
    assert np.abs(total - 1).max() < 1e-5
    np.testing.assert_allclose(tail2, tail, rtol=2e-3, atol=1e-6)
    # KL(exact buckets || decoded), computed directly in fp64 from the samples.
    order = np.argsort(ids, 1)
    order2 = np.argsort(ids2, 1)
    p = np.exp(np.take_along_axis(lp.astype(np.float64), order, 1))
    q = np.exp(np.take_along_axis(lp2.astype(np.float64), order2, 1))
    pt, qt = np.exp(tail.astype(np.float64)), np.exp(tail2.astype(np.float64))
    direct = (p * np.log(p / q)).sum(1) + pt * np.log(pt / qt)
    assert direct.mean() < (enc.max_kl if enc.name == "compact" else 1e-3)
    assert direct.mean() > 0  # lossy: the test would notice an encoding that stored nothing new
    if enc.name == "compact":
        meta = json.loads(read_parquet_bytes(data).schema.metadata[META_ENCODING])
        np.testing.assert_allclose(meta["encoding_kl"], direct.mean(), rtol=1e-2)
        np.testing.assert_allclose(kl_buckets(np.take_along_axis(lp, order, 1), tail, np.take_along_axis(lp2, order2, 1), tail2).mean(),
                                   direct.mean(), rtol=1e-2)


def test_a_tighter_budget_costs_bytes_and_buys_accuracy():
    samples = peaked_samples(20, 32, 3000, seed=5)
    sizes = [len(round_trip(samples, 32, Encoding("compact", b), 3000)[1]) for b in (1e-3, 1e-4, 1e-5)]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("name", ["packed", "packed-q8", "compact"])
def test_vocabulary_above_2_17_round_trips(name):
    vocab = 200_003
    rng = np.random.default_rng(7)
    samples = []
    for r in range(3):
        n = 5 + r
        top = np.stack([rng.choice(vocab, size=6, replace=False) for _ in range(n)]).astype(np.int32)
        top[0, 0] = vocab - 1  # the largest id needs all 18 bits
        lp = np.sort(np.log(rng.dirichlet(np.ones(7), size=n))[:, :6], axis=1)[:, ::-1].copy()
        tail = np.log(1 - np.exp(lp).sum(1))
        samples.append(Sample(f"s{r}", f"d{r}", np.arange(n, dtype=np.int32), top, lp.astype(np.float32), tail.astype(np.float32)))
    back, data = round_trip(samples, 6, Encoding(name), vocab)
    for a, b in zip(samples, back):
        np.testing.assert_array_equal(np.sort(a.topk_ids, 1), np.sort(b.topk_ids, 1))
    if name == "packed":
        assert json.loads(read_parquet_bytes(data).schema.metadata[META_ENCODING])["id_bits"] == 18
    with pytest.raises(ValueError, match="token ids must lie"):
        encode_samples(samples, 6, Encoding(name), vocab - 1)


@pytest.mark.parametrize("spec", ["fp16", "packed", "packed-q8", "compact"])
def test_shard_bytes_are_deterministic_for_every_encoding(spec):
    enc = Encoding.parse(spec)
    a = table_to_parquet_bytes(encode_samples(peaked_samples(4, 8, 700, seed=1), 8, enc, 700))
    b = table_to_parquet_bytes(encode_samples(peaked_samples(4, 8, 700, seed=1), 8, enc, 700))
    c = table_to_parquet_bytes(encode_samples(peaked_samples(4, 8, 700, seed=2), 8, enc, 700))
    assert a == b != c


def test_compact_is_smaller_than_fp16_at_equal_k():
    samples = peaked_samples(30, 32, 5000, seed=9)
    fp16 = len(round_trip(samples, 32, Encoding("fp16"), 5000)[1])
    compact = len(round_trip(samples, 32, Encoding("compact"), 5000)[1])
    assert compact < 0.8 * fp16  # synthetic labels; the real ratio is in bench/storage.py


def test_encoding_specs_are_validated():
    assert Encoding.parse("compact:max_kl=2e-5") == Encoding("compact", 2e-5)
    assert Encoding().name == "compact" and Encoding().max_kl == 1e-4
    with pytest.raises(ValueError, match="unknown encoding 'zip'"):
        Encoding.parse("zip")
    with pytest.raises(ValueError, match="unknown parameter"):
        Encoding.parse("compact:levels=3")
    with pytest.raises(ValueError, match="max_kl must be in"):
        Encoding("compact", -1.0)
    with pytest.raises(ValueError, match="takes no max_kl"):
        Encoding("packed", 1e-4)
    with pytest.raises(ValueError, match="needs the vocabulary size"):
        encode_samples(peaked_samples(1, 2, 50), 2, Encoding("packed"))


def test_unknown_shard_version_or_encoding_is_refused_naming_it():
    table = encode_samples(peaked_samples(2, 4, 100), 4, Encoding("packed"), 100)
    meta = dict(table.schema.metadata)
    bad_version = table.replace_schema_metadata({**meta, b"softlabels.schema_version": b"9"})
    with pytest.raises(UnsupportedSchemaVersion, match="schema_version 9"):
        list(decode_table(read_parquet_bytes(table_to_parquet_bytes(bad_version))))
    enc = json.loads(meta[META_ENCODING])
    bad_enc = table.replace_schema_metadata({**meta, META_ENCODING: json.dumps({**enc, "name": "brotli-magic"}).encode()})
    with pytest.raises(ValueError, match="'brotli-magic' is unknown"):
        list(decode_table(read_parquet_bytes(table_to_parquet_bytes(bad_enc))))


def fixture_arrays(seed: int, draws: int = 0) -> list[tuple[np.ndarray, ...]]:
    """The seeded recipe of tests/fixtures/make_v1.py (seed 1234) and make_v2.py (seed 2024, 3 draws):
    per stored row ``(ids, top, lp, tail)``, plus ``(draw ids, counts)`` with ``draws``."""
    rng = np.random.default_rng(seed)
    out = []
    for length in (5, 9, 7):  # two rows in the first shard, one in the second
        ids = rng.integers(0, 300, size=length).astype(np.int32)
        logits = rng.normal(size=(length, 300)) * 3
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        top = np.argsort(-logp, axis=1, kind="stable")[:, :4]
        lp = np.take_along_axis(logp, top, 1)
        row = (ids, top, lp, np.log(1 - np.exp(lp).sum(1)))
        if draws:
            ids_drawn = np.stack([np.sort(rng.choice(np.arange(4, 300), size=draws, replace=False)) for _ in range(length)])
            row += (ids_drawn, np.ones((length, draws), np.uint8))
        out.append(row)
    return out


def test_stored_v1_label_set_still_reads():
    """tests/fixtures/v1-set was written by the v1 writer (tests/fixtures/make_v1.py); regenerate its arrays."""
    ls = open_label_set(str(FIXTURE_V1))
    assert ls.manifest.schema_version == 1 and ls.manifest.label_encoding.name == "fp16"
    got = list(ls.iter_samples())
    expected = fixture_arrays(1234)
    assert len(got) == len(expected) == 3
    for s, (ids, top, lp, tail) in zip(got, expected):
        np.testing.assert_array_equal(s.input_ids, ids)
        np.testing.assert_array_equal(s.topk_ids, top)
        np.testing.assert_array_equal(s.topk_logprobs, lp.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(s.tail_logprob, tail.astype(np.float32))


@pytest.mark.parametrize("name", ["fp16", "packed", "packed-q8", "compact"])
def test_stored_v2_label_sets_still_read(name):
    """tests/fixtures/v2-sets/NAME was written by the v2 writer (0.3.0): compact's footer held raw zstd bytes then."""
    ls = open_label_set(str(FIXTURE_V2 / name))
    assert ls.manifest.schema_version == 2 and ls.manifest.label_encoding.name == name
    got = list(ls.iter_samples())
    expected = fixture_arrays(2024, draws=3)
    assert len(got) == len(expected) == 3
    for s, (ids, top, lp, tail, draws, counts) in zip(got, expected):
        np.testing.assert_array_equal(s.input_ids, ids)
        np.testing.assert_array_equal(s.tail_sample_ids, draws)
        np.testing.assert_array_equal(s.tail_sample_counts, counts)
        if name in ("fp16", "packed"):
            np.testing.assert_array_equal(s.topk_ids, top)
            np.testing.assert_array_equal(s.topk_logprobs, lp.astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(s.tail_logprob, tail.astype(np.float32))
        else:  # lossy: the same ids (order may swap among near-ties), within the error budget
            assert [set(r) for r in s.topk_ids] == [set(r) for r in top]
            budget = ls.manifest.label_encoding.max_kl or 1e-4  # packed-q8: ~1e-5 measured, no budget recorded
            assert kl_buckets(lp, tail, _align(s, top), s.tail_logprob).mean() <= budget * 1.01


@pytest.mark.parametrize("name", ["fp16", "compact"])
def test_stored_v3_label_sets_still_read(name):
    """tests/fixtures/v3-sets/NAME was written by the v3 writer (0.4.0): no trained-position mask, labels at every position."""
    ls = open_label_set(str(FIXTURE_V3 / name))
    assert ls.manifest.schema_version == 3 and ls.manifest.label_encoding.name == name
    got = list(ls.iter_samples())
    expected = fixture_arrays(2025)
    assert len(got) == len(expected) == 3
    for s, (ids, top, lp, tail) in zip(got, expected):
        np.testing.assert_array_equal(s.input_ids, ids)
        assert s.trained is None and len(s.topk_ids) == len(ids)  # every position holds labels
        if name == "fp16":
            np.testing.assert_array_equal(s.topk_ids, top)
            np.testing.assert_array_equal(s.topk_logprobs, lp.astype(np.float16).astype(np.float32))
        else:
            assert kl_buckets(lp, tail, _align(s, top), s.tail_logprob).mean() <= ls.manifest.label_encoding.max_kl * 1.01


def fixture_rows(version: int = 4) -> list[dict]:
    """The seeded recipe tests/fixtures/make_vN.py wrote vN-sets from (its ``fixture_rows``: numpy only)."""
    spec = importlib.util.spec_from_file_location(f"make_v{version}", FIXTURES / f"make_v{version}.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)  # defines the recipe; writes nothing (that is its __main__)
    return make.fixture_rows()


@pytest.mark.parametrize("version,name", [(4, "fp16"), (4, "compact"), (5, "fp16"), (5, "compact"), (6, "fp16"),
                                          (6, "compact")])
def test_stored_v4_to_v6_label_sets_still_read(version, name):
    """tests/fixtures/v4-sets/NAME was written by the v4 writer (0.6.0, commit 1ad4051): trained masks (labels
    only at trained positions), packed documents, shards[].trained, totals.trained and rendering; v5-sets by the
    v5 writer (0.7.0): the same rows with token spans; v6-sets by the v6 writer (0.8.1): and the teacher's log-prob
    of each next token. None of them has what v7 added (a generator's log-probs, the manifest's generation)."""
    ls = open_label_set(str(FIXTURES / f"v{version}-sets" / name))
    m = ls.manifest
    assert m.schema_version == version and m.label_encoding.name == name and m.spans == (version >= 5)
    assert m.target_logprobs == (version == 6) and not m.sampler_logprobs and m.generation is None
    expected = fixture_rows(version)
    masks = [np.ones(len(r["input_ids"]), bool) if r["trained"] is None else r["trained"] for r in expected]
    assert any(not mask.all() for mask in masks) and any(r["doc_lengths"] is not None for r in expected)
    assert [s.trained for s in m.shards] == [11, 15] and m.totals.trained == sum(int(x.sum()) for x in masks) == 26
    assert m.totals.tokens == 33 and m.rendering["format"] == "prompt-completion" and m.rendering["train_on"] == "completion"
    per_shard = [list(ls.read_shard(shard)) for shard in m.shards]
    assert [len(rows) for rows in per_shard] == [2, 2]
    got = [s for rows in per_shard for s in rows]
    shard_of = [i for i, rows in enumerate(per_shard) for _ in rows]
    kl: list[list[np.ndarray]] = [[] for _ in per_shard]  # compact: its budget bounds each shard's mean
    assert len(got) == len(expected) == 4
    for s, want, mask, shard in zip(got, expected, masks, shard_of):
        ids = want["input_ids"]
        np.testing.assert_array_equal(s.input_ids, ids)
        # A shard with a masked row stores a mask for each of its rows (all true where every position is trained).
        np.testing.assert_array_equal(np.ones(len(ids), bool) if s.trained is None else s.trained, mask)
        np.testing.assert_array_equal(s.label_positions, np.flatnonzero(mask))
        docs = [len(ids)] if want["doc_lengths"] is None else want["doc_lengths"]  # absent: one document
        np.testing.assert_array_equal([len(ids)] if s.doc_lengths is None else s.doc_lengths, docs)
        if version >= 5:
            np.testing.assert_array_equal(s.spans, want["spans"])
        else:
            assert s.spans is None
        if version == 6:
            np.testing.assert_array_equal(s.target_logprob, want["target_logprob"])  # float32 as written, NaN too
        else:
            assert s.target_logprob is None
        assert s.sampler_logprob is None
        top, lp, tail = want["topk_ids"], want["topk_logprobs"], want["tail_logprob"]
        assert s.topk_ids.shape == s.topk_logprobs.shape == top.shape == (int(mask.sum()), 4)
        assert s.tail_logprob.shape == tail.shape
        if name == "fp16":
            np.testing.assert_array_equal(s.topk_ids, top)
            np.testing.assert_array_equal(s.topk_logprobs, lp.astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(s.tail_logprob, tail.astype(np.float32))
        else:  # lossy: the same ids (order may swap among near-ties), within the error budget
            assert [set(r) for r in s.topk_ids] == [set(r) for r in top]
            np.testing.assert_allclose(s.tail_logprob, tail, rtol=2e-3, atol=1e-6)
            kl[shard].append(kl_buckets(lp, tail, _align(s, top), s.tail_logprob))
    if name == "compact":
        means = [np.concatenate(k).mean() for k in kl]
        assert all(0 < mean <= m.label_encoding.max_kl * 1.01 for mean in means), means


def _align(s: Sample, top: np.ndarray) -> np.ndarray:
    """The decoded log-probs in the order of ``top``'s ids (lossy encodings may reorder near-ties)."""
    pos = np.array([[list(row).index(i) for i in want] for row, want in zip(s.topk_ids, top)])
    return np.take_along_axis(s.topk_logprobs, pos, 1)


@pytest.mark.parametrize("name", ["fp16", "packed", "packed-q8", "compact"])
def test_every_footer_value_is_utf8_text(name):
    """Parquet key-value metadata must be UTF-8 (polars refuses the whole file otherwise)."""
    data = table_to_parquet_bytes(encode_samples(peaked_samples(3, 4, 500), 4, Encoding(name), 500))
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata.metadata
    assert meta and all(isinstance(v.decode("utf-8"), str) for v in meta.values())
    assert json.loads(meta[b"softlabels.schema_version"]) == SCHEMA_VERSION == 7


@pytest.mark.parametrize("name", ["fp16", "packed", "packed-q8", "compact"])
def test_every_encoding_opens_in_pyarrow_pandas_polars_duckdb_and_datasets(name, tmp_path):
    """No tool errors on any encoding; where a tool sees plain columns (fp16), its values equal softlabels'."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    samples = peaked_samples(4, 3, 700, seed=5)
    path = tmp_path / "part-000000.parquet"
    path.write_bytes(table_to_parquet_bytes(encode_samples(samples, 3, Encoding(name), 700)))
    decoded = list(decode_table(pq.read_table(path)))
    frames = {
        "pyarrow": pq.read_table(path).to_pylist(),
        "pandas": pd.read_parquet(path).to_dict("records"),
        "polars": pl.read_parquet(path).to_dicts(),
        "duckdb": [dict(zip(rel.columns, row)) for rel in [duckdb.sql(f"SELECT * FROM '{path}'")] for row in rel.fetchall()],
        "datasets": list(datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))),
    }
    for tool, rows in frames.items():
        assert [r["sample_id"] for r in rows] == [s.sample_id for s in samples], tool
        for r, s in zip(rows, decoded):
            np.testing.assert_array_equal(np.asarray(list(r["input_ids"])), s.input_ids, err_msg=tool)
            if name == "fp16":
                ids = np.array([list(x) for x in r["topk_ids"]])
                lp = np.array([list(x) for x in r["topk_logprobs"]], dtype=np.float32)
                np.testing.assert_array_equal(ids, s.topk_ids, err_msg=tool)
                np.testing.assert_array_equal(lp, s.topk_logprobs, err_msg=tool)
                np.testing.assert_array_equal(np.asarray(list(r["tail_logprob"]), np.float32), s.tail_logprob, err_msg=tool)


def masked(samples: list[Sample], seed: int = 3) -> list[Sample]:
    """The same rows with a random trained mask (labels kept only there) and, for some, packed documents."""
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(samples):
        trained = rng.random(len(s.input_ids)) < 0.4
        if i == 0:
            trained[:] = False  # a row with nothing trained holds no labels at all
        cut = int(rng.integers(1, len(s.input_ids))) if len(s.input_ids) > 1 and i % 2 else None
        docs = None if cut is None else np.array([cut, len(s.input_ids) - cut], np.int32)
        out.append(Sample(s.sample_id, s.source, s.input_ids, s.topk_ids[trained], s.topk_logprobs[trained],
                          s.tail_logprob[trained], trained=trained, doc_lengths=docs))
    return out


@pytest.mark.parametrize("name", ["fp16", "packed", "packed-q8", "compact"])
def test_v4_masks_store_labels_only_at_trained_positions(name):
    """Schema v4: the trained mask and document lengths round-trip; label lists hold only trained positions."""
    samples = masked(peaked_samples(6, 4, 500))
    got, data = round_trip(samples, 4, Encoding(name), 500)
    table = read_parquet_bytes(data)
    assert table.column("trained").to_pylist() == [s.trained.tolist() for s in samples]
    assert [len(r) for r in table.column("tail_logprob").to_pylist()] == [int(s.trained.sum()) for s in samples]
    for s, g in zip(samples, got):
        np.testing.assert_array_equal(g.trained, s.trained)
        np.testing.assert_array_equal(g.label_positions, np.flatnonzero(s.trained))
        want = [len(s.input_ids)] if s.doc_lengths is None else s.doc_lengths  # one document: its length
        np.testing.assert_array_equal(g.doc_lengths, want)
        assert len(g.topk_ids) == len(g.tail_logprob) == int(s.trained.sum())
        if len(g.tail_logprob) and name in ("fp16", "packed"):
            np.testing.assert_array_equal(g.topk_ids, s.topk_ids)
            np.testing.assert_array_equal(g.tail_logprob, s.tail_logprob)
    # Every position trained (plain text): no mask column at all, the v3 layout plus the version.
    plain = read_parquet_bytes(table_to_parquet_bytes(encode_samples(peaked_samples(3, 4, 500), 4, Encoding(name), 500)))
    assert "trained" not in plain.column_names and "doc_lengths" not in plain.column_names


def test_v4_inconsistent_mask_is_refused():
    """A shard whose label lists disagree with its trained mask is malformed, named as such."""
    from softlabels.schemas.format import decode_shard

    samples = masked(peaked_samples(3, 4, 500))
    table = encode_samples(samples, 4, Encoding("fp16"), 500)
    flipped = [[not v for v in row] for row in table.column("trained").to_pylist()]
    bad = table.set_column(table.column_names.index("trained"), "trained", pa.array(flipped, pa.list_(pa.bool_())))
    with pytest.raises(ValueError, match="shard s3://x/part.parquet.*trained positions"):
        decode_shard(table_to_parquet_bytes(bad), 4, "s3://x/part.parquet")
