"""Installing only the trainer extra gives a working trainer without Ray or datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_trainer_extra_installs_without_ray(tmp_path):
    """pip's resolution of ``softlabels[trainer]`` (a dry run: nothing is installed) holds neither.

    That the trainer's modules import without them is tested in test_trainer (sys.modules).
    """
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report),
         "-c", str(REPO / "requirements" / "constraints-ci.txt"), f"{REPO}[trainer]"],
        check=True, capture_output=True, timeout=900,
    )
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert {"softlabels", "torch", "transformers", "safetensors", "pyarrow"} <= names, sorted(names)
    assert not names & {"ray", "datasets"}, sorted(names & {"ray", "datasets"})
    # The same check can fail: the report's own metadata for softlabels names Ray, under the labeler extra only.
    own = next(i for i in json.loads(report.read_text())["install"] if i["metadata"]["name"] == "softlabels")
    ray_reqs = [r for r in own["metadata"]["requires_dist"] if r.split(";")[0].strip().lower().startswith("ray")]
    assert ray_reqs and all('extra == "labeler"' in r for r in ray_reqs), own["metadata"]["requires_dist"]


def test_every_command_has_help():
    for args in (["labeler", "--help"], ["labeler", "run", "--help"], ["labeler", "inspect", "--help"],
                 ["trainer", "--help"], ["trainer", "run", "--help"], ["trainer", "eval", "--help"],
                 ["trainer", "export", "--help"], ["trainer", "compare", "--help"]):
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (args, proc.stderr[-500:])
    run_help = subprocess.run([sys.executable, "-m", "labeler", "run", "--help"], capture_output=True, text=True).stdout
    for flag in ("--teacher", "--corpus", "--output", "--top-k", "--max-length", "--limit", "--storage-option", "--ray-address"):
        assert flag in run_help
