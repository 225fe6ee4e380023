"""schemas: encoding round trips, manifest validation, and the reader, on local disk and S3."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from softlabels import schemas
from softlabels.schemas import (
    CorpusInfo,
    Manifest,
    ManifestError,
    MissingManifestError,
    Sample,
    SequenceConfig,
    ShardChecksumError,
    ShardInfo,
    TeacherInfo,
    TokenizerInfo,
    Totals,
    UnsupportedSchemaVersion,
    decode_table,
    encode_samples,
    open_label_set,
    resolve_url,
    sample_id,
    table_to_parquet_bytes,
)
from softlabels.schemas.fingerprint import sha256_bytes
from softlabels.schemas.format import read_parquet_bytes


def make_samples(n: int, k: int, seed: int = 0, vocab: int = 1000) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(1, 20))
        ids = rng.integers(0, vocab, size=length).astype(np.int32)
        logits = rng.normal(size=(length, vocab))
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        top = np.argsort(-logp, axis=-1)[:, :k]
        lp = np.take_along_axis(logp, top, -1)
        tail = np.log(1 - np.exp(lp).sum(-1))
        out.append(Sample(sample_id("sha256:x", ids), f"doc{i}#0", ids, top.astype(np.int32), lp.astype(np.float32), tail.astype(np.float32)))
    return out


def make_manifest(shards: tuple[ShardInfo, ...], k: int = 4, version: int = 1) -> Manifest:
    return Manifest(
        schema_version=version,
        teacher=TeacherInfo("tiny", None, "abc", "float32"),
        tokenizer=TokenizerInfo("tok", 1000, "sha256:x"),
        top_k=k,
        temperature=1.0,
        corpus=CorpusInfo("pydoc", "sha256:c", 3),
        sequence=SequenceConfig(16),
        shards=shards,
        totals=Totals(sum(s.rows for s in shards), sum(s.tokens for s in shards), sum(s.bytes for s in shards)),
        labeler_version="test",
        created_at="2026-01-01T00:00:00+00:00",
    )


def write_set(root: str, samples: list[Sample], k: int) -> Manifest:
    fs, path = resolve_url(root)
    data = table_to_parquet_bytes(encode_samples(samples, k))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(path + "/shards", exist_ok=True)
    fs.pipe_file(path + "/shards/part-000000.parquet", data)
    info = ShardInfo("shards/part-000000.parquet", len(samples), sum(len(s.input_ids) for s in samples), len(data), sha256_bytes(data))
    m = make_manifest((info,), k)
    fs.pipe_file(path + "/manifest.json", m.to_json().encode())
    return m


def test_encode_decode_round_trip_is_exact_up_to_fp16():
    samples = make_samples(7, 4)
    table = encode_samples(samples, 4)
    back = list(decode_table(read_parquet_bytes(table_to_parquet_bytes(table))))
    assert len(back) == len(samples)
    for a, b in zip(samples, back):
        assert a.sample_id == b.sample_id and a.source == b.source
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.tail_logprob, b.tail_logprob)
        np.testing.assert_array_equal(a.topk_logprobs.astype(np.float16).astype(np.float32), b.topk_logprobs)


def test_shard_bytes_are_deterministic():
    a = table_to_parquet_bytes(encode_samples(make_samples(5, 3, seed=1), 3))
    b = table_to_parquet_bytes(encode_samples(make_samples(5, 3, seed=1), 3))
    assert a == b
    assert a != table_to_parquet_bytes(encode_samples(make_samples(5, 3, seed=2), 3))


def test_shards_are_readable_with_plain_pyarrow():
    import pyarrow.parquet as pq
    import io

    samples = make_samples(3, 2)
    t = pq.read_table(io.BytesIO(table_to_parquet_bytes(encode_samples(samples, 2))))
    row = t.slice(1, 1).to_pylist()[0]
    assert row["input_ids"] == samples[1].input_ids.tolist()
    assert row["topk_ids"] == samples[1].topk_ids.tolist()


def test_sample_with_mismatched_shapes_is_rejected():
    with pytest.raises(ValueError, match="positions"):
        Sample("x", "s", np.zeros(3, np.int32), np.zeros((2, 4), np.int32), np.zeros((2, 4), np.float32), np.zeros(2, np.float32))


def test_sample_id_is_a_content_address():
    ids = np.array([1, 2, 3], dtype=np.int32)
    assert sample_id("fp", ids) == sample_id("fp", ids.astype(np.int64))
    assert sample_id("fp", ids) != sample_id("fp2", ids)
    assert sample_id("fp", ids) != sample_id("fp", ids[::-1])


def test_tokenizer_fingerprint_depends_on_vocab_and_specials():
    class Tok:
        def __init__(self, vocab, specials):
            self._v, self.special_tokens_map = vocab, specials

        def get_vocab(self):
            return dict(self._v)

    a = schemas.tokenizer_fingerprint(Tok({"a": 0, "b": 1}, {"eos_token": "b"}))
    assert a == schemas.tokenizer_fingerprint(Tok({"b": 1, "a": 0}, {"eos_token": "b"}))
    assert a != schemas.tokenizer_fingerprint(Tok({"a": 1, "b": 0}, {"eos_token": "b"}))
    assert a != schemas.tokenizer_fingerprint(Tok({"a": 0, "b": 1}, {"eos_token": "a"}))


def test_manifest_json_round_trip():
    m = make_manifest((ShardInfo("shards/part-000000.parquet", 2, 10, 100, "ab"),))
    assert Manifest.from_json(m.to_json()) == m
    assert json.loads(m.to_json())["schema_version"] == 1
    m2 = make_manifest((), version=2)
    assert Manifest.from_json(m2.to_json()) == m2 and m2.label_encoding.name == "fp16"


@pytest.mark.parametrize("version", [0, 8, "1", None])
def test_unknown_schema_version_is_refused_naming_it(version):
    d = json.loads(make_manifest(()).to_json())
    d["schema_version"] = version
    with pytest.raises(UnsupportedSchemaVersion, match=repr(version).replace("(", r"\(")):
        Manifest.from_json(json.dumps(d))


@pytest.mark.parametrize("path", ["../x.parquet", "/etc/passwd", "s3://other/x.parquet", "shards/../../x", "a\\b"])
def test_paths_outside_the_set_are_refused(path):
    """Shard paths and the tokenizer folder (which convert copies and students load) stay inside the set."""
    d = json.loads(make_manifest((ShardInfo("shards/ok.parquet", 1, 1, 1, "a"),)).to_json())
    d["shards"][0]["path"] = path
    with pytest.raises(ManifestError, match="shard path"):
        Manifest.from_json(json.dumps(d))
    d = json.loads(make_manifest((ShardInfo("shards/ok.parquet", 1, 1, 1, "a"),)).to_json())
    d["tokenizer"]["files"] = path
    with pytest.raises(ManifestError, match="tokenizer folder"):
        Manifest.from_json(json.dumps(d))


def test_manifest_problems_name_the_field():
    d = json.loads(make_manifest(()).to_json())
    del d["top_k"]
    with pytest.raises(ManifestError, match="top_k"):
        Manifest.from_json(json.dumps(d))
    d = json.loads(make_manifest(()).to_json())
    d["teacher"]["colour"] = "red"
    with pytest.raises(ManifestError, match="colour"):
        Manifest.from_json(json.dumps(d))
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json("{")
    with pytest.raises(ManifestError, match="totals"):
        dataclasses.replace(make_manifest((ShardInfo("shards/a", 1, 2, 3, "x"),)), totals=Totals(5, 2, 3))


def many_shards(n: int) -> tuple[ShardInfo, ...]:
    return tuple(ShardInfo(f"shards/part-{i:06d}.parquet", 2, 300 + i, 1000 + i, f"{i:064x}", 300 + i - i % 3)
                 for i in range(n))


# An entry broken at position 1,500 of 3,000: the columnar checks (a 10B-token set lists ~300,000
# shards) must refuse it with the message that names it, as the one-by-one checks do.
BAD_SHARD_ENTRIES = [
    ("rows-a-bool", {"rows": True}, "ShardInfo.rows must be int"),
    ("bytes-negative", {"bytes": -1}, "ShardInfo.bytes must not be negative"),
    ("sha256-a-number", {"sha256": 7}, "ShardInfo.sha256 must be str"),
    ("trained-a-string", {"trained": "all"}, "ShardInfo.trained must be int or null"),
    ("unknown-field", {"colour": "red"}, "unknown field.*colour"),
    ("path-escapes", {"path": "shards/../../x"}, "shard path 'shards/../../x' is not a plain relative path"),
    ("path-listed-twice", {"path": "shards/part-000007.parquet"}, "'shards/part-000007.parquet' is listed twice"),
    ("no-rows", {"rows": 0}, "rows 0, tokens 1800"),
    ("trained-beyond-tokens", {"trained": 5000}, "5000 trained positions of 1800 tokens"),
]


@pytest.mark.parametrize("change,fragment", [c[1:] for c in BAD_SHARD_ENTRIES], ids=[c[0] for c in BAD_SHARD_ENTRIES])
def test_a_bad_entry_among_thousands_of_shards_is_named(change, fragment):
    d = json.loads(make_manifest(many_shards(3000), version=4).to_json())
    d["shards"][1500].update(change)
    with pytest.raises(ManifestError, match=fragment):
        Manifest.from_json(json.dumps(d))


def test_a_shard_entry_without_a_path_among_thousands_is_named():
    d = json.loads(make_manifest(many_shards(3000), version=4).to_json())
    del d["shards"][1500]["path"]
    with pytest.raises(ManifestError, match="missing 1 required positional argument: 'path'"):
        Manifest.from_json(json.dumps(d))


def test_thousands_of_shards_read_back_as_written():
    shards = many_shards(3000)[:-1] + (ShardInfo(".hidden/x-1..parquet", 1, 1, 1, "a"),)  # plain, but not the usual form
    m = make_manifest(shards, version=4)
    back = Manifest.from_json(m.to_json())
    assert back == m and back.shards == shards and isinstance(back.shards, tuple)
    d = json.loads(m.to_json())
    for s in d["shards"][::2]:
        del s["trained"]  # before v4: absent
    assert [s.trained for s in Manifest.from_json(json.dumps(d)).shards[:4]] == [None, 300, None, 303]


def test_reading_a_manifest_leaves_the_garbage_collector_as_it_was():
    """The collector is paused while the shard entries are built, and only then."""
    import gc

    good = make_manifest(many_shards(10), version=4).to_json()
    bad = good.replace('"rows": 2', '"rows": -2', 1)
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            gc.enable() if enabled else gc.disable()
            Manifest.from_json(good)
            with pytest.raises(ManifestError, match="must not be negative"):
                Manifest.from_json(bad)
            with pytest.raises(ManifestError, match="not valid JSON"):
                Manifest.from_json(good[:-20])
            assert gc.isenabled() == enabled
    finally:
        gc.enable() if was else gc.disable()


def test_opening_a_local_set_takes_memory_for_its_manifest_only(tmp_path):
    """A local read of the manifest is sized to the file, not to the 512 MiB cap (one allocation of the cap)."""
    import tracemalloc

    write_set(str(tmp_path), make_samples(4, 2), 2)
    tracemalloc.start()
    try:
        open_label_set(str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak


def test_open_label_set_round_trip(storage_root):
    samples = make_samples(6, 4)
    m = write_set(storage_root, samples, 4)
    ls = open_label_set(storage_root)
    assert ls.manifest == m
    got = list(ls.iter_samples())
    assert [s.sample_id for s in got] == [s.sample_id for s in samples]
    for a, b in zip(samples, got):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        assert b.topk_ids.shape == (len(a.input_ids), 4) and b.tail_logprob.shape == (len(a.input_ids),)


def test_open_label_set_without_manifest_says_so(storage_root):
    fs, path = resolve_url(storage_root)
    fs.pipe_file(path + "/shards-only.txt", b"x") if not storage_root.startswith("/") else None
    with pytest.raises(MissingManifestError, match="still being written"):
        open_label_set(storage_root)


def test_checksum_mismatch_names_the_shard(storage_root):
    write_set(storage_root, make_samples(4, 2), 2)
    fs, path = resolve_url(storage_root)
    data = bytearray(fs.cat_file(path + "/shards/part-000000.parquet"))
    data[100] ^= 0xFF
    fs.pipe_file(path + "/shards/part-000000.parquet", bytes(data))
    with pytest.raises(ShardChecksumError, match="part-000000"):
        list(open_label_set(storage_root).iter_samples())
