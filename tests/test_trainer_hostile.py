"""Hostile input to the trainer (issue 29): each case ends in one line, or is scored on the right samples.

Cheap on purpose: one tiny student trained for 1 step (held-out fraction 0.2) serves every case that
needs a trained student; refusals run in this process and stop before training.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import assert_one_line_error, bpe_tokenizer as _bpe, cli_in_process

from softlabels.schemas import open_label_set
from softlabels.schemas.errors import UserError
from softlabels.trainer.crosstok import attach
from softlabels.trainer.data import LabelDataset, in_eval_split
from softlabels.trainer.evaluate import evaluate
from softlabels.trainer.student import build_student

FAST = ("--steps", "1", "--batch-size", "2", "--eval-batches", "1", "--warmup-steps", "0")
TRAINED_FRACTION = 0.2  # the fixture student's held-out share (not the 0.05 default)


@pytest.fixture(scope="module")
def student(label_set, tmp_path_factory) -> Path:
    """A tiny student trained 1 step with --eval-fraction 0.2 (its softlabels_train.json records it)."""
    out = tmp_path_factory.mktemp("hostile") / "student"
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *FAST,
                                  "--eval-fraction", str(TRAINED_FRACTION))
    assert code == 0, err[-3000:]
    return out


@contextmanager
def _deadline(seconds: int):
    """Fail (instead of hanging) if the body runs longer than ``seconds``: the case it guards used to loop forever."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- (6) a file in the way of --report-to tensorboard; --init-from without safetensors --------------


def test_report_to_tensorboard_with_a_file_in_the_way_is_one_line_before_training(label_set, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tensorboard").write_text("not a folder")
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *FAST, "--report-to", "tensorboard")
    assert_one_line_error(code, err, "train", "--report-to tensorboard", str(out / "tensorboard"), "not a directory")
    assert not (out / "metrics.jsonl").exists()  # refused before the first step (and before the first evaluation)
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(blocked), *FAST, "--report-to", "tensorboard")
    assert_one_line_error(code, err, "train", str(blocked))


class _Boom:
    """Unpickling this runs code: it writes ``path``. A pickle-free loader never does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("unpickled",))


def test_init_from_without_safetensors_is_one_line_and_never_unpickled(label_set, student, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(student, pickled)
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Boom(str(marker))}))
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "a"), *FAST,
                                  "--init-from", str(pickled))
    assert_one_line_error(code, err, "train", f"--init-from {pickled}", "model.safetensors", "pytorch_model.bin")
    # as --student (any HF folder): loaded weights_only, which refuses the object, in one line
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "s"), *FAST,
                                  "--student", str(pickled))
    assert_one_line_error(code, err, "train", f"student {pickled}: its weights cannot be read", "accepted:")
    assert not marker.exists()
    garbage = tmp_path / "garbage"
    shutil.copytree(student, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "b"), *FAST,
                                  "--init-from", str(garbage))
    assert_one_line_error(code, err, "train", f"--init-from {garbage}", "model.safetensors")
    # the same damaged folder as --student: one line too, saying what loads
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "c"), *FAST,
                                  "--student", str(garbage))
    assert_one_line_error(code, err, "train", f"student {garbage}: its weights cannot be read", "accepted: model.safetensors")


# -- (7) a student tokenizer rewritten at the same path ------------------------------------------------


def test_resume_refuses_a_student_tokenizer_rewritten_at_the_same_path(label_set, tmp_path):
    tok = tmp_path / "tok"
    _bpe(tok, 20, 60)
    args = ("train", "--labels", label_set, "--output", str(tmp_path / "run"), "--student-tokenizer", str(tok),
            "--batch-size", "2", "--eval-batches", "1", "--warmup-steps", "0", "--checkpoint-every", "1")
    code, _, err = cli_in_process(*args, "--steps", "1")
    assert code == 0, err[-3000:]
    run = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "run.json").read_text())
    before = run["student_tokenizer_fingerprint"]
    _bpe(tok, 60, 100)  # same path, same vocabulary size: the weights would still fit, meaning other tokens
    code, _, err = cli_in_process(*args, "--steps", "2", "--resume")
    last = assert_one_line_error(code, err, "train", "--resume", "tokenizer", before[:19])
    assert last.count("sha256:") == 2
    # a checkpoint written before the fingerprint was recorded still resumes (unchecked for it)
    path = tmp_path / "run" / "checkpoints" / "step-000001" / "run.json"
    del run["student_tokenizer_fingerprint"]
    path.write_text(json.dumps(run))
    code, _, err = cli_in_process(*args, "--steps", "2", "--resume")
    assert code == 0, err[-3000:]


def test_init_from_refuses_a_student_whose_tokenizer_changed_since_it_was_trained(label_set, student, tmp_path):
    record = json.loads((student / "softlabels_train.json").read_text())
    assert record["student_tokenizer_fingerprint"] == record["label_set"]["tokenizer_fingerprint"]
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "same"), *FAST,
                                  "--init-from", str(student))
    assert code == 0, err[-3000:]  # unchanged: it starts from it
    changed = tmp_path / "changed"
    shutil.copytree(student, changed)
    tok = _bpe(tmp_path / "tok", 20, 60)
    for name in os.listdir(tok):
        shutil.copy(Path(tok) / name, changed / name)
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "out"), *FAST,
                                  "--init-from", str(changed))
    last = assert_one_line_error(code, err, "train", f"--init-from {changed}", "tokenizer",
                                 record["student_tokenizer_fingerprint"][:19])
    assert last.count("sha256:") == 2


# -- (8) spans that give no text to align ------------------------------------------------------------


def _zero_spans(src: str, dst: Path) -> str:
    """A copy of the label set at ``src`` whose every span is 0 (no text), shards and manifest consistent."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    from softlabels.schemas.format import read_parquet_bytes, table_to_parquet_bytes

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for shard in m["shards"]:
        path = dst / shard["path"]
        table = read_parquet_bytes(path.read_bytes())
        col = table.column("spans").combine_chunks()
        zeros = pa.ListArray.from_arrays(col.offsets, pa.array(np.zeros(len(col.values), np.uint16)))
        data = table_to_parquet_bytes(table.set_column(table.column_names.index("spans"), "spans", zeros))
        path.write_bytes(data)
        shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    m["totals"]["bytes"] = sum(s["bytes"] for s in m["shards"])
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return str(dst)


def test_spans_with_no_text_are_one_line_across_tokenizers_not_an_endless_loop(label_set, tmp_path):
    empty = _zero_spans(label_set, tmp_path / "no-text")
    assert not any(s.spans.any() for s in open_label_set(empty).iter_samples())
    tok = _bpe(tmp_path / "tok", 20, 60)
    with _deadline(120):
        code, _, err = cli_in_process("train", "--labels", empty, "--output", str(tmp_path / "out"), *FAST,
                                      "--student-tokenizer", tok)
    assert_one_line_error(code, err, "train", "train split", "no text", "spans")
    # eval and compare: a model with another tokenizer has nothing to be scored on, and says why
    ls = open_label_set(empty)
    model, tokenizer = build_student("tiny", ls, student_tokenizer=tok)
    ds = LabelDataset(ls, split="eval", shuffle=False)
    attach([ds], ls, tokenizer, tok)
    with _deadline(120), pytest.raises(UserError, match=r"^the eval split of .+ has no text to score: its \d+ sample"):
        evaluate(model, ds, batch_size=2)
    with _deadline(120):
        code, _, err = cli_in_process("eval", "--labels", empty, "--model", "tiny", "--batch-size", "2")
    assert code == 0, err[-2000:]  # the set's own tokenizer needs no text: scored as ever


# -- (11) eval and compare score a student on the split it was trained with ------------------------


def _held_out(label_set: str, fraction: float) -> list[str]:
    return sorted(s.sample_id for s in open_label_set(label_set).iter_samples() if in_eval_split(s.sample_id, fraction))


def test_eval_scores_a_student_on_the_split_it_was_trained_with(label_set, student, tmp_path):
    want = _held_out(label_set, TRAINED_FRACTION)
    assert len(want) != len(_held_out(label_set, 0.05))
    code, out, err = cli_in_process("eval", "--labels", label_set, "--model", str(student), "--batch-size", "4")
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["eval_fraction"] == TRAINED_FRACTION and result["sequences"] == len(want)
    # a smaller share is a subset of the held-out samples: allowed
    code, out, err = cli_in_process("eval", "--labels", label_set, "--model", str(student), "--eval-fraction", "0.1")
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["sequences"] == len(_held_out(label_set, 0.1))
    # a larger one holds samples it trained on: refused, in eval and in compare (before any model is measured)
    code, _, err = cli_in_process("eval", "--labels", label_set, "--model", str(student), "--eval-fraction", "0.3")
    assert_one_line_error(code, err, "eval", "--eval-fraction 0.3", str(student), "0.2", "trained on")
    code, _, err = cli_in_process("compare", "--labels", label_set, "--models", str(student), "--eval-fraction", "0.3",
                                  "--no-plot")
    assert_one_line_error(code, err, "compare", "--eval-fraction 0.3", str(student), "0.2", "trained on")
    # a record that is not one: which samples it trained on is unknown, so nothing is scored
    broken = tmp_path / "broken"
    shutil.copytree(student, broken)
    (broken / "softlabels_train.json").write_text("{not json")
    code, out, err = cli_in_process("eval", "--labels", label_set, "--model", str(broken))
    assert_one_line_error(code, err, "eval", "softlabels_train.json: not a training record", "unknown")
    assert not out.strip()
    # a model without a training record keeps the default
    code, out, err = cli_in_process("eval", "--labels", label_set, "--model", "tiny", "--batch-size", "4")
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["eval_fraction"] == 0.05 and result["sequences"] == len(_held_out(label_set, 0.05))


def test_compare_scores_every_model_on_samples_none_of_them_trained_on(label_set, student, tmp_path, monkeypatch):
    from softlabels.trainer.student import held_out_fraction

    other = tmp_path / "other"
    shutil.copytree(student, other)
    record = json.loads((other / "softlabels_train.json").read_text())
    record["config"]["eval_fraction"] = 0.1
    (other / "softlabels_train.json").write_text(json.dumps(record))
    assert held_out_fraction(["tiny"], None) == 0.05
    assert held_out_fraction(["tiny", str(student)], None) == TRAINED_FRACTION
    assert held_out_fraction(["tiny", str(student), str(other)], None) == 0.1  # held out from both
    assert held_out_fraction([str(student)], 0.1) == 0.1
    # a record speaks for sets of the tokenizer it trained under (their sample ids may be its samples), not others
    trained_under = record["label_set"]["tokenizer_fingerprint"]
    assert held_out_fraction([str(other)], None, tokenizer_fingerprint=trained_under) == 0.1
    assert held_out_fraction([str(other)], 0.5, tokenizer_fingerprint="sha256:" + "0" * 64) == 0.5
    with pytest.raises(UserError, match="would score .*other partly on samples it trained on"):
        held_out_fraction([str(other)], 0.5, tokenizer_fingerprint=trained_under)
    # trained on everything: no held-out split of its sets; --split all scores a set it never saw
    record["config"]["eval_fraction"] = 0.0
    (other / "softlabels_train.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="trained on every sample .*--split all scores every sample"):
        held_out_fraction([str(other)], None)
    assert held_out_fraction([str(other)], None, split="all") == 0.0
    record["config"]["eval_fraction"] = 0.1
    (other / "softlabels_train.json").write_text(json.dumps(record))
    import softlabels.trainer.compare as compare

    seen = []
    monkeypatch.setattr(compare, "_measure_in_child", lambda spec, opts: seen.append(opts["eval_fraction"]) or {
        "cpu_tokens_per_s": 1.0, "ce": 1.0})
    rows = compare.compare(label_set, [str(student), str(other)], rounds=1)
    assert seen == [0.1, 0.1] and [r["eval_fraction"] for r in rows] == [0.1, 0.1]


def test_to_hf_dataset_offers_the_trainers_split(label_set, student):
    pytest.importorskip("datasets")
    import softlabels
    from softlabels.trainer.student import trained_eval_fraction

    fraction = trained_eval_fraction(str(student))
    assert fraction == TRAINED_FRACTION and trained_eval_fraction("tiny") is None
    trainer_eval = _held_out(label_set, fraction)  # the trainer's rule (trainer.data.in_eval_split)
    ev = softlabels.to_hf_dataset(label_set, split="eval", eval_fraction=fraction)
    tr = softlabels.to_hf_dataset(label_set, split="train", eval_fraction=fraction)
    everything = softlabels.to_hf_dataset(label_set)
    assert sorted(ev["sample_id"]) == trainer_eval
    assert len(tr) + len(ev) == len(everything) and not set(tr["sample_id"]) & set(ev["sample_id"])
    streamed = softlabels.to_hf_dataset(label_set, split="eval", eval_fraction=fraction, streaming=True)
    assert sorted(r["sample_id"] for r in streamed) == trainer_eval
    with pytest.raises(UserError, match="split must be one of all, train, eval"):
        softlabels.to_hf_dataset(label_set, split="test")


# -- (12) a student tokenizer that needs its own code ------------------------------------------------


def test_student_tokenizer_with_code_says_what_works(label_set, tmp_path):
    tok = Path(_bpe(tmp_path / "tok", 20, 60))
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="MineTokenizer", auto_map={"AutoTokenizer": ["tokenization_mine.MineTokenizer", None]})
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tok / "tokenization_mine.py").write_text("raise SystemExit('this code must never run')\n")
    for extra in ((), ("--trust-remote-code",)):
        code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "out"), *FAST,
                                      "--student-tokenizer", str(tok), *extra)
        last = assert_one_line_error(code, err, "train", f"--student-tokenizer {tok}", "never runs")
        assert "Pass --trust-remote-code" not in last
    # what it says works: the tokenizer.json saved as a tokenizer that needs no code trains
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(tok / "tokenizer.json")).save_pretrained(tmp_path / "plain")
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "out"), *FAST,
                                  "--student-tokenizer", str(tmp_path / "plain"))
    assert code == 0, err[-3000:]
