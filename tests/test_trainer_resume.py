"""Trainer: exact data resume, shuffle window, k' truncation, corrupt shards, --resume, DDP, HF Trainer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from softlabels.schemas.errors import ShardChecksumError
from softlabels.trainer.data import LabelDataset, StatefulLoader, truncate_topk

from conftest import assert_one_line_error, cli_in_process, run_cli



def keys(batches) -> list[int]:
    return [int(k) for b in batches for k in b["sample_key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_at_the_exact_sample(label_set, workers):
    def loader(state=None):
        ds = LabelDataset(label_set, split="train", eval_fraction=0.1, seed=5, epochs=2, shuffle_window=2)
        ld = StatefulLoader(ds, batch_size=3, num_workers=workers)
        if state is not None:
            ld.load_state_dict(state)
        return ld

    full = keys(loader())
    first = loader()
    head = [next(first) for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a checkpoint
    rest = list(loader(state))
    assert keys(head) + keys(rest) == full
    # two epochs of the training split, every sample twice
    assert len(full) == 2 * len(set(full))


def test_shuffle_window_mixes_shards_but_keeps_every_sample(label_set):
    plain = LabelDataset(label_set, split="all", shuffle=False)
    mixed = LabelDataset(label_set, split="all", seed=1, shuffle_window=3)
    a = [int(s["sample_key"]) for s in plain]
    b = [int(s["sample_key"]) for s in mixed]
    assert sorted(a) == sorted(b) and a != b
    c = [int(s["sample_key"]) for s in LabelDataset(label_set, split="all", seed=1, shuffle_window=3)]
    assert b == c  # seeded


def test_truncation_folds_dropped_entries_into_the_tail_exactly(label_set):
    full = next(iter(LabelDataset(label_set, split="all", shuffle=False)))
    cut = next(iter(LabelDataset(label_set, split="all", shuffle=False, top_k=3)))
    assert cut["topk_ids"].shape[-1] == 3
    torch.testing.assert_close(cut["topk_logprobs"], full["topk_logprobs"][:, :3])
    want = torch.logsumexp(torch.cat([full["topk_logprobs"][:, 3:], full["tail_logprob"][:, None]], -1).double(), -1)
    torch.testing.assert_close(cut["tail_logprob"].double(), want, atol=1e-6, rtol=0)
    total = torch.logsumexp(torch.cat([cut["topk_logprobs"], cut["tail_logprob"][:, None]], -1).double(), -1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=3e-3, rtol=0)  # fp16 storage
    lp, tail = truncate_topk(np.log(np.array([[0.5, 0.3, 0.2]])), np.array([-np.inf]), 1)
    assert tail[0] == pytest.approx(np.log(0.5), abs=1e-7)


def test_corrupt_shard_is_named_or_skipped_and_counted(label_set, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(label_set, bad)
    shard = json.loads((bad / "manifest.json").read_text())["shards"][1]["path"]
    data = bytearray((bad / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / shard).write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match=shard.split("/")[-1]):
        list(LabelDataset(str(bad), split="all", shuffle=False))
    ds = LabelDataset(str(bad), split="all", shuffle=False, skip_corrupt=True, prefetch=0)
    n = sum(1 for _ in ds)
    assert ds.corrupt_skipped == 1
    good = LabelDataset(label_set, split="all", shuffle=False)
    rows = json.loads((bad / "manifest.json").read_text())["shards"][1]["rows"]
    assert n == good.manifest.totals.sequences - rows


def train_args(labels, out, *extra):
    return ["train", "--labels", labels, "--output", str(out), "--steps", "6", "--batch-size", "3", "--lr", "3e-3",
            "--warmup-steps", "2", "--eval-fraction", "0.1", "--eval-batches", "2", "--eval-every", "3",
            "--checkpoint-every", "3", "--num-workers", "2", "--json", *extra]


def curve(d) -> list[dict]:
    """metrics.jsonl rows without wall-clock fields."""
    rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def same_weights(a, b) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def train_in_process(*args: str) -> dict:
    """``softlabels train`` in this process (a resume needs no process of its own: only a killed run does)."""
    code, out, err = cli_in_process(*args)
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def uninterrupted(label_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer-ref") / "a"
    code, _, err = cli_in_process(*train_args(label_set, out))  # the killed runs beside it are processes of their own
    assert code == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_sigkilled_mid_run_then_resumed_continues_the_curve_exactly(label_set, uninterrupted, tmp_path):
    b = tmp_path / "b"
    # SIGKILL right after step 5: the step-3 checkpoint is the last one
    killed = run_cli(*train_args(label_set, b), check=False, env={"SOFTLABELS_CRASH_AT": "trainer.step@5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (b / "checkpoints" / "latest").read_text() == "step-000003"
    assert max(r["step"] for r in curve(b)) == 5  # the killed run got past its checkpoint
    code, _, err = cli_in_process(*train_args(label_set, b))
    assert_one_line_error(code, err, "train", "pass --resume")
    summary = train_in_process(*train_args(label_set, b, "--resume"))
    assert summary["resumed_from"] == 3
    assert curve(b) == curve(uninterrupted)
    assert same_weights(b, uninterrupted)
    png = tmp_path / "curves.png"
    assert cli_in_process("plot", str(b / "metrics.jsonl"), "--output", str(png))[0] == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["publish:model.safetensors@2", "trainer.checkpoint-written@2"])
def test_interrupted_checkpoint_write_leaves_the_previous_one_in_force(point, label_set, uninterrupted, tmp_path):
    """Killed while writing the step-6 checkpoint (mid-file, or with every file written but not committed)."""
    from safetensors.torch import load_file

    from softlabels.trainer.checkpoint import CheckpointStore
    from softlabels.trainer.student import build_student

    c = tmp_path / "c"
    killed = run_cli(*train_args(label_set, c), check=False, env={"SOFTLABELS_CRASH_AT": point})
    assert killed.returncode == -9 and f"crash point {point}" in killed.stderr
    partial = list((c / "checkpoints").rglob(".model.safetensors.tmp-*"))
    assert bool(partial) == point.startswith("publish:")  # the weights half-published: under a temporary name only
    store = CheckpointStore(str(c / "checkpoints"))  # (opening the store sweeps such leftovers)
    assert store.latest() == "step-000003"
    model, _ = build_student("tiny", LabelDataset(label_set).labels)
    _, progress, state = store.load("step-000003", model, rank=0)  # still whole and loadable
    assert progress["step"] == 3 and state is not None
    kept = load_file(c / "checkpoints" / "step-000003" / "model.safetensors")
    ref = load_file(uninterrupted / "checkpoints" / "step-000003" / "model.safetensors")
    assert kept.keys() == ref.keys() and all(torch.equal(kept[k], ref[k]) for k in ref)
    if point.startswith("publish:"):  # (the resume itself is shown exact above; once here, with a partial file)
        summary = train_in_process(*train_args(label_set, c, "--resume"))
        assert summary["resumed_from"] == 3
        assert curve(c) == curve(uninterrupted) and same_weights(c, uninterrupted)
        assert not [p for p in (c / "checkpoints").rglob(".*tmp-*")], "the partial write was not swept"


def test_checkpoints_load_with_torch_weights_only(uninterrupted):
    """Every .pt we write loads with weights_only=True (no arbitrary unpickling on resume)."""
    pts = sorted((uninterrupted / "checkpoints").rglob("*.pt"))
    assert pts
    for p in pts:
        torch.load(p, map_location="cpu", weights_only=True)


def test_a_checkpoint_with_pickled_code_is_refused(label_set, uninterrupted, tmp_path):
    d = tmp_path / "evil"
    shutil.copytree(uninterrupted, d)
    torch.save({"step": 3, "payload": Exploit(tmp_path / "pwned")}, d / "checkpoints" / "step-000006" / "state-rank0.pt")
    code, _, err = cli_in_process(*train_args(label_set, d, "--resume", "--steps", "8"))
    assert_one_line_error(code, err, "train", "state-rank0.pt", "refused to unpickle")
    assert not (tmp_path / "pwned").exists()


def test_resume_with_other_settings_is_refused_naming_each(label_set, uninterrupted, tmp_path):
    """The checkpoint records the label set and the settings a resume must keep; --allow-changed lets lr move."""
    from softlabels.convert import convert

    d = tmp_path / "run"
    shutil.copytree(uninterrupted, d)
    other = str(tmp_path / "fp16")
    convert(label_set, other, "fp16")  # the same labels, another label set (its manifest differs)
    (tmp_path / "wide.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "num_key_value_heads": 1}))
    cases = [
        (["--loss", "ce"], ["loss: checkpoint 'tail-kl', now 'ce'"]),
        (["--lr", "5e-3"], ["lr: checkpoint 0.003, now 0.005", "--allow-changed lr accepts the change"]),
        (["--student", str(tmp_path / "wide.json")], ["student: checkpoint 'tiny', now"]),
        (["--batch-size", "2", "--seed", "1"], ["batch_size: checkpoint 3, now 2", "seed: checkpoint 0, now 1"]),
    ]
    for extra, fragments in cases:
        code, _, err = cli_in_process(*train_args(label_set, d, "--resume", "--steps", "8"), *extra)
        assert_one_line_error(code, err, "train", *fragments)
    args = train_args(other, d, "--resume", "--steps", "8")
    code, _, err = cli_in_process(*args)
    assert_one_line_error(code, err, "train", "labels: checkpoint")
    code, out, err = cli_in_process(*train_args(label_set, d, "--resume", "--steps", "7"), "--lr", "5e-3",
                                    "--allow-changed", "lr")
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["resumed_from"] == 6


def test_a_diverging_run_stops_and_saves_no_nan_weights(label_set, tmp_path):
    out = tmp_path / "diverged"
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), "--steps", "6", "--lr", "1e30",
                                  "--clip", "inf", "--warmup-steps", "0", "--batch-size", "2", "--eval-batches", "1")
    assert_one_line_error(code, err, "train", "the loss is", "no weights saved")
    assert not (out / "model.safetensors").exists()


class Exploit:
    """Unpickling this runs a shell command: what a tampered checkpoint could carry."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


@pytest.mark.slow
def test_checkpoints_on_s3_and_resume_from_them(label_set, s3_server, tmp_path):
    from softlabels.schemas import resolve_url

    ckpt = f"{s3_server}/ckpt-{tmp_path.name}"
    args = ["train", "--labels", label_set, "--output", str(tmp_path / "s"), "--batch-size", "2", "--eval-batches", "1",
            "--eval-fraction", "0.1", "--checkpoint-every", "1", "--checkpoint-dir", ckpt, "--json"]
    train_in_process(*args, "--steps", "2")
    fs, root = resolve_url(ckpt)
    fs.invalidate_cache()
    assert fs.cat_file(f"{root}/latest") == b"step-000002"
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/step-000002")} == {
        "model.safetensors", "optimizer.pt", "state-rank0.pt", "run.json", "progress.json"}
    summary = train_in_process(*args, "--steps", "3", "--resume")
    assert summary["resumed_from"] == 2 and summary["steps"] == 3
