"""Crashes, outages and scale-out: the driver or a replica SIGKILLed, S3 down mid-run, two Ray nodes.

Kills happen at named crash points (:mod:`schemas.crash`: a real SIGKILL at
an exact place) and at an arbitrary moment from outside, on local disk and
on the real S3 server. Every resumed, ridden-out or multi-node output is
compared byte for byte with an uninterrupted run of the same command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict

import pytest

from softlabels.schemas import open_label_set, resolve_url

from conftest import REPO

pytestmark = pytest.mark.slow  # processes of their own (see tests/conftest.py)

# ~7,000 tokens in ~28 units with the tiny teacher: a run takes seconds, so every fault is affordable.
def args(teacher: str) -> list[str]:
    return ["--teacher", teacher, "--corpus", "pydoc", "--top-k", "8", "--max-length", "64", "--limit", "120",
            "--shard-tokens", "256", "--batch-tokens", "256", "--threads", "1"]


def set_bytes(url: str) -> dict[str, bytes]:
    """Every object of a label set except the manifest's creation time (and the run's released claim), by path."""
    fs, root = resolve_url(url)
    fs.invalidate_cache()
    out = {}
    for f in sorted(fs.find(root)):
        rel = f[len(root) + 1 :]
        if rel.startswith("_claim/"):  # who wrote it, when: not part of the label set
            continue
        data = fs.cat_file(f)
        if rel == "manifest.json":
            d = json.loads(data)
            d.pop("created_at")
            data = json.dumps(d, sort_keys=True).encode()
        out[rel] = data
    return out


def markers(url: str) -> dict[str, str]:
    """Committed units (by their own marker, or held by a commit index) -> their shard's last-modified time."""
    fs, root = resolve_url(url)
    fs.invalidate_cache()
    if not fs.exists(f"{root}/_commits"):
        return {}
    units = {p.rsplit("/", 1)[-1][: -len(".json")] for p in fs.ls(f"{root}/_commits", detail=False)
             if p.endswith(".json") and p.rsplit("/", 1)[-1].startswith("part-")}
    if fs.exists(f"{root}/_commits/index"):
        for path in fs.ls(f"{root}/_commits/index", detail=False):
            if path.endswith(".json") and not path.rsplit("/", 1)[-1].startswith("."):
                units |= {c["name"] for c in json.loads(fs.cat_file(path))["commits"]}
    shards = {i["name"].rsplit("/", 1)[-1][: -len(".parquet")]: str(i.get("LastModified") or i.get("mtime"))
              for i in fs.ls(f"{root}/shards", detail=True)}
    return {u: shards[u] for u in units}


def ray_address() -> str:
    """The address of the tests' Ray (``ray_local``): the labelers run here join it, as drivers of their own, and
    the kills, signals and outages hit them as they would a job on a cluster; no Ray starts per run."""
    import ray

    return ray.get_runtime_context().gcs_address


def start(teacher: str, url: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "softlabels", "label", *args(teacher), "--output", url, "--json",
         "--ray-address", ray_address()],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SOFTLABELS_CRASH_AT": "never", **env},
    )


def wait_for_commits(proc: subprocess.Popen, url: str, n: int, before: str) -> None:
    """Until the running labeler ``proc`` has committed ``n`` units (it must not end first)."""
    deadline = time.time() + 300
    while len(markers(url)) < n:
        assert proc.poll() is None, f"the run ended before {before}:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no commits appeared in time"
        time.sleep(0.02)


def released(url: str) -> bool:
    from softlabels.common.claim import OutputClaim

    fs, root = resolve_url(url)
    gen, holder = OutputClaim(fs, root, url, "").current()
    return holder.released


def summary_of(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def processes_with_env(tag: bytes, exact: bool = False) -> list[int]:
    """Live processes with an environment entry equal to (``exact``) or starting with ``tag``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    entries = fh.read().split(b"\0")
                    if (tag in entries) if exact else any(e.startswith(tag) for e in entries):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def processes_of_run(driver_pid: int) -> list[int]:
    """Live processes a labeler driver started (Ray's own and its workers): they inherit its crash env."""
    return processes_with_env(f"SOFTLABELS_DRIVER_PID={driver_pid}".encode(), exact=True)


def settle(proc: subprocess.Popen, timeout: float = 3) -> list[int]:
    """After the driver died: wait for what it started to exit (killing the rest, as a dead node would).

    Returns the processes that outlived the driver by ``timeout`` seconds (for the record).
    """
    proc.wait(timeout=300)
    deadline = time.time() + timeout
    while processes_of_run(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    left = processes_of_run(proc.pid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def label_in_process(teacher: str, url: str) -> dict:
    """The same job as the CLI command, run in this process on the tests' Ray (saves its start-up)."""
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import run

    cfg = LabelConfig(teacher=teacher, corpus="pydoc", output=url, top_k=8, max_length=64, limit=120,
                      shard_tokens=256, batch_tokens=256, threads=1)
    return asdict(run(cfg))


@pytest.fixture(scope="module")
def reference(ray_local, tiny_teacher, tmp_path_factory) -> dict[str, bytes]:
    """An uninterrupted run of the same job (on local disk: the bytes do not depend on the store)."""
    url = str(tmp_path_factory.mktemp("faults") / "reference")
    summary = label_in_process(tiny_teacher, url)
    assert summary["shards"] >= 20, summary
    return set_bytes(url)


def place(storage: str, tmp_path, s3_server: str, name: str) -> str:
    return str(tmp_path / name) if storage == "local" else f"{s3_server}/{name}-{uuid.uuid4().hex[:8]}"


def resume_and_check(teacher: str, url: str, before: dict[str, str], reference: dict[str, bytes]) -> dict:
    """Rerun the same job: exactly the committed units are skipped, no unit is labeled twice, same bytes."""
    assert not manifest_exists(url), "a killed run published a manifest"
    summary = label_in_process(teacher, url)
    assert summary["resumed_units"] == len(before)
    ref_tokens = {s["path"].rsplit("/", 1)[-1][: -len(".parquet")]: s["tokens"]
                  for s in json.loads(reference["manifest.json"])["shards"]}
    assert summary["labeled_tokens"] == sum(t for k, t in ref_tokens.items() if k not in before)
    after = markers(url)
    assert {k: after[k] for k in before} == before, "a committed unit was rewritten by the resume"
    assert set_bytes(url) == reference
    return summary


# Where the driver dies: while planning (teachers still loading), mid-unit (a unit labeled, nothing
# of it written), between a shard and its commit marker, between a commit index and the deletion
# of the markers it holds, and while publishing the manifest.
@pytest.mark.parametrize(
    "point,storage",
    [("labeler.planned@3", "s3"), ("labeler.labeled@4", "local"), ("labeler.shard-written@5", "s3"),
     ("labeler.indexed@2", "s3"), ("publish:manifest.json", "local")],
)
def test_driver_sigkilled_at_a_crash_point_then_resume_is_byte_identical(point, storage, reference, tiny_teacher, tmp_path, s3_server):
    url = place(storage, tmp_path, s3_server, "crash")
    fired = tmp_path / "crashed"
    proc = start(tiny_teacher, url, SOFTLABELS_CRASH_AT=point, SOFTLABELS_CRASH_ONCE=str(fired))
    settle(proc)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert fired.exists(), "the crash point was not reached"
    before = markers(url)
    n_units = sum(1 for k in reference if k.startswith("shards/"))
    if point.startswith("labeler.shard-written"):
        # the fifth shard is written, its marker is not: that unit must be redone, never published
        shards = {k for k in set_bytes(url) if k.startswith("shards/")}
        assert len(shards) > len(before) and len(before) < n_units
    if point.startswith("labeler.indexed"):
        # two indexes written, the second block's markers not yet deleted: they and the index both hold it
        fs, root = resolve_url(url)
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/_commits")}
        assert "part-000004.json" in names and "part-000000.json" not in names, names
        assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/_commits/index")} == {"000000.json", "000001.json"}
    if point.startswith("publish:"):
        assert len(before) == n_units
        assert [k for k in set_bytes(url) if ".manifest.json.tmp-" in k], "no partial manifest to sweep"
    resume_and_check(tiny_teacher, url, before, reference)


def test_sigterm_with_the_builtin_teacher_exits_143_then_resumes(builtin_teacher, ray_local, tmp_path):
    """What Kubernetes sends on preemption, mid-run (units committed, more to go): exit 143, no Ray stack dump,
    Ray's processes gone, the claim released, and the resume skips exactly the committed units. A real teacher keeps
    the driver inside ray.wait, whose C++ loop runs our SIGTERM handler and turns its SystemExit(143) into
    SystemExit(1): the command must still unwind, release, shut Ray down and exit 143. (The same check with the
    tiny teacher, and a byte-identical resume, ran as a test of its own until 2026-12-06; byte-identical resumes
    after a kill at every commit step are the crash-point tests'.)"""
    from softlabels.labeler.config import LabelConfig
    from softlabels.labeler.job import run

    builtin = dict(teacher="smollm2-135m", corpus="pydoc", top_k=8, max_length=64, limit=20, shard_tokens=128)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in builtin.items()]
    url = str(tmp_path / "preempted-builtin")
    proc = subprocess.Popen([sys.executable, "-m", "softlabels", "label", *flags, "--output", url,
                             "--ray-address", ray_address()], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SOFTLABELS_CRASH_AT": "never"})  # settle() finds Ray's processes by it
    seen = []
    for line in proc.stderr:  # the teacher is loaded: labeling starts now
        seen.append(line)
        if "teacher replica(s) on" in line:
            break
    assert proc.poll() is None, "".join(seen)[-3000:]
    wait_for_commits(proc, url, 2, "the signal")  # mid-run, in the dispatch loop, where the driver waits on Ray
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    for sign in ("Aborted", "core dumped", "*** SIGTERM", "Traceback"):
        assert sign not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "softlabels label: stopped by SIGTERM"
    assert settle(proc, timeout=10) == [], "Ray processes outlived the driver"
    assert released(url), "the claim was not released"
    assert not manifest_exists(url)
    before = markers(url)
    summary = run(LabelConfig(output=url, **builtin))  # the same job resumes (on the tests' Ray)
    assert summary.status == "written" and summary.resumed_units == len(before) < summary.shards
    after = markers(url)
    assert {k: after[k] for k in before} == before, "a committed unit was rewritten by the resume"
    ls = open_label_set(url)
    assert sum(len(ls.read_shard(s)) for s in ls.shards) == ls.manifest.totals.sequences == 20


def test_a_teacher_replica_sigkilled_mid_unit_is_restarted_and_its_unit_retried(reference, tiny_teacher, tmp_path):
    url = str(tmp_path / "replica")
    proc = start(tiny_teacher, url, SOFTLABELS_CRASH_AT="labeler.labeled@3", SOFTLABELS_CRASH_SCOPE="process",
                 SOFTLABELS_CRASH_ONCE=str(tmp_path / "crashed-once"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert (tmp_path / "crashed-once").exists() and "crash point labeler.labeled@3" in err
    assert summary_of(out)["resumed_units"] == 0
    assert set_bytes(url) == reference


def test_s3_server_down_for_seconds_mid_run_is_ridden_out(reference, tiny_teacher, seaweed, s3_server):
    url = f"{s3_server}/outage-{uuid.uuid4().hex[:8]}"
    proc = start(tiny_teacher, url)
    wait_for_commits(proc, url, 2, "the outage")
    seaweed.stop()
    time.sleep(3)
    assert proc.poll() is None, "the run ended while the server was down"
    seaweed.start()
    out, err = proc.communicate(timeout=600)  # the run was labeling (and writing) all through the outage
    assert proc.returncode == 0, err[-3000:]
    assert summary_of(out)["resumed_units"] == 0
    assert set_bytes(url) == reference


def manifest_exists(url: str) -> bool:
    fs, root = resolve_url(url)
    fs.invalidate_cache()
    return fs.exists(f"{root}/manifest.json")


def test_local_cluster_rehearsal_two_nodes_via_ray_job_submit_matches_one_node(reference, tiny_teacher, s3_server):
    """deploy/local-cluster.sh: a head and a worker node (own raylets and resources), the job
    submitted with `ray job submit` and the RayJob's entrypoint, to the S3 server; same bytes as one node."""
    url = f"{s3_server}/rehearsal-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(["bash", str(REPO / "deploy" / "local-cluster.sh"), "--workers", "1", "--cpus-per-node", "1",
                           "--", *args(tiny_teacher), "--output", url, "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "rehearsal passed: 2 nodes" in proc.stdout
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith('{"output"')))
    assert summary["replicas"] == 2
    assert len(summary["units_per_node"]) == 2 and min(summary["units_per_node"].values()) > 0, summary
    assert set_bytes(url) == reference
    assert not processes_with_env(b"SOFTLABELS_REHEARSAL="), "the rehearsal left processes running"
