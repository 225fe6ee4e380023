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


def test_with_a_limit_a_read_task_stops_once_its_block_fills_it(tmp_path, tiny_teacher):
    """A 64 MiB .jsonl.gz with --limit 12 --max-length 64: the task decompresses about 1 MiB of it, and the
    sequences planned from what it read are the limit's, as if it had read the whole file."""
    from transformers import AutoTokenizer

    from softlabels.labeler.plan import build_sequences, read_and_tokenize, reading_tokenizer
    from softlabels.schemas import SequenceConfig

    path = tmp_path / "bomb.jsonl.gz"
    write_bomb(path, 64)
    corpus = Corpus(str(path))
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    cfg = SequenceConfig(max_length=64, limit=12)
    docs, stats = read_and_tokenize(corpus.reader, corpus.blocks()[0], reading_tokenizer(tok), 12 * 64, None,
                                    (cfg, tok.eos_token_id))
    assert len(docs) >= 12 and stats.expanded <= 2 << 20  # of 64 MiB
    assert len(list(build_sequences(docs, tok.eos_token_id, cfg))) == 12
