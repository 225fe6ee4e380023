"""No credentials are ever written; weights load without unpickling; remote code stays off.

The S3 server's credentials (tests/conftest.py) are distinctive strings. A
label -> inspect -> train session passes them as storage options (labeler)
and as environment variables (trainer), then every byte it wrote is searched for
them: the label set and checkpoints on S3, the student folder, metrics,
plots, Ray's session logs, and everything the commands printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from softlabels.schemas import resolve_url

from conftest import ACCESS_KEY, SECRET_KEY, assert_one_line_error, cli_in_process, run_cli

pytestmark = pytest.mark.slow  # the S3 server; the credential scan runs its commands as processes of their own

CANARIES = [ACCESS_KEY.encode(), SECRET_KEY.encode()]


def leaks(data: bytes) -> list[str]:
    return [c.decode() for c in CANARIES if c in data]


def test_no_credentials_in_anything_written(tiny_teacher, s3_server, tmp_path):
    """Also the label command as a user types it, the one run that starts a Ray of its own: settings from a
    ``--config`` YAML with a flag overriding one, and a stale ``ray_current_cluster`` in its Ray folder (what a
    killed run leaves; joining that address would hang): it must start afresh."""
    ray_tmp = tempfile.mkdtemp(prefix="rsec", dir="/tmp")  # short: Ray's socket paths live under it
    os.makedirs(os.path.join(ray_tmp, "ray"))
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as fh:
        fh.write("127.0.0.1:1")  # nothing listens on port 1
    try:
        prefix = f"{s3_server}/sec-{uuid.uuid4().hex[:8]}"
        labels, ckpt, student = f"{prefix}/labels", f"{prefix}/ckpt", tmp_path / "student"
        conf = tmp_path / "job.yaml"
        conf.write_text(f"teacher: {tiny_teacher}\noutput: {labels}\ntop-k: 4\nmax_length: 64\nlimit: 12\n"
                        "shard_tokens: 256\n")
        # The labeler gets the credentials only as storage options (none in its environment) ...
        no_env = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        opts = ["--storage-option", f"key={ACCESS_KEY}", "--storage-option", f"secret={SECRET_KEY}"]
        printed = []
        for args in [
            ("label", "--config", str(conf), "--top-k", "5", *opts),
            ("inspect", labels, "--plot", str(tmp_path / "inspect.png"), *opts),
            ("train", "--labels", labels, "--output", str(student), "--steps", "2", "--batch-size", "2",
             "--eval-batches", "1", "--checkpoint-every", "1", "--checkpoint-dir", ckpt, "--plot",
             str(tmp_path / "curves.png")),
        ]:
            # ... the trainer's run reads them from its environment (the usual AWS chain).
            env = {"RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "", **(no_env if "--storage-option" in args else {})}
            proc = run_cli(*args, env=env)
            printed.append(proc.stdout + proc.stderr)

        written: dict[str, bytes] = {}
        fs, root = resolve_url(prefix)
        fs.invalidate_cache()
        for f in fs.find(root):
            written[f"s3://{f}"] = fs.cat_file(f)
        for base in (tmp_path, Path(ray_tmp)):
            for p in base.rglob("*"):
                if p.is_file() and not p.is_symlink() and not p.is_socket():
                    written[str(p)] = p.read_bytes()
        kinds = {"manifest": "manifest.json", "marker": "_commits/", "shard": ".parquet", "run record": "run.json",
                 "checkpoint": "optimizer.pt", "weights": "model.safetensors", "metrics": "metrics.jsonl",
                 "train record": "softlabels_train.json", "plot": ".png", "ray log": "/logs/"}
        missing = [k for k, pat in kinds.items() if not any(pat in name for name in written)]
        assert not missing, f"the scan did not see any {missing}"
        found = {name: leaks(data) for name, data in written.items() if leaks(data)}
        found.update({f"output of command {i}": leaks(t.encode()) for i, t in enumerate(printed) if leaks(t.encode())})
        assert not found, f"credentials written to: {json.dumps(found, indent=1)[:3000]}"
        # the resolved config is logged, with storage option values masked; the flag overrode the file
        assert "'key': '***'" in printed[0] and "'secret': '***'" in printed[0]
        assert "'top_k': 5" in printed[0]
        from softlabels.schemas import open_label_set

        m = open_label_set(labels, {"key": ACCESS_KEY, "secret": SECRET_KEY}).manifest
        assert (m.top_k, m.sequence.max_length, m.totals.sequences) == (5, 64, 12)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_remote_code_is_off_unless_asked(label_set, ray_local, tmp_path):
    """A model folder that needs its own Python code is refused without --trust-remote-code (labeler and trainer)."""
    (tmp_path / "m").mkdir()
    marker = tmp_path / "ran"
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (tmp_path / "m" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for f in Path(label_set, "tokenizer").iterdir():  # the set's own tokenizer: only the model needs code
        shutil.copy(f, tmp_path / "m" / f.name)
    # in this process, on the tests' Ray: the same main a user's command runs, without its start-up
    lab = cli_in_process("label", "--teacher", str(tmp_path / "m"), "--output", str(tmp_path / "o"))
    trn = cli_in_process("eval", "--labels", label_set, "--model", str(tmp_path / "m"))
    for (code, _, err), prog in ((lab, "label"), (trn, "eval")):
        assert_one_line_error(code, err, prog, "Pass --trust-remote-code if you trust it")
    assert not marker.exists(), "the model's own code ran without --trust-remote-code"
    assert not (tmp_path / "o").exists()
    for command in ("label", "train", "eval", "export", "compare"):
        code, out, _ = cli_in_process(command, "--help")
        assert code == 0 and "--trust-remote-code" in re.findall(r"--[a-z-]+", out), command
