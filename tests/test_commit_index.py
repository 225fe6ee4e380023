"""The commit index: markers gathered per block of units, a resume that reads indexes and one listing.

Runs the writer side of the commit protocol directly (no Ray, no teacher) on local disk
and on the real S3 server; tests/test_labeler_faults.py kills real runs around it.
"""

from __future__ import annotations

import json
import random

import pytest

from softlabels.common.commit import LabelSetWriter
from softlabels.schemas import resolve_url


def committed_by_hand(writer: LabelSetWriter, n: int, order: list[int]) -> dict[str, bytes]:
    """Commit units 0..n-1 (shard, then marker) in ``order``, noting each as the driver does."""
    data = {}
    for i in order:
        name = f"part-{i:06d}"
        data[name] = f"shard {i} ".encode() * (i + 1)
        info = writer.commit_unit(name, data[name], rows=1, tokens=i + 1, inputs=f"digest-{i}")
        writer.record(i, name, info, f"digest-{i}")
    return data


def listing(url: str, folder: str) -> set[str]:
    fs, root = resolve_url(url)
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{folder}", detail=False)}


def test_blocks_are_indexed_and_their_markers_deleted_then_a_resume_finds_every_unit(storage_root, monkeypatch):
    monkeypatch.setenv("SOFTLABELS_INDEX_UNITS", "3")
    writer = LabelSetWriter(storage_root)
    order = list(range(8))
    random.Random(0).shuffle(order)  # units finish out of order across replicas
    data = committed_by_hand(writer, 8, order)
    # blocks [0,3) and [3,6) are complete: one index each, their markers gone; 6 and 7 keep theirs
    assert listing(storage_root, "_commits") == {"index", "part-000006.json", "part-000007.json"}
    assert listing(storage_root, "_commits/index") == {"000000.json", "000001.json"}
    fs, root = resolve_url(storage_root)
    index = json.loads(fs.cat_file(f"{root}/_commits/index/000001.json"))
    assert [c["name"] for c in index["commits"]] == ["part-000003", "part-000004", "part-000005"]
    assert index["commits"][1]["inputs"] == "digest-4" and (index["first"], index["block_units"]) == (3, 3)

    done = LabelSetWriter(storage_root).committed()
    assert sorted(done) == sorted(data)
    for name, c in done.items():
        assert c.info.bytes == len(data[name]) and c.inputs == f"digest-{int(name[5:])}"


def test_a_resume_redoes_units_whose_index_or_shard_is_unusable(storage_root, monkeypatch):
    monkeypatch.setenv("SOFTLABELS_INDEX_UNITS", "2")
    data = committed_by_hand(LabelSetWriter(storage_root), 7, list(range(7)))
    fs, root = resolve_url(storage_root)
    fs.pipe_file(f"{root}/_commits/index/000000.json", b"{not json")  # units 0, 1: index unreadable
    fs.rm(f"{root}/shards/part-000002.parquet")  # unit 2: indexed, shard gone
    fs.pipe_file(f"{root}/shards/part-000005.parquet", data["part-000005"][:-1])  # unit 5: indexed, shard cut
    fs.pipe_file(f"{root}/shards/part-000006.parquet", b"x" * len(data["part-000006"]))  # 6: marker only, same size
    done = LabelSetWriter(storage_root).committed()
    assert sorted(done) == ["part-000003", "part-000004"]


def test_a_stop_between_index_and_marker_deletion_converges(storage_root, monkeypatch):
    """Markers left beside the index that holds them are deleted when a resumed run passes their block;
    an index whose units were all resumed from it is not written again."""
    monkeypatch.setenv("SOFTLABELS_INDEX_UNITS", "2")
    committed_by_hand(LabelSetWriter(storage_root), 4, [0, 1, 2, 3])
    fs, root = resolve_url(storage_root)
    index1 = json.loads(fs.cat_file(f"{root}/_commits/index/000001.json"))
    for entry in index1["commits"]:  # the run stopped after writing index 1, before deleting its markers
        marker = {k: v for k, v in entry.items() if k != "name"}
        fs.pipe_file(f"{root}/_commits/{entry['name']}.json", json.dumps(marker, sort_keys=True).encode())

    def stamps() -> dict[str, str]:
        fs.invalidate_cache()
        return {i["name"].rsplit("/", 1)[-1]: str(i.get("LastModified") or i.get("mtime"))
                for folder in ("_commits", "_commits/index") for i in fs.ls(f"{root}/{folder}", detail=True)
                if i["type"] == "file"}

    before = stamps()
    resumed = LabelSetWriter(storage_root)
    done = resumed.committed()
    assert sorted(done) == [f"part-{i:06d}" for i in range(4)]
    for i in (1, 3, 0, 2):
        name = f"part-{i:06d}"
        resumed.record(i, name, done[name].info, done[name].inputs, resumed=True)
    after = stamps()
    assert set(after) == {"000000.json", "000001.json"}
    assert all(after[k] == before[k] for k in after), "an index was written again for nothing"


@pytest.mark.parametrize("bad", [
    {"path": "shards/part-000009.parquet"},  # names another unit's shard
    {"path": "../elsewhere.parquet"},
    {"bytes": "12"},
])
def test_a_marker_or_index_naming_a_shard_it_does_not_own_is_unusable(tmp_path, monkeypatch, bad):
    monkeypatch.setenv("SOFTLABELS_INDEX_UNITS", "2")
    url = str(tmp_path / "set")
    committed_by_hand(LabelSetWriter(url), 3, [0, 1, 2])
    fs, root = resolve_url(url)
    marker = json.loads(fs.cat_file(f"{root}/_commits/part-000002.json"))
    fs.pipe_file(f"{root}/_commits/part-000002.json", json.dumps({**marker, **bad}).encode())
    index = json.loads(fs.cat_file(f"{root}/_commits/index/000000.json"))
    index["commits"][0].update(bad)
    fs.pipe_file(f"{root}/_commits/index/000000.json", json.dumps(index).encode())
    assert sorted(LabelSetWriter(url).committed()) == []


def test_a_unit_redone_after_its_block_was_indexed_is_taken_from_its_marker(tmp_path, monkeypatch):
    """The marker is the later record: a shard rewritten (same size, other bytes) by a redo that stopped
    before the block's index was written again is checked against the marker, and the index is rewritten."""
    monkeypatch.setenv("SOFTLABELS_INDEX_UNITS", "2")
    url = str(tmp_path / "set")
    committed_by_hand(LabelSetWriter(url), 2, [0, 1])
    redo = LabelSetWriter(url)
    redo.committed()
    new = b"X" * len(b"shard 1 " * 2)  # as if the teacher gave other bytes of the same size
    info = redo.commit_unit("part-000001", new, rows=1, tokens=2, inputs="digest-1")  # then the run stopped
    done = LabelSetWriter(url).committed()
    assert done["part-000001"].info == info and done["part-000001"].info.sha256 != done["part-000000"].info.sha256
    resumed = LabelSetWriter(url)
    done = resumed.committed()
    for i in (0, 1):
        resumed.record(i, f"part-{i:06d}", done[f"part-{i:06d}"].info, f"digest-{i}", resumed=True)
    fs, root = resolve_url(url)
    index = json.loads(fs.cat_file(f"{root}/_commits/index/000000.json"))
    assert index["commits"][1]["sha256"] == info.sha256 and listing(url, "_commits") == {"index"}


def test_a_resume_keeps_the_block_size_the_set_was_indexed_with(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTLABELS_INDEX_UNITS", "4")
    url = str(tmp_path / "set")
    committed_by_hand(LabelSetWriter(url), 5, [0, 1, 2, 3, 4])
    monkeypatch.setenv("SOFTLABELS_INDEX_UNITS", "2")  # e.g. another release's default
    resumed = LabelSetWriter(url)
    done = resumed.committed()
    assert sorted(done) == [f"part-{i:06d}" for i in range(5)] and resumed.index_units == 4
    for i in range(5):
        resumed.record(i, f"part-{i:06d}", done[f"part-{i:06d}"].info, f"digest-{i}", resumed=True)
    assert listing(url, "_commits/index") == {"000000.json"}  # block 0 not split, unit 4's block still open
    assert sorted(LabelSetWriter(url).committed()) == [f"part-{i:06d}" for i in range(5)]


def test_shards_are_listed_by_prefix_in_parallel_on_s3_with_the_same_result(s3_server):
    """Groups of 1,000 names (part-000xxx, part-001xxx, ...) are listed in parallel; the sizes equal one listing's."""
    url = f"{s3_server}/prefixes-{__import__('uuid').uuid4().hex[:8]}"
    writer = LabelSetWriter(url)
    names = ["part-000998", "part-000999", "part-001000", "part-002001"]
    for i, name in enumerate(names):
        writer.commit_unit(name, b"s" * (i + 1), rows=1, tokens=1)
    fs, root = resolve_url(url)
    fs.pipe_file(f"{root}/shards/part-003000.parquet", b"not asked for")
    fs.invalidate_cache()
    whole = {f"shards/{i['name'].rsplit('/', 1)[-1]}": i["size"] for i in fs.ls(f"{root}/shards", detail=True)}
    by_prefix = writer._shard_sizes([f"shards/{n}" for n in names])
    assert by_prefix == {k: v for k, v in whole.items() if not k.startswith("shards/part-003")}
    assert by_prefix["shards/part-002001.parquet"] == 4
