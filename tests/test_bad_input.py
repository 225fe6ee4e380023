"""Bad input, both commands: one clear line naming the problem, exit code 2, nothing published.

Each case is one row of the table in docs/reliability.md. The commands run
in this process (``cli_in_process``: the same ``main`` a user runs, without
paying for a fresh interpreter per case); they refuse before Ray starts or a
teacher loads, except where a case says otherwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli_in_process


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Corpora and folders that are wrong in one way each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "foreign").mkdir()
    (d / "foreign" / "notes.txt").write_text("mine")
    (d / "body.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    (d / "c.csv").write_text("a,b\n")
    (d / "dangling").mkdir()
    (d / "dangling" / "gone.jsonl").symlink_to(d / "no-such-file")
    pq.write_table(pa.table({"body": ["hello"]}), d / "body.parquet")
    (d / "empty.txt").write_bytes(b"")
    (d / "empty-folder").mkdir()
    (d / "empty-folder" / "a.jsonl").write_bytes(b"")
    (d / "not-parquet.parquet").write_bytes(b"PAR1 this is not parquet")
    (d / "bad.yaml").write_text("teacher: x\nbogus_key: 1\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    return d


# (case id, extra flags, fragment of the one-line error); {d} is the inputs folder
LABELER_CASES = [
    ("glob-matches-nothing", ["--corpus", "{d}/nothing-*.jsonl"], "matches no files"),
    ("corpus-missing", ["--corpus", "{d}/missing.jsonl"], "does not exist"),
    ("corpus-unknown-format", ["--corpus", "{d}/*.csv"], "unknown format"),
    ("corpus-empty-file", ["--corpus", "{d}/empty.txt"], "is empty (1 file(s), 0 bytes)"),
    ("corpus-empty-folder", ["--corpus", "{d}/empty-folder"], "is empty"),
    ("wrong-text-field-jsonl", ["--corpus", "{d}/body.jsonl"], "no field 'text'"),
    ("wrong-text-field-parquet", ["--corpus", "{d}/body.parquet"], "no column 'text'"),
    ("corpus-not-parquet", ["--corpus", "{d}/not-parquet.parquet"], "is not a readable Parquet file"),
    ("corpus-unreadable", ["--corpus", "{d}/dangling/*.jsonl"], "cannot be read"),
    ("top-k-above-vocab", ["--top-k", "100000"], "exceeds the tokenizer's vocabulary"),
    ("top-k-zero", ["--top-k", "0"], "top_k must be a positive integer"),
    ("max-length-above-context", ["--max-length", "100000", "--batch-tokens", "100000"], "exceeds the teacher's context"),
    ("output-not-a-label-set", ["--output", "{d}/foreign"], "not a softlabels label set"),
    ("bucket-missing", ["--output", "s3://no-such-bucket-xyz/set"], "s3://no-such-bucket-xyz/set: bucket or path does not exist"),
    ("wrong-credentials", ["--output", "{s3}/x", "--storage-option", "key=softlabels-nobody",
                           "--storage-option", "secret=wrong"], "check credentials"),
    ("teacher-missing", ["--teacher", "./no/such/dir"], "does not exist"),
    ("encoding-unknown", ["--encoding", "zip"], "unknown encoding 'zip'"),
    ("encoding-bad-parameter", ["--encoding", "compact:max_kl=2"], "max_kl must be in (0, 1)"),
    ("tail-samples-out-of-range", ["--tail-samples", "300"], "tail_samples must be an integer in 0..255"),
    ("storage-option-malformed", ["--storage-option", "novalue"], "expects key=value"),
    ("yaml-unknown-key", ["--config", "{d}/bad.yaml"], "unknown setting 'bogus_key'"),
    ("yaml-not-a-mapping", ["--config", "{d}/list.yaml"], "expected a mapping of settings"),
    ("ray-address-malformed", ["--ray-address", "nonsense"], "expected host:port"),
]


@pytest.mark.parametrize("extra,fragment", [c[1:] for c in LABELER_CASES], ids=[c[0] for c in LABELER_CASES])
def test_labeler_refuses(extra, fragment, inputs, ray_local, tiny_teacher, s3_server, tmp_path):
    out = tmp_path / "out"
    extra = [a.format(d=inputs, s3=s3_server) for a in extra]
    code, _, err = cli_in_process("label", "--teacher", tiny_teacher, "--output", str(out), "--limit", "2",
                                  "--max-length", "64", *extra)
    assert_one_line_error(code, err, "label", fragment)
    assert not out.exists(), "a refused run wrote to its output"
    assert sorted(p.name for p in (inputs / "foreign").iterdir()) == ["notes.txt"]


def test_labeler_debug_shows_the_traceback(tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        cli_in_process("label", "--teacher", tiny_teacher, "--output", str(tmp_path / "o"), "--top-k", "0", "--debug")


@pytest.mark.slow
def test_corpus_of_only_empty_documents_is_refused_and_leaves_the_output_as_it_was(ray_local, tiny_teacher, tmp_path):
    """Only knowable after reading: the teachers have loaded; still one line, and no trace at --output."""
    corpus = tmp_path / "blank.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "", ""]))
    out = tmp_path / "out"
    code, _, err = cli_in_process("label", "--teacher", tiny_teacher, "--corpus", str(corpus), "--output", str(out),
                                  "--max-length", "64")
    assert_one_line_error(code, err, "label", "has no text to label (3 documents, 3 empty, 0 skipped)")
    assert not out.exists()


def _rewrite_shard(d: Path, m: dict, change) -> None:
    """Replace the first shard by ``change(table) -> bytes`` and record its size and sha256 (a consistent forgery)."""
    import hashlib

    import pyarrow.parquet as pq

    shard = d / m["shards"][0]["path"]
    data = change(pq.read_table(shard))
    shard.write_bytes(data)
    m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])


def _plant_code(d: Path, m: dict, marker: Path) -> None:
    """A tokenizer that would run a Python file (writing ``marker``), with checksums that match it."""
    import hashlib

    tok = d / "tokenizer"
    (tok / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    m["tokenizer"]["checksums"] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in tok.iterdir()}


def damage(label_set: str, tmp_path: Path, how: str) -> str:
    """A copy of ``label_set`` with one thing wrong (or hostile); returns its path."""
    from softlabels.schemas import decode_table, encode_samples, table_to_parquet_bytes
    from softlabels.schemas.encodings import META_ENCODING, Encoding

    d = tmp_path / how
    shutil.copytree(label_set, d)
    m = json.loads((d / "manifest.json").read_text())
    shard = m["shards"][0]["path"]
    if how == "unknown-version":
        m["schema_version"] = 99
    elif how == "sha256-edited":
        m["shards"][0]["sha256"] = "0" * 64
    elif how == "path-escapes-with-dotdot":
        m["shards"][0]["path"] = "../" + shard
    elif how == "path-is-a-foreign-url":
        m["shards"][0]["path"] = "s3://elsewhere/" + shard
    elif how == "path-is-absolute":
        m["shards"][0]["path"] = "/etc/passwd"
    elif how == "shard-missing":
        (d / shard).unlink()
    elif how == "shard-truncated":
        (d / shard).write_bytes((d / shard).read_bytes()[:-100])
    elif how == "shard-corrupted":
        data = bytearray((d / shard).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / shard).write_bytes(bytes(data))
    elif how == "manifest-not-json":
        (d / "manifest.json").write_text("{ half a manifest")
        return str(d)
    elif how == "manifest-missing":
        (d / "manifest.json").unlink()
        return str(d)
    elif how == "manifest-deeply-nested":
        (d / "manifest.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
        return str(d)
    elif how == "manifest-too-large":
        (d / "manifest.json").write_text(json.dumps(m) + " " * 5000)  # the test caps manifests at 4,000 bytes
        return str(d)
    elif how == "vocab-of-a-billion":
        m["tokenizer"]["vocab_size"] = 10**9
    elif how == "top-k-of-a-billion":
        m["top_k"] = m["tokenizer"]["vocab_size"] = 10**9
    elif how == "totals-negative":
        m["totals"]["sequences"] = -5
    elif how == "totals-do-not-add-up":
        m["totals"]["tokens"] += 1
    elif how == "field-of-the-wrong-type":
        m["shards"][0]["rows"] = str(m["shards"][0]["rows"])
    elif how == "tokenizer-folder-escapes":
        m["tokenizer"]["files"] = "../outside_tok"
    elif how == "tokenizer-file-edited":
        (d / "tokenizer" / "tokenizer.json").write_text("{}")
    elif how == "tokenizer-checksum-names-a-path":
        m["tokenizer"]["checksums"] = {"../../etc/passwd": "0" * 64}
    elif how == "tokenizer-auto-map":
        _plant_code(d, m, tmp_path / "ran")
    elif how == "shard-with-another-k":  # a valid shard of k=4 in a k=8 set, with a matching sha256
        def four(t):
            rows = list(decode_table(t))
            for s in rows:
                s.topk_ids, s.topk_logprobs = s.topk_ids[:, :4], s.topk_logprobs[:, :4]
            return table_to_parquet_bytes(encode_samples(rows, 4, Encoding("fp16")))
        _rewrite_shard(d, m, four)
    elif how == "ids-beyond-the-student":  # a valid shard whose top-k names an id the tokenizer does not have
        def beyond(t):
            rows = list(decode_table(t))
            rows[0].topk_ids = rows[0].topk_ids.copy()
            rows[0].topk_ids[0, -1] = m["tokenizer"]["vocab_size"] + 5
            return table_to_parquet_bytes(encode_samples(rows, m["top_k"], Encoding("fp16")))
        _rewrite_shard(d, m, beyond)
    elif how == "tail-sample-id-negative":  # tail draws naming id -7, everything else consistent
        def draws(t):
            import numpy as np

            rows = list(decode_table(t))
            for s in rows:
                s.tail_sample_ids = np.full((len(s.input_ids), 2), -7, dtype=np.int32)
                s.tail_sample_counts = np.ones((len(s.input_ids), 2), dtype=np.uint8)
            return table_to_parquet_bytes(encode_samples(rows, m["top_k"], Encoding("fp16")))
        _rewrite_shard(d, m, draws)
        m["tail_samples"] = 2
    elif how == "sample-id-not-hex":
        def not_hex(t):
            import pyarrow as pa

            ids = t.column("sample_id").to_pylist()
            ids[0] = "../../etc/passwd"
            fixed = t.set_column(0, "sample_id", pa.array(ids, pa.string()))
            return table_to_parquet_bytes(fixed.replace_schema_metadata(t.schema.metadata))
        _rewrite_shard(d, m, not_hex)
    elif how == "shard-array-cut-short":  # one row's input ids a position short of its labels, sha256 matching
        def cut(t):
            import pyarrow as pa

            ids = t.column("input_ids").to_pylist()
            ids[0] = ids[0][:-1]
            column = pa.array(ids, t.schema.field("input_ids").type)
            fixed = t.set_column(t.column_names.index("input_ids"), "input_ids", column)
            return table_to_parquet_bytes(fixed.replace_schema_metadata(t.schema.metadata))
        _rewrite_shard(d, m, cut)
    elif how == "footer-claims-a-huge-vocabulary":
        def huge(t):
            meta = dict(t.schema.metadata)
            enc = json.loads(meta[META_ENCODING])
            meta[META_ENCODING] = json.dumps({**enc, "vocab_size": 10**9}).encode()
            return table_to_parquet_bytes(t.replace_schema_metadata(meta))
        _rewrite_shard(d, m, huge)
    else:
        raise AssertionError(how)
    (d / "manifest.json").write_text(json.dumps(m))
    return str(d)


TRAINER_SET_CASES = [
    ("unknown-version", "schema_version 99"),
    ("sha256-edited", "part-000000"),
    ("path-escapes-with-dotdot", "shard path"),
    ("path-is-a-foreign-url", "shard path"),
    ("path-is-absolute", "shard path"),
    ("shard-missing", "part-000000"),
    ("shard-truncated", "part-000000"),
    ("shard-corrupted", "part-000000"),
    ("manifest-not-json", "not valid JSON"),
    ("manifest-missing", "no manifest.json"),
    ("manifest-deeply-nested", "nested too deeply"),
    ("manifest-too-large", "more than a manifest may hold"),
    ("vocab-of-a-billion", "vocab_size must be an int in 1..4194304"),
    ("top-k-of-a-billion", "must be an int in 1.."),
    ("totals-negative", "must not be negative"),
    ("totals-do-not-add-up", "the shards add up to"),
    ("field-of-the-wrong-type", "ShardInfo.rows must be int"),
    ("tokenizer-folder-escapes", "tokenizer folder '../outside_tok' is not a plain relative path"),
    ("tokenizer-file-edited", "tokenizer.json: sha256"),
    ("tokenizer-checksum-names-a-path", "is not a plain file name"),
    ("tokenizer-auto-map", "auto_map"),
    ("shard-with-another-k", "holds top_k=4, the manifest says 8"),
    ("shard-array-cut-short", "positions (ids/log-probs/tail), input_ids"),
    ("ids-beyond-the-student", "is beyond the student's"),
    ("tail-sample-id-negative", "tail_sample_ids lie outside [0, 4194304)"),
    ("sample-id-not-hex", "a sample_id is not a hex content address"),
    ("footer-claims-a-huge-vocabulary", "declares a vocabulary of 1000000000"),
]


@pytest.mark.parametrize("how,fragment", TRAINER_SET_CASES, ids=[c[0] for c in TRAINER_SET_CASES])
def test_trainer_refuses_a_damaged_label_set(how, fragment, label_set, tmp_path, monkeypatch):
    if how == "manifest-too-large":
        monkeypatch.setenv("SOFTLABELS_MAX_MANIFEST_BYTES", "4000")
    bad = damage(label_set, tmp_path, how)
    code, out, err = cli_in_process("eval", "--labels", bad, "--model", "tiny", "--split", "all")
    assert_one_line_error(code, err, "eval", fragment)
    assert not out.strip(), "a refused eval printed results"


TRAINER_FLAG_CASES = [
    ("steps-zero", ["--steps", "0"], "steps must be a positive integer"),
    ("batch-size-negative", ["--batch-size", "-1"], "batch_size must be"),
    ("lr-negative", ["--lr", "-1"], "lr must be"),
    ("top-k-above-stored-k", ["--top-k", "9"], "top_k must be in [1, 8]"),
    ("plot-not-png", ["--plot", "x.jpg"], "expected a .png"),
    ("student-missing", ["--student", "./no/such/student"], "does not exist"),
    ("tail-sampled-without-draws", ["--loss", "tail-sampled"], "has no tail samples"),
    ("labels-bucket-missing", ["--labels", "s3://no-such-bucket-xyz/set"], "s3://no-such-bucket-xyz/set: the bucket does not exist"),
    ("labels-wrong-credentials", ["--labels", "{s3}/any", "--storage-option", "key=softlabels-nobody",
                                  "--storage-option", "secret=wrong"], "read {s3}/any/manifest.json: access denied"),
    ("clip-negative", ["--clip", "-1"], "clip must be > 0"),
    ("lr-infinite", ["--lr", "inf"], "lr must be a finite number"),
    ("weight-decay-nan", ["--weight-decay", "nan"], "weight_decay must be a finite number"),
    ("min-lr-ratio-above-1", ["--min-lr-ratio", "2"], "min_lr_ratio must be a finite number in [0, 1]"),
    ("eval-fraction-1", ["--eval-fraction", "1"], "eval_fraction must be a finite number in [0, 1)"),
    ("train-split-empty", ["--eval-fraction", "0.999999"], "the train split of"),
    ("allow-changed-unknown", ["--allow-changed", "loss"], "invalid choice: 'loss'"),
]


@pytest.mark.parametrize("extra,fragment", [c[1:] for c in TRAINER_FLAG_CASES], ids=[c[0] for c in TRAINER_FLAG_CASES])
def test_trainer_refuses(extra, fragment, label_set, s3_server, tmp_path):
    out = tmp_path / "o"
    extra = [a.format(s3=s3_server) for a in extra]
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *extra)
    assert_one_line_error(code, err, "train", fragment.format(s3=s3_server))
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_internal_error_keeps_its_traceback(label_set, tmp_path):
    """A bug (here: a corrupted array in a DataLoader worker) is not the user's fault: traceback, exit 1."""
    script = (
        "import sys\n"
        "import softlabels.trainer.data as data\n"
        "real = data.sample_to_tensors\n"
        "def corrupted(s, *a):\n"
        "    if data.get_worker_info() is not None:  # only inside DataLoader workers (training, not eval)\n"
        "        s.topk_logprobs = s.topk_logprobs[:, :-1]  # one column short\n"
        "    return real(s, *a)\n"
        "data.sample_to_tensors = corrupted\n"
        "from softlabels.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", script, "train", "--labels", label_set, "--output", str(tmp_path / "o"), "--steps", "1",
         "--num-workers", "1", "--eval-batches", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "DataLoader worker" in proc.stderr, proc.stderr[-3000:]
    assert "softlabels train: error:" not in proc.stderr


def test_trainer_config_file_and_flags(tmp_path):
    """Defaults < --config YAML < flags; every boolean switch can be turned off again (--no-...)."""
    from softlabels.cli import build_parser
    from softlabels.common.cli import given_flags
    from softlabels.common.settings import resolve_settings
    from softlabels.labeler.config import LabelConfig, resolve_config
    from softlabels.trainer.config import TrainConfig

    conf = tmp_path / "job.yaml"
    conf.write_text("labels: s3://b/set\noutput: runs/a\nsteps: 50\nresume: true\nskip-corrupt: true\n"
                    "storage_options: {anon: false}\n")
    args = build_parser().parse_args(["train", "--config", str(conf), "--steps", "7", "--no-resume", "--lr", "3e-4",
                                      "--storage-option", "key=k"])
    cfg = resolve_settings(TrainConfig, args.config, given_flags(args), required=("labels", "output"))
    assert (cfg.labels, cfg.output, cfg.steps, cfg.lr, cfg.resume, cfg.skip_corrupt) == ("s3://b/set", "runs/a", 7, 3e-4, False, True)
    assert cfg.storage_options == {"anon": False, "key": "k"} and cfg.batch_size == TrainConfig.batch_size
    conf.write_text("output: o\npacking: true\nadd_eos: true\n")
    args = build_parser().parse_args(["label", "--config", str(conf), "--no-packing"])
    lab = resolve_config(args.config, given_flags(args))
    assert (lab.packing, lab.add_eos, lab.top_k) == (False, True, LabelConfig.top_k)
    code, _, err = cli_in_process("train", "--config", str(conf))
    assert_one_line_error(code, err, "train", "unknown setting 'add_eos'")
    conf.write_text("labels: x\n")
    code, _, err = cli_in_process("train", "--config", str(conf))
    assert_one_line_error(code, err, "train", "no output: pass --output or set output in the --config file")


@pytest.mark.slow
def test_a_label_set_never_runs_code_nor_reads_stdin(label_set, tmp_path):
    """A planted tokenizer with an auto_map and a Python file: refused in one line with "y" waiting on stdin."""
    import subprocess
    import sys

    bad = damage(label_set, tmp_path, "tokenizer-auto-map")
    proc = subprocess.run(
        [sys.executable, "-m", "softlabels", "train", "--labels", bad, "--output", str(tmp_path / "o"), "--steps", "1",
         "--trust-remote-code"],  # the student's flag: it never covers code from a label set
        input="y\ny\ny\n", capture_output=True, text=True, timeout=300,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "train", "auto_map", "nothing was run")
    assert not (tmp_path / "ran").exists(), "the label set's Python file ran"


@pytest.mark.parametrize("variable,value,teacher,fragment", [
    ("TMPDIR", "/proc/softlabels-no-such-dir", None, "set RAY_TMPDIR (or TMPDIR) to a writable folder"),
    ("SOFTLABELS_CACHE", "/proc/softlabels-no-such-dir", "smollm2-135m", "set SOFTLABELS_CACHE to a writable folder"),
])
def test_unwritable_scratch_folders_name_the_variable(variable, value, teacher, fragment, tiny_teacher, tmp_path,
                                                      monkeypatch):
    monkeypatch.setenv(variable, value)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    code, _, err = cli_in_process("label", "--teacher", teacher or tiny_teacher, "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, "label", fragment)
