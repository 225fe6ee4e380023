"""softlabels convert: re-encoding a whole label set with the commit protocol; to_hf_dataset.

The source is the session's real label set (tiny teacher, compact encoding, several shards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import softlabels
from conftest import REPO, assert_one_line_error, cli_in_process
from softlabels.convert import convert
from softlabels.schemas import SCHEMA_VERSION, open_label_set, resolve_url
from softlabels.schemas.encodings import kl_buckets


def samples(url: str) -> list:
    return list(open_label_set(url).iter_samples())


def test_compact_to_fp16_to_compact_keeps_the_labels_within_each_encodings_error(label_set, tmp_path):
    src = open_label_set(label_set)
    assert src.manifest.label_encoding.name == "compact" and len(src.shards) > 2
    fp16, back = str(tmp_path / "fp16"), str(tmp_path / "compact")
    s1 = convert(label_set, fp16, "fp16")
    s2 = convert(fp16, back, "compact:max_kl=1e-4")
    assert (s1.status, s2.status, s1.shards) == ("written", "written", len(src.shards))

    a, b, c = samples(label_set), samples(fp16), samples(back)
    assert [s.sample_id for s in a] == [s.sample_id for s in b] == [s.sample_id for s in c]
    for x, y in zip(a, b):  # compact -> fp16: the same ids, the values rounded to fp16, the tail exact
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_array_equal(y.topk_logprobs, x.topk_logprobs.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(x.tail_logprob, y.tail_logprob)
        np.testing.assert_array_equal(x.target_logprob, y.target_logprob)  # float32 in every encoding
    assert all(np.array_equal(x.target_logprob, z.target_logprob, equal_nan=True) for x, z in zip(a, c))
    # fp16 -> compact: each shard's KL(fp16 buckets || decoded) within the budget it records
    for shard in open_label_set(back).shards:
        rows = [s for s in open_label_set(back).read_shard(shard)]
        ref = {s.sample_id: s for s in b}
        kl = []
        for s in rows:
            r = ref[s.sample_id]
            pos = np.array([[list(row).index(i) for i in want] for row, want in zip(s.topk_ids, r.topk_ids)])
            kl.append(kl_buckets(r.topk_logprobs, r.tail_logprob, np.take_along_axis(s.topk_logprobs, pos, 1),
                                 s.tail_logprob))
        assert np.concatenate(kl).mean() <= 1e-4 * 1.01

    m0, m1, m2 = src.manifest, open_label_set(fp16).manifest, open_label_set(back).manifest
    assert m1.encoding == {"name": "fp16"} and m2.encoding == {"name": "compact", "max_kl": 1e-4}
    assert m1.converted_from["url"] == src.url and m1.converted_from["encoding"] == m0.encoding
    assert m2.converted_from["manifest_sha256"] == __import__("hashlib").sha256(Path(fp16, "manifest.json").read_bytes()).hexdigest()
    assert (m1.teacher, m1.tokenizer, m1.corpus, m1.sequence, m1.top_k) == (m0.teacher, m0.tokenizer, m0.corpus, m0.sequence, m0.top_k)
    assert (m1.totals.sequences, m1.totals.tokens) == (m0.totals.sequences, m0.totals.tokens)
    for f in Path(label_set, "tokenizer").iterdir():  # students of the converted set find the same tokenizer
        assert Path(back, "tokenizer", f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("fixture", ["v1-set", "v2-sets/compact", "v2-sets/packed-q8", "v3-sets/compact", "v5-sets/compact"])
def test_sets_of_earlier_versions_convert(fixture, tmp_path):
    """A v1, v2, v3 or v5 set (written by the old writers) becomes a set of today's version holding the same labels
    (a v5 set keeps its spans; none gains target log-probs)."""
    src = str(Path(__file__).parent / "fixtures" / fixture)
    out = str(tmp_path / "v4")
    convert(src, out, "fp16")
    new = open_label_set(out)
    assert new.manifest.schema_version == SCHEMA_VERSION and new.manifest.converted_from["url"] == src
    assert new.manifest.tokenizer.files is None  # the fixtures carry no tokenizer folder
    for x, y in zip(samples(src), samples(out)):
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_array_equal(y.topk_logprobs, x.topk_logprobs.astype(np.float16).astype(np.float32))
        assert y.target_logprob is None and (x.spans is None) == (y.spans is None)
    assert not new.manifest.target_logprobs and new.manifest.spans == fixture.startswith("v5")


def test_to_hf_dataset_gives_the_decoded_columns(label_set, tmp_path, monkeypatch):
    import softlabels.hf

    want = samples(label_set)
    ds = softlabels.to_hf_dataset(label_set, cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(want)
    assert ds.column_names == ["sample_id", "source", "input_ids", "topk_ids", "topk_logprobs", "tail_logprob",
                               "target_logprob"]
    opened = []  # datasets calls the generator once per shard: the set (its manifest) is opened once, not per shard
    monkeypatch.setattr(softlabels.hf, "_OPEN", {})
    monkeypatch.setattr(softlabels.hf, "open_label_set", lambda *a, **k: opened.append(a) or open_label_set(*a, **k))
    streamed = softlabels.to_hf_dataset(label_set, streaming=True)
    for row, srow, s in zip(ds.with_format("numpy"), streamed, want):
        for r in (row, srow):
            assert r["sample_id"] == s.sample_id
            np.testing.assert_array_equal(np.asarray(r["input_ids"]), s.input_ids)
            np.testing.assert_array_equal(np.stack(r["topk_ids"]), s.topk_ids)
            np.testing.assert_array_equal(np.stack(r["topk_logprobs"]), s.topk_logprobs)
            np.testing.assert_array_equal(np.asarray(r["tail_logprob"]), s.tail_logprob)
            np.testing.assert_array_equal(np.asarray(r["target_logprob"], dtype=np.float32), s.target_logprob)
    assert len(open_label_set(label_set).shards) > 2 and len(opened) == 2  # to_hf_dataset's own, and the rows'


def run_convert(src: str, out: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "softlabels", "convert", src, "--output", out, "--encoding", "fp16", "--workers", "1",
         "--json"], capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **env},
    )


def listing(url: str) -> dict[str, bytes]:
    fs, root = resolve_url(url)
    fs.invalidate_cache()
    return {p[len(root):]: fs.cat_file(p) for p in fs.find(root) if "/_claim/" not in p}  # who, when: not the set


@pytest.mark.parametrize("point,where", [("convert.shard-written@2", "local"), ("publish:manifest.json@1", "s3")])
def test_a_killed_convert_resumes_byte_identically(label_set, tmp_path, s3_server, point, where):
    base = str(tmp_path) if where == "local" else f"{s3_server}/convert-{tmp_path.name}"
    whole, cut = f"{base}/whole", f"{base}/cut"
    assert run_convert(label_set, whole).returncode == 0
    killed = run_convert(label_set, cut, SOFTLABELS_CRASH_AT=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "manifest.json" not in {k.lstrip("/") for k in listing(cut)}  # nothing published as done
    resumed = run_convert(label_set, cut)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "written" and summary["resumed"] == (1 if point.startswith("convert") else summary["shards"])
    a, b = listing(whole), listing(cut)
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith("manifest.json"):
            ma, mb = json.loads(a[name]), json.loads(b[name])
            ma.pop("created_at"), mb.pop("created_at")
            assert ma == mb
        else:
            assert a[name] == b[name], name


def test_convert_refusals_are_one_line(label_set, tmp_path):
    for output in (label_set, label_set + "/../set", f"{label_set}/converted", str(Path(label_set).parent)):
        code, _, err = cli_in_process("convert", label_set, "--output", output, "--overwrite")
        assert_one_line_error(code, err, "convert", "overlaps the source")
    assert open_label_set(label_set).manifest.totals.sequences > 0  # the source is untouched
    code, _, err = cli_in_process("convert", label_set, "--output", str(tmp_path / "x"), "--encoding", "zip")
    assert_one_line_error(code, err, "convert", "unknown encoding 'zip'")
    code, _, err = cli_in_process("convert", str(tmp_path / "none"), "--output", str(tmp_path / "x"))
    assert_one_line_error(code, err, "convert", "no manifest.json")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    code, _, err = cli_in_process("convert", label_set, "--output", str(tmp_path / "foreign"))
    assert_one_line_error(code, err, "convert", "is not empty")
    assert cli_in_process("convert", label_set, "--output", str(tmp_path / "y"), "--encoding", "packed")[0] == 0
    code, _, err = cli_in_process("convert", label_set, "--output", str(tmp_path / "y"), "--encoding", "fp16")
    assert_one_line_error(code, err, "convert", "different settings", "encoding.name: stored 'packed', now 'fp16'")
