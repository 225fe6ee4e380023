"""Installing only the trainer extra gives a working trainer without Ray or datasets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_trainer_extra_installs_without_ray(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "-c", str(REPO / "requirements" / "constraints-ci.txt"),
         f"{REPO}[trainer]"],
        check=True, capture_output=True, timeout=900,
    )
    ok = subprocess.run([str(py), "-c", "import trainer, schemas, trainer.loop, trainer.data"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for forbidden in ("ray", "datasets"):
        r = subprocess.run([str(py), "-c", f"import {forbidden}"], capture_output=True, text=True)
        assert r.returncode != 0 and "No module named" in r.stderr, forbidden


def test_every_command_has_help():
    for args in (["labeler", "--help"], ["labeler", "run", "--help"], ["labeler", "inspect", "--help"],
                 ["trainer", "--help"], ["trainer", "run", "--help"], ["trainer", "eval", "--help"]):
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (args, proc.stderr[-500:])
    run_help = subprocess.run([sys.executable, "-m", "labeler", "run", "--help"], capture_output=True, text=True).stdout
    for flag in ("--teacher", "--corpus", "--output", "--top-k", "--max-length", "--limit", "--storage-option", "--ray-address"):
        assert flag in run_help
