"""Corpus files read with bounds: compressed JSON Lines streamed, a cap on what one read task
expands, damaged files past the first one, ``save_to_disk`` folders as ``load_from_disk`` reads
them, and ``hf:`` names that are not paths (issue 29).

The readers are called directly (no Ray, no teacher) except where a case is about what the
``softlabels label`` command prints.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_one_line_error, cli_in_process
from softlabels.labeler.corpus import BadRow, BlockStats, Corpus
from softlabels.labeler.records import MAX_EXPAND_ENV, STREAM_CHUNK
from softlabels.schemas.errors import UserError

LINE = json.dumps({"text": "All work and no play makes Jack a dull boy. " * 20}) + "\n"


def rows(n: int, start: int = 0) -> bytes:
    return "".join(json.dumps({"text": f"row {i} " + "words " * 30}) + "\n" for i in range(start, start + n)).encode()


def write_bomb(path: Path, mib: int) -> None:
    """A compressed JSON Lines file that expands to about ``mib`` MiB (a few hundred KiB on disk)."""
    chunk = (LINE * ((1 << 20) // len(LINE) + 1)).encode()
    if path.suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=1) as out:
            for _ in range(mib):
                out.write(chunk)
    else:
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            for _ in range(mib):
                out.write(chunk)


def compressed(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_json_lines_are_decompressed_only_as_far_as_rows_are_taken(tmp_path, storage_root, monkeypatch,
                                                                              suffix):
    """A file that expands to 64 MiB: taking its first 12 rows decompresses one chunk (64 KiB), not the file,
    whether its compressed bytes are held (small files) or streamed from storage (files over a piece)."""
    from softlabels.schemas import resolve_url

    local = tmp_path / f"bomb.jsonl{suffix}"
    write_bomb(local, 64)
    url = f"{storage_root}/bomb.jsonl{suffix}"
    fs, path = resolve_url(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(local), path)
    for streamed in (False, True):
        if streamed:
            monkeypatch.setenv("SOFTLABELS_PIECE_BYTES", str(local.stat().st_size - 1))
        corpus = Corpus(url)
        (block,) = corpus.blocks()
        stats = BlockStats()
        docs = list(islice(corpus.reader.documents(block, stats), 12))
        assert [d.text for d in docs] == [json.loads(LINE)["text"]] * 12
        assert [d.doc_id.rsplit(":", 1)[1] for d in docs] == [str(i) for i in range(1, 13)]
        assert 0 < stats.expanded <= STREAM_CHUNK < (64 << 20) // 100, (streamed, stats.expanded)
        assert stats.documents == 12


def test_a_file_that_expands_past_the_cap_is_refused_in_one_line(tmp_path, monkeypatch):
    """The cap stops the reading where it is passed (not after expanding the whole file); .jsonl.gz and
    Parquet (whose dictionary pages expand as much); a cap that is not a number is refused."""
    monkeypatch.setenv(MAX_EXPAND_ENV, str(4 << 20))
    path = tmp_path / "bomb.jsonl.gz"
    write_bomb(path, 32)
    corpus = Corpus(str(path))  # its first row is fine: the cap is found when the block is read
    stats = BlockStats()
    with pytest.raises(UserError) as refused:
        for _ in corpus.reader.documents(corpus.blocks()[0], stats):
            pass
    message = str(refused.value)
    assert "\n" not in message and repr(str(path)) in message and "4 MiB" in message and MAX_EXPAND_ENV in message
    assert stats.expanded <= (4 << 20) + STREAM_CHUNK, stats.expanded

    repeated = "x" * 4096  # 8,000 rows of one value: a few KiB of Parquet, 32 MiB decoded
    pq.write_table(pa.table({"text": [repeated] * 8000}), tmp_path / "bomb.parquet")
    corpus = Corpus(str(tmp_path / "bomb.parquet"))
    with pytest.raises(UserError, match=r"bomb.parquet' expands to more than 4 MiB in one read task"):
        corpus.reader.read(corpus.blocks()[0])

    monkeypatch.setenv(MAX_EXPAND_ENV, "4GB")
    with pytest.raises(UserError, match=f"{MAX_EXPAND_ENV} must be a positive number of bytes, got '4GB'"):
        Corpus(str(path))


def damaged(d: Path, kind: str) -> Path:
    """A corpus folder: a good first file, then a damaged one holding 200 good rows before the damage."""
    d.mkdir()
    (d / "a.jsonl").write_bytes(rows(3))
    if kind == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": [f"row {i}" for i in range(200)]}), buf)
        data = buf.getvalue()
        (d / "b.parquet").write_bytes(data[:4] + b"\xff" * 40 + data[44:])  # its first page header overwritten
        return d / "b.parquet"
    suffix = "." + kind
    data = compressed(rows(200) + rows(2000, start=200), suffix)
    path = d / f"b.jsonl{suffix}"
    path.write_bytes(data[: len(data) // 2])  # cut short
    return path


DAMAGED = [
    ("gz", "the gzip data is cut short or damaged after line"),
    ("zst", "the zstd data is cut short or damaged after line"),
    ("parquet", "not a readable Parquet file"),
]


@pytest.mark.parametrize("kind,fragment", DAMAGED, ids=[k for k, _ in DAMAGED])
def test_a_damaged_file_past_the_first_is_a_bad_row_naming_it(tmp_path, kind, fragment):
    """--on-error fail: one line naming the file; skip: the rows before the damage are kept, the damage counted."""
    bad = damaged(tmp_path / "corpus", kind)
    corpus = Corpus(str(tmp_path / "corpus"))  # the first file is checked when the corpus is opened: fine
    blocks = corpus.blocks()
    assert len(corpus.reader.read(blocks[0])[0]) == 3
    with pytest.raises(BadRow) as refused:
        corpus.reader.read(blocks[1])
    message = str(refused.value)
    assert message.startswith(f"{bad}: {fragment}") and "\n" not in message, message
    docs, stats = Corpus(str(tmp_path / "corpus"), on_error="skip").reader.read(blocks[1])
    assert len(stats.skipped) == 1 and stats.skipped[0].startswith(f"{bad}: {fragment}")
    if kind != "parquet":  # a compressed stream is read up to the damage
        assert len(docs) >= 200 and docs[0].text.startswith("row 0 ")


@pytest.mark.slow
def test_label_refuses_a_damaged_second_file_in_one_line(ray_local, tiny_teacher, tmp_path):
    """Through the command, the read task's refusal reaches the user as one line naming the file, exit code 2
    (a corrupt Parquet page was an OSError that reached the user without the file's name). The compressed
    cases travel the same way (a BadRow from the read task)."""
    kind, fragment = DAMAGED[2]
    bad = damaged(tmp_path / "corpus", kind)
    code, _, err = cli_in_process("label", "--teacher", tiny_teacher, "--corpus", str(tmp_path / "corpus"),
                                  "--output", str(tmp_path / "out"), "--max-length", "64")
    assert_one_line_error(code, err, "label", f"{bad}: {fragment}", "--on-error skip")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_save_to_disk_folder_is_read_as_load_from_disk_reads_it(tmp_path, caplog):
    """The cache-*.arrow files that .map() and .filter() leave in the folder are not corpus; of a
    DatasetDict folder only the split's listed files are."""
    import datasets

    datasets.disable_progress_bars()
    want = [f"row {i}" for i in range(5)]
    datasets.Dataset.from_dict({"text": want}).save_to_disk(str(tmp_path / "saved"))
    saved = datasets.load_from_disk(str(tmp_path / "saved"))
    saved.map(lambda r: {"text": r["text"].upper()}).filter(lambda r: r["text"] != "ROW 1")
    assert len(list((tmp_path / "saved").glob("cache-*.arrow"))) == 2  # both caches are in the folder
    with caplog.at_level("INFO", logger="softlabels.labeler.sources"):
        corpus = Corpus(str(tmp_path / "saved"))
    assert [Path(f).name for f in corpus.files] == ["data-00000-of-00001.arrow"]
    assert [d.text for b in corpus.blocks() for d in corpus.reader.read(b)[0]] == want
    assert "not 2 other Arrow file(s)" in caplog.text

    datasets.DatasetDict({"train": saved, "test": saved.select([0])}).save_to_disk(str(tmp_path / "dict"))
    shutil.copy(next((tmp_path / "saved").glob("cache-*.arrow")), tmp_path / "dict" / "train" / "cache-0123.arrow")
    for spec in (tmp_path / "dict", tmp_path / "outer"):  # the folder itself, or a folder holding it
        if spec.name == "outer":
            shutil.copytree(tmp_path / "dict", spec / "dict")
        corpus = Corpus(str(spec), split="train")
        assert [Path(f).parent.name + "/" + Path(f).name for f in corpus.files] == ["train/data-00000-of-00001.arrow"]
        assert [d.text for b in corpus.blocks() for d in corpus.reader.read(b)[0]] == want
    test = Corpus(str(tmp_path / "outer"), split="test")
    assert [d.text for b in test.blocks() for d in test.reader.read(b)[0]] == want[:1]

    with pytest.raises(UserError, match=r"the saved dataset '.*outer/dict' \(of several splits\) has no split 'dev'"):
        Corpus(str(tmp_path / "outer"), split="dev")
    (tmp_path / "saved" / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(UserError, match="lists 'data-00000-of-00001.arrow' in its state.json, which is missing"):
        Corpus(str(tmp_path / "saved"))
    (tmp_path / "saved" / "state.json").write_text("{}")
    with pytest.raises(UserError, match=r"state.json' is not the state file of a saved dataset \(KeyError"):
        Corpus(str(tmp_path / "saved"))


def cache_hub_dataset(cache: Path, src: Path, name: str) -> None:
    """Put ``name`` (``owner/name``) into an HF datasets cache as a hub download would leave it, from local
    JSON Lines: what ``datasets.load_dataset(name)`` finds offline."""
    import datasets

    builder = datasets.load_dataset_builder("json", data_files={"train": str(src)}, cache_dir=str(cache / "build"))
    builder.download_and_prepare()
    owner, short = name.split("/")
    config = Path(builder.cache_dir).parent.parent  # <build>/json/<config>/<version>/<hash>
    target = cache / f"{owner}___{short}" / "default"
    shutil.copytree(config, target)
    (arrow,) = target.glob("*/*/json-train.arrow")
    arrow.rename(arrow.with_name(f"{short}-train.arrow"))


def test_hf_takes_a_hub_name_not_a_local_path(tmp_path, monkeypatch, tiny_teacher):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_bytes(rows(4))
    for name in (str(tmp_path / "data"), "./data", "data", "~/data", "s3://bucket/data"):
        with pytest.raises(UserError, match=f"--corpus hf:{name}: hf: takes the name of a hub dataset .*"
                                            f"given without the prefix \\(--corpus {name}\\)"):
            Corpus(f"hf:{name}")
    code, _, err = cli_in_process("label", "--teacher", tiny_teacher, "--corpus", "hf:./data",
                                  "--output", str(tmp_path / "out"))
    assert_one_line_error(code, err, "label", "hf: takes the name of a hub dataset", "(--corpus ./data)")
    # A hub name is still resolved by `datasets` from its cache (offline here: HF_HUB_OFFLINE in conftest).
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # read when datasets is imported
    cache_hub_dataset(tmp_path / "cache", tmp_path / "data" / "train.jsonl", "nobody/cached")
    corpus = Corpus("hf:nobody/cached")
    assert all(f.endswith(".arrow") for f in corpus.files)
    assert [d.text for b in corpus.blocks() for d in corpus.reader.read(b)[0]] == [f"row {i} " + "words " * 30
                                                                                    for i in range(4)]


@pytest.mark.parametrize("chat,packing", [(False, False), (False, True), pytest.param(True, False, marks=pytest.mark.slow),
                                          pytest.param(True, True, marks=pytest.mark.slow)])
def test_with_a_limit_a_read_task_stops_once_its_block_fills_it(tmp_path, tiny_teacher, monkeypatch, chat, packing):
    """A .jsonl.gz of distinct rows with --limit 12: the task decompresses a fraction of it, and the sequences
    planned from what it read are the first 12 of reading it whole (text and chat, packed or not)."""
    from transformers import AutoTokenizer

    from softlabels.labeler.plan import Rendering, build_sequences, read_and_tokenize, reading_tokenizer
    from softlabels.schemas import SequenceConfig

    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}")
    def row(i):
        words = " ".join(f"w{(i * 7919 + j) % 10007}" for j in range((4 if chat else 40) + i % (10 if chat else 50)))
        if chat:
            return {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": words}]}
        return {"text": f"row {i}: {words}"}

    monkeypatch.setattr("softlabels.labeler.plan.READ_STEP_CHARS", 32 << 10)  # small files: small steps
    path = tmp_path / "rows.jsonl.gz"
    data = b"".join(json.dumps(row(i)).encode() + b"\n" for i in range(3000 if chat else 4000))
    path.write_bytes(gzip.compress(data, compresslevel=1))
    corpus = Corpus(str(path))
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    length = 512 if chat else 64
    rendering = Rendering("chat", "assistant", chatml, max_tokens=length) if chat else Rendering()
    read_tok = tok if chat else reading_tokenizer(tok)
    cfg = SequenceConfig(max_length=length, limit=12, packing=packing)
    eos = tok.eos_token_id
    docs, stats = read_and_tokenize(corpus.reader, corpus.blocks()[0], read_tok, 12 * length, rendering,
                                    (cfg, eos))
    whole, whole_stats = read_and_tokenize(corpus.reader, corpus.blocks()[0], read_tok, 12 * length, rendering)
    assert stats.expanded < len(data) / 3 and whole_stats.expanded == len(data)
    got, want = list(build_sequences(docs, eos, cfg)), list(build_sequences(whole, eos, cfg))
    assert len(got) == 12 and [s.source for s in got] == [s.source for s in want]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert (a.trained is None) == (b.trained is None) and (a.trained is None or (a.trained == b.trained).all())


def test_a_parquet_dictionary_bomb_is_refused_before_its_rows_are_built(tmp_path, monkeypatch):
    """One 1 MiB value repeated by a dictionary page: a few KiB on disk, 128 MiB per batch of rows. The batch's
    expanded size is counted from the dictionary before any row is made."""
    import tracemalloc

    monkeypatch.setenv(MAX_EXPAND_ENV, str(10 << 20))
    path = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"text": ["y" * (1 << 20)] * 512}), path, compression="zstd")
    assert path.stat().st_size < 100_000
    corpus = Corpus(str(path))
    default = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default)  # counts what Arrow allocates while the file is read
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="dict.parquet' expands to more than 10 MiB in one read task"):
            corpus.reader.read(corpus.blocks()[0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(default)
    # no batch of 128 rows of 1 MiB values was built, in Arrow or in Python
    assert peak < 16 << 20 and pool.max_memory() < 16 << 20, (peak, pool.max_memory())


def test_ordinary_files_pass_the_cap_by_their_size(tmp_path, monkeypatch):
    """The cap is at least 16x the bytes a task reads: a Parquet file that decodes to 4x its size, and Arrow IPC
    (held as it is, not expanded), pass a cap far below their decoded size; a bomb of the same cap does not."""
    monkeypatch.setenv(MAX_EXPAND_ENV, str(1 << 20))
    texts = [f"row {i} " + " ".join(str(i * j) for j in range(200)) for i in range(3000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", compression="zstd")
    with pa.ipc.new_stream(str(tmp_path / "b.arrow"), pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": texts * 2}))
    for name, n in (("a.parquet", 3000), ("b.arrow", 6000)):
        corpus = Corpus(str(tmp_path / name))
        docs, stats = corpus.reader.read(corpus.blocks()[0])
        assert [d.text for d in docs] == (texts * 2)[:n]
    write_bomb(tmp_path / "bomb.jsonl.gz", 8)
    corpus = Corpus(str(tmp_path / "bomb.jsonl.gz"))
    with pytest.raises(UserError, match="expands to more than 1 MiB"):
        corpus.reader.read(corpus.blocks()[0])


def test_a_storage_error_midway_through_a_streamed_file_reads_on(tmp_path, monkeypatch):
    """A large compressed file is streamed; a read that fails midway (a connection reset) reopens the file and
    reads on from the start, giving every row once, in order; a storage that keeps failing is one line."""
    import random

    rng = random.Random(0)
    data = "".join(json.dumps({"text": f"{i} {rng.getrandbits(800):x}"}) + "\n" for i in range(5000)).encode()
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress(data))
    monkeypatch.setenv("SOFTLABELS_PIECE_BYTES", str(path.stat().st_size - 1))  # streamed, not held
    corpus = Corpus(str(path))
    reader = corpus.reader
    real_open, opened = reader.fs.open, []

    class Flaky:
        def __init__(self, fh, fail_after):
            self.fh, self.left = fh, fail_after

        def read(self, n=-1):
            if self.left is not None and self.left <= 0:
                raise ConnectionResetError(104, "Connection reset by peer")
            out = self.fh.read(n)
            if self.left is not None:
                self.left -= len(out)
            return out

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def flaky_open(p, mode="rb", **kw):
        opened.append(p)
        return Flaky(real_open(p, mode, **kw), 100_000 if len(opened) <= 2 else None)

    monkeypatch.setattr(reader.fs, "open", flaky_open)
    monkeypatch.setattr("softlabels.labeler.corpus.time.sleep", lambda s: None)
    docs, stats = reader.read(corpus.blocks()[0])
    assert len(opened) == 3 and [d.text for d in docs] == [json.loads(line)["text"] for line in data.splitlines()]
    opened.clear()
    monkeypatch.setattr(reader.fs, "open", lambda p, mode="rb", **kw: Flaky(real_open(p, mode, **kw), 100_000))
    from softlabels.schemas.errors import StorageError

    with pytest.raises(StorageError, match="big.jsonl.gz: failed after 7 attempts"):
        reader.read(corpus.blocks()[0])
