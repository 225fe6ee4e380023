"""An output has one owner: claims on local disk and S3, two labelers on one output, --overwrite's reach."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, assert_one_line_error, cli_in_process
from softlabels.common.claim import ClaimLost, Holder, OutputClaim, OutputClaimed, _gen_name
from softlabels.schemas import open_label_set, resolve_url


def claim(url: str, command: str = "softlabels label") -> OutputClaim:
    fs, root = resolve_url(url)
    return OutputClaim(fs, root, url, command)


def test_a_claim_is_exclusive_until_released_or_expired(storage_root):
    # The race itself: two runs create the same generation at once; the store lets exactly one win.
    racers = [claim(storage_root), claim(storage_root)]
    for i, r in enumerate(racers):
        r.holder = Holder(f"racer-{i}", "h", 1, "t", "softlabels label", time.time() + 60)
    assert [r._create(9, r.holder) for r in racers] == [True, False]
    assert racers[0].read(9).run_id == "racer-0"
    racers[0].gen = 9
    racers[0].release(forget=True)

    a = claim(storage_root)
    a.acquire()
    b = claim(storage_root, "softlabels convert")
    with pytest.raises(OutputClaimed, match=rf"another run: softlabels label on host {socket.gethostname()}, pid \d+"):
        b.acquire()
    a.check()  # still the owner
    a.release()
    b.acquire()  # free again
    b.release()
    gen, holder = claim(storage_root).current()
    assert holder.released and holder.command == "softlabels convert" and "(released)" in holder.describe()

    # A claim another host left behind: live until it expires, then taken over.
    fs, root = resolve_url(storage_root)
    stale = Holder("dead-run", "other-host", 1, "2026-01-01T00:00:00+00:00", "softlabels label", time.time() + 60)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.makedirs(f"{root}/_claim", exist_ok=True)
    fs.pipe_file(f"{root}/{_gen_name(3)}", json.dumps(stale.__dict__).encode())
    with pytest.raises(OutputClaimed, match="other-host"):
        claim(storage_root).acquire()
    fs.pipe_file(f"{root}/{_gen_name(3)}", json.dumps({**stale.__dict__, "expires_at": time.time() - 1}).encode())
    c = claim(storage_root)
    c.acquire()
    assert c.gen == 4 and [g for g in c.generations()] == [4]  # the dead claim is gone
    # --take-over of a live claim: the old holder finds out before its next write ...
    d = claim(storage_root)
    d.acquire(take_over=True)
    with pytest.raises(ClaimLost, match="took it over"):
        c.check()
    d.release()
    # ... and a later run's claim is safe from it: generations are never reused, so the stale
    # holder's release finds nothing of its own to release.
    e = claim(storage_root)
    e.acquire()
    c.lost = None  # as if its heartbeat had not noticed yet
    c.release()
    e.check()
    assert e.gen == 6 and e.read(6).run_id == e.holder.run_id and not e.read(6).released
    e.release()
    # A live-looking claim of this machine whose process is gone, or whose pid now belongs to
    # another process (a restarted container runs as the same pid): taken over at once.
    here = claim(storage_root)
    here.acquire()
    here._stop.set()  # no heartbeat: this test plays the holder's part below
    gen, me = here.gen, here.holder
    for pid, start in ((me.pid, me.pid_start + 1), (2**22 + 7, me.pid_start)):
        fs.pipe_file(f"{root}/{_gen_name(gen)}",
                     json.dumps({**me.__dict__, "pid": pid, "pid_start": start, "expires_at": time.time() + 60}).encode())
        nxt = claim(storage_root)
        nxt.acquire()
        assert nxt.gen == gen + 1
        gen = nxt.gen
        nxt._stop.set()


@pytest.mark.slow
def test_two_labelers_on_one_output_exactly_one_proceeds(tiny_teacher, storage_root, ray_local):
    """The second run is refused naming the first (before it starts Ray); the first publishes a set that
    verifies shard by shard. The first is a process of its own (the second names its pid), on the tests' Ray."""
    args = ["--teacher", tiny_teacher, "--corpus", "pydoc", "--top-k", "8", "--max-length", "64", "--limit", "150",
            "--shard-tokens", "256", "--batch-tokens", "256", "--threads", "1", "--output", storage_root]
    address = ray_local.get_runtime_context().gcs_address
    first = subprocess.Popen([sys.executable, "-m", "softlabels", "label", *args, "--json", "--ray-address", address],
                             cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fs, root = resolve_url(storage_root)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        fs.invalidate_cache()
        if fs.exists(f"{root}/_labeler/run.json"):  # claimed, and Ray is up: it is labeling now
            break
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[1][-2000:]
    # --overwrite --top-k 4 too: refused before it deletes anything
    code, _, err = cli_in_process("label", *args, "--top-k", "4", "--overwrite")
    assert_one_line_error(code, err, "label", "is being written by another run", f"pid {first.pid}", "--take-over")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    ls = open_label_set(storage_root)
    assert ls.manifest.top_k == 8 and sum(len(ls.read_shard(s)) for s in ls.shards) == ls.manifest.totals.sequences
    gen, holder = claim(storage_root).current()
    assert holder.released and holder.pid == first.pid  # released when done


def test_overwrite_deletes_only_label_sets(tiny_teacher, tmp_path, label_set):
    corpus = tmp_path / "mine"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("my corpus")
    code, _, err = cli_in_process("label", "--teacher", tiny_teacher, "--output", str(corpus), "--overwrite")
    assert_one_line_error(code, err, "label", "is not a softlabels label set", "--overwrite deletes only label sets")
    assert (corpus / "notes.txt").read_text() == "my corpus"
    # A label set with a file of the user's beside it: --overwrite removes the set, keeps the file.
    import shutil

    target = tmp_path / "set"
    shutil.copytree(label_set, target)
    (target / "README.txt").write_text("notes on this set")
    code, _, err = cli_in_process("convert", label_set, "--output", str(target), "--overwrite", "--encoding", "fp16")
    assert code == 0, err[-2000:]
    assert (target / "README.txt").read_text() == "notes on this set"
    assert open_label_set(str(target)).manifest.encoding == {"name": "fp16"}
    assert not (target / "_labeler").exists()  # the labeler's run record went with its set


# A claim record that cannot be read, and why (as the refusal says it).
GARBLED = {
    "not JSON": (b'{"run_id": "4f2a", "host": ', "not JSON: Expecting value"),
    "not an object": (b'["softlabels label"]', "a JSON list, not an object"),
    "a field missing": (b'{"run_id": "4f2a"}', "no field 'host'"),
    "a field of the wrong type": (
        json.dumps({**Holder("4f2a", "h", 12, "t", "softlabels label", 0.0).__dict__, "expires_at": "soon"}).encode(),
        "field 'expires_at' is 'soon', not a number"),
    "a directory": (None, "a directory, not a claim file"),
}


def garble(root, how: str):
    """Put a claim record that cannot be read at generation 3 of ``root`` (a local folder); returns its path."""
    path = root / "_claim" / _gen_name(3).split("/")[1]
    path.parent.mkdir(parents=True)
    data = GARBLED[how][0]
    if data is None:
        path.mkdir()
        (path / "left-here").write_text("not a claim")
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("how", GARBLED)
def test_a_claim_that_cannot_be_read_is_refused_naming_it_and_take_over_gets_past(how, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    path = garble(out, how)
    code, _, err = cli_in_process("label", "--teacher", tiny_teacher, "--corpus", "pydoc", "--output", str(out))
    assert_one_line_error(code, err, "label", f"its claim {path} cannot be read ({GARBLED[how][1]}", "--take-over")
    assert path.exists()
    # --take-over: the user says no run holds it
    taker = claim(str(out))
    taker.acquire(take_over=True)
    assert taker.gen == 4 and taker.generations() == [4] and not path.exists()
    taker.release()
    assert claim(str(out)).current()[1].released


def test_a_claim_that_cannot_be_read_and_was_not_renewed_for_a_ttl_is_taken_over(tmp_path):
    out = tmp_path / "out"
    path = garble(out, "a field of the wrong type")
    os.utime(path, (time.time() - 3600, time.time() - 3600))  # written an hour ago: nobody renews it
    c = claim(str(out))
    c.acquire()
    assert c.gen == 4 and not path.exists()
    c.release()


def test_convert_refuses_a_directory_in_place_of_the_claim_then_takes_it_over(label_set, tmp_path):
    out = tmp_path / "converted"
    path = garble(out, "a directory")
    code, _, err = cli_in_process("convert", label_set, "--output", str(out), "--encoding", "fp16")
    assert_one_line_error(code, err, "convert", f"its claim {path} cannot be read (a directory, not a claim file)")
    code, _, err = cli_in_process("convert", label_set, "--output", str(out), "--encoding", "fp16", "--take-over")
    assert code == 0, err[-3000:]
    assert open_label_set(str(out)).manifest.encoding == {"name": "fp16"} and not path.exists()
    gen, holder = claim(str(out)).current()
    assert gen == 4 and holder.released


def test_a_file_in_place_of_the_claims_folder_is_refused_in_one_line(tiny_teacher, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_claim").write_text("not a folder")
    code, _, err = cli_in_process("label", "--teacher", tiny_teacher, "--corpus", "pydoc", "--output", str(out))
    assert_one_line_error(code, err, "label", f"cannot create claim {out}/_claim/gen-000000.json",
                          "a file stands where the claims folder _claim/ must be")
