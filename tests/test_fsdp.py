"""FSDP2 students on CPU (gloo): sharded checkpoints, a kill and an exact resume, weights equal to DDP's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow  # processes of their own (see tests/conftest.py)


def torchrun(labels, out, *extra, port, env=None, check=True):
    import os

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "softlabels", "train", "--labels", labels, "--output", str(out), "--steps", "4", "--batch-size", "2",
           "--eval-fraction", "0.1", "--eval-batches", "2", "--lr", "3e-3", "--warmup-steps", "1", "--json", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_fsdp_killed_and_resumed_ends_where_ddp_does(label_set, tmp_path):
    from safetensors.torch import load_file

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun(label_set, ddp, port=29541)
    # FSDP: checkpoint at step 2, killed after step 3, resumed to 4
    killed = torchrun(label_set, fsdp, "--fsdp", "--checkpoint-every", "2", port=29542, check=False,
                      env={"SOFTLABELS_CRASH_AT": "trainer.step@3"})
    assert killed.returncode != 0
    step2 = fsdp / "checkpoints" / "step-000002"
    assert (fsdp / "checkpoints" / "latest").read_text() == "step-000002"
    assert (step2 / "sharded" / ".metadata").is_file() and not (step2 / "model.safetensors").exists()
    assert len(list((step2 / "sharded").glob("*.distcp"))) == 2  # one share per rank
    torchrun(label_set, fsdp, "--fsdp", "--checkpoint-every", "2", "--resume", port=29543)
    a, b = load_file(ddp / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst  # the same training, up to the order gradients are summed in
    assert max(float((a[k] - torch.zeros_like(a[k])).abs().max()) for k in a) > 0
    rows = [[json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (ddp, fsdp)]
    loss = [{r["step"]: r["loss"] for r in rs if "loss" in r} for rs in rows]
    assert loss[0].keys() == loss[1].keys() == {1, 2, 3, 4}
    assert all(abs(loss[0][s] - loss[1][s]) < 1e-5 for s in loss[0])
    ev = [[r["eval"]["kl"] for r in rs if "eval" in r] for rs in rows]
    assert len(ev[0]) == len(ev[1]) == 2 and all(abs(x - y) < 1e-5 for x, y in zip(*ev))
