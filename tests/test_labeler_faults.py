"""Crashes and scale-out: SIGKILL the driver or a teacher replica mid-run, and two Ray nodes.

The killed runs use the real built-in teacher on the real S3 server; every
resumed or multi-node output is compared byte for byte with an uninterrupted
run of the same command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from schemas import open_label_set, resolve_url

from conftest import REPO, run_cli

# ~6,000 tokens in ~24 units: slow enough on a CPU to kill mid-run, quick enough to run 3 times.
ARGS = ["--teacher", "smollm2-135m", "--corpus", "pydoc", "--top-k", "16", "--max-length", "64", "--limit", "96",
        "--shard-tokens", "256", "--batch-tokens", "256", "--threads", "1"]


def set_bytes(url: str) -> dict[str, bytes]:
    """Every object of a label set except the manifest's creation time, by relative path."""
    fs, root = resolve_url(url)
    fs.invalidate_cache()
    out = {}
    for f in sorted(fs.find(root)):
        rel = f[len(root) + 1 :]
        data = fs.cat_file(f)
        if rel == "manifest.json":
            d = json.loads(data)
            d.pop("created_at")
            data = json.dumps(d, sort_keys=True).encode()
        out[rel] = data
    return out


def markers(url: str) -> dict[str, str]:
    """Commit marker name -> last-modified time, as the store reports it."""
    fs, root = resolve_url(url)
    fs.invalidate_cache()
    if not fs.exists(f"{root}/_commits"):
        return {}
    return {i["name"].rsplit("/", 1)[-1]: str(i.get("LastModified") or i.get("mtime")) for i in fs.ls(f"{root}/_commits", detail=True)}


def start(url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "labeler", "run", *ARGS, "--output", url, "--json"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_commits(url: str, proc: subprocess.Popen, at_least: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(markers(url)) < at_least:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no commits appeared in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(builtin_teacher, s3_server) -> dict[str, bytes]:
    """An uninterrupted run of the same command."""
    url = f"{s3_server}/ref-{uuid.uuid4().hex[:8]}"
    summary = json.loads(run_cli("labeler", "run", *ARGS, "--output", url, "--json").stdout.strip().splitlines()[-1])
    assert summary["shards"] >= 12, summary
    return set_bytes(url)


def test_sigkill_driver_then_resume_is_byte_identical(reference, s3_server):
    url = f"{s3_server}/killed-{uuid.uuid4().hex[:8]}"
    proc = start(url)
    wait_for_commits(url, proc, at_least=3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # let anything the dead driver left behind finish or die
    before = markers(url)
    n_units = sum(1 for k in reference if k.startswith("shards/"))
    assert 3 <= len(before) < n_units, f"killed too late to test a resume ({len(before)}/{n_units})"
    assert not open_label_set_exists(url)

    summary = json.loads(run_cli("labeler", "run", *ARGS, "--output", url, "--json").stdout.strip().splitlines()[-1])
    # Exactly the committed units were skipped, and every other unit was labeled once.
    assert summary["resumed_units"] == len(before)
    m = open_label_set(url).manifest
    assert summary["labeled_tokens"] == sum(s.tokens for s in m.shards if s.path.split("/")[-1][:-8] + ".json" not in before)
    after = markers(url)
    assert {k: after[k] for k in before} == before, "a committed unit was rewritten by the resume"
    assert set_bytes(url) == reference


def test_sigkill_one_teacher_replica_mid_run(reference, s3_server):
    """Ray restarts the replica and retries its unit; the output is still exact."""
    url = f"{s3_server}/actor-{uuid.uuid4().hex[:8]}"
    proc = start(url)
    wait_for_commits(url, proc, at_least=2)
    pids = teacher_pids()
    assert pids, "no teacher replica process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["resumed_units"] == 0
    assert set(teacher_pids()).isdisjoint(pids)
    assert set_bytes(url) == reference


def teacher_pids() -> list[int]:
    """PIDs of Ray worker processes hosting a teacher replica (Ray titles them ray::TeacherActor)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if cmd.startswith(b"ray::TeacherActor"):
                found.append(int(entry))
    return found


def open_label_set_exists(url: str) -> bool:
    fs, root = resolve_url(url)
    fs.invalidate_cache()
    return fs.exists(f"{root}/manifest.json")


def test_two_node_cluster_spreads_work_and_matches_one_node(tiny_teacher, tmp_path):
    """ray.cluster_utils.Cluster: two raylets; one replica per node; same bytes as one node."""
    from ray.cluster_utils import Cluster

    args = ["--teacher", tiny_teacher, "--corpus", "pydoc", "--top-k", "8", "--max-length", "64", "--limit", "48",
            "--shard-tokens", "300", "--batch-tokens", "256", "--threads", "1", "--json"]
    one = str(tmp_path / "one-node")
    run_cli("labeler", "run", *args, "--output", one)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        two = str(tmp_path / "two-nodes")
        proc = run_cli("labeler", "run", *args, "--output", two, "--ray-address", cluster.address)
    finally:
        cluster.shutdown()
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["replicas"] == 2
    assert len(summary["units_per_node"]) == 2 and min(summary["units_per_node"].values()) > 0, summary
    assert set_bytes(two) == set_bytes(one)
