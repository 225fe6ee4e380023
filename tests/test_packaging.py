"""Packaging: one namespace (softlabels.*), one command, and extras that bring only what they need."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # processes of their own (see tests/conftest.py)

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


COMMANDS = ("label", "inspect", "convert", "train", "eval", "export", "compare", "plot")


def test_every_command_has_help():
    bin_dir = Path(sys.executable).parent
    version = subprocess.run([bin_dir / "softlabels", "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"softlabels {importlib.metadata.version('softlabels')}"
    top = subprocess.run([sys.executable, "-m", "softlabels", "--help"], capture_output=True, text=True, cwd=REPO)
    assert top.returncode == 0 and all(c in top.stdout for c in COMMANDS), top.stdout
    for command in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", "softlabels", command, "--help"], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: softlabels {command}"), (command, proc.stderr[-500:])
        if command == "label":
            for flag in ("--teacher", "--corpus", "--output", "--top-k", "--max-length", "--limit", "--storage-option",
                         "--ray-address", "--packing", "--no-packing"):
                assert flag in proc.stdout, flag


def test_wheel_installs_only_softlabels_and_works_beside_same_named_modules(tmp_path):
    """A wheel of the repo holds nothing outside ``softlabels/``; installed in a fresh venv, it runs from a
    folder holding a user's own ``schemas.py``, ``trainer.py`` and ``labeler.py``."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("softlabels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"softlabels", f"softlabels-{importlib.metadata.version('softlabels')}.dist-info"}, sorted(top)
    for module in ("softlabels/schemas/format.py", "softlabels/labeler/job.py", "softlabels/trainer/loop.py",
                   "softlabels/common/cli.py", "softlabels/schemas/README.md", "softlabels/cli.py"):
        assert module in names, module
    entry = zipfile.ZipFile(wheel).read(f"softlabels-{importlib.metadata.version('softlabels')}.dist-info/entry_points.txt")
    assert b"softlabels = softlabels.cli:main" in entry

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--quiet", str(wheel)], check=True, capture_output=True, timeout=300)
    # numpy, pyarrow and fsspec from this venv's site-packages, as a plain path: .pth files there
    # (the editable install's finder among them) are not processed, so only the wheel provides softlabels.
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(str(Path(np.__file__).parents[1]) + "\n")
    user = tmp_path / "project"
    user.mkdir()
    for name in ("schemas", "trainer", "labeler"):
        (user / f"{name}.py").write_text("raise ImportError('the user module was imported')\n")
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "softlabels")
    for argv in ([cli, "--version"], [cli, "train", "--help"], [py, "-m", "softlabels", "train", "--help"],
                 [py, "-m", "softlabels", "inspect", "--help"],
                 [py, "-c", "import softlabels.schemas as s, softlabels.trainer.config; print(s.__file__)"]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=user, timeout=120)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        assert "user module" not in proc.stderr
    assert proc.stdout.strip().startswith(str(site)), proc.stdout
