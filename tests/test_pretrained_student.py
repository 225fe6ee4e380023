"""Pretrained students: an HF model directory with the label set's tokenizer trains, resumes and exports;
one whose tokenizer differs is refused with what differs (added tokens and their ids, or moved ids).

Cheap on purpose: an untrained `tiny` saved as a directory, 1-3 step runs in this process.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from softlabels.schemas import open_label_set
from softlabels.trainer.student import build_student, tokenizer_difference

from conftest import assert_one_line_error, cli_in_process

FAST = ("--batch-size", "1", "--eval-batches", "1", "--eval-fraction", "0.1", "--warmup-steps", "1", "--json")
ADDED = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def pretrained(label_set, tmp_path_factory) -> str:
    """A `tiny` student saved as a Hugging Face directory with the label set's own tokenizer."""
    path = tmp_path_factory.mktemp("pretrained") / "student"
    model, tok = build_student("tiny", open_label_set(label_set), seed=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _with_added_tokens(pretrained: str, dest: Path) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(pretrained, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    tok.add_special_tokens({"additional_special_tokens": ADDED})
    tok.save_pretrained(dest)
    return dest


def _train(label_set: str, student: str, out: Path, *flags: str) -> tuple[int, dict | None, str]:
    code, stdout, err = cli_in_process("train", "--labels", label_set, "--student", student, "--output", str(out),
                                       *FAST, *flags)
    return code, json.loads(stdout.strip().splitlines()[-1]) if code == 0 else None, err


@pytest.mark.slow
def test_a_pretrained_student_with_the_sets_tokenizer_trains_resumes_and_exports(label_set, pretrained, tmp_path):
    out = tmp_path / "run"
    code, summary, err = _train(label_set, pretrained, out, "--steps", "2", "--checkpoint-every", "1")
    assert code == 0, err[-3000:]
    assert summary["student"] == pretrained and summary["resumed_from"] == 0
    assert (out / "checkpoints" / "step-000002").is_dir()
    code, summary, err = _train(label_set, pretrained, out, "--steps", "3", "--checkpoint-every", "1", "--resume")
    assert code == 0, err[-3000:]
    assert summary["resumed_from"] == 2 and summary["steps"] == 3
    code, stdout, err = cli_in_process("export", "--model", str(out), "--output", str(tmp_path / "onnx"),
                                       "--quantize", "none", "--json")
    assert code == 0, err[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["scheme"] == "none"
    assert (tmp_path / "onnx" / "model.onnx").is_file()


def test_added_special_tokens_are_named_with_their_ids(label_set, pretrained, tmp_path, caplog):
    labels = open_label_set(label_set)
    vocab = labels.manifest.tokenizer.vocab_size
    assert labels.manifest.id_space == vocab  # the tiny teacher's head has one row per token
    student = str(_with_added_tokens(pretrained, tmp_path / "chat"))
    code, _, err = _train(label_set, student, tmp_path / "refused", "--steps", "1")
    last = assert_one_line_error(
        code, err, "train", "the student's tokenizer adds 2 special tokens the label set's lacks",
        f"'<|im_start|>' (id {vocab}), '<|im_end|>' (id {vocab + 1})", f"id space ({vocab})",
        "safe to train with --allow-vocab-mismatch",
    )
    assert len(last) - len(student) < 300, len(last)
    assert not (tmp_path / "refused" / "checkpoints").exists()
    # The message's claim holds: with the flag it trains (the teacher's ids all mean the same tokens).
    code, summary, err = _train(label_set, student, tmp_path / "allowed", "--steps", "1", "--allow-vocab-mismatch")
    assert code == 0 and summary["steps"] == 1, err[-3000:]
    assert "training anyway" in caplog.text


def test_a_token_with_another_id_is_never_safe(label_set, pretrained, tmp_path):
    student = tmp_path / "swapped"
    shutil.copytree(pretrained, student)
    spec = json.loads((student / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (student / "tokenizer.json").write_text(json.dumps(spec))
    code, _, err = _train(label_set, str(student), tmp_path / "refused", "--steps", "1")
    assert_one_line_error(
        code, err, "train", "2 tokens have a different id on each side",
        f"{a!r} (id 101 in the student's, 100 in the label set's)",
        f"{b!r} (id 100 in the student's, 101 in the label set's)", "never safe",
    )


def test_tokens_added_inside_the_id_space_or_on_the_sets_side_are_not_called_safe(label_set, pretrained, tmp_path):
    from transformers import AutoTokenizer

    manifest = open_label_set(label_set).manifest
    vocab = manifest.tokenizer.vocab_size
    plain = AutoTokenizer.from_pretrained(pretrained)
    chat = AutoTokenizer.from_pretrained(_with_added_tokens(pretrained, tmp_path / "chat"))
    # A padded teacher head (id space past the tokenizer) could have emitted the student's new ids.
    padded = dataclasses.replace(manifest, tokenizer=dataclasses.replace(manifest.tokenizer, id_space=vocab + 8))
    said = tokenizer_difference(chat, plain, padded)
    assert f"id(s) {vocab}, {vocab + 1} lie inside the set's id space ({vocab + 8})" in said
    assert "not safe" in said and "safe to train" not in said
    # The set's tokenizer has tokens the student's lacks: the set may hold those ids.
    said = tokenizer_difference(plain, chat, manifest)
    assert said.startswith(f"the label set's adds 2 special tokens the student's lacks: '<|im_start|>' (id {vocab})")
    assert "the student's tokenizer cannot encode" in said and "safe" not in said
    assert tokenizer_difference(plain, plain, manifest) is None
    roles = AutoTokenizer.from_pretrained(pretrained)
    roles.pad_token = "<unk>"
    assert tokenizer_difference(roles, plain, manifest) == (
        "same ids, other special-token roles (student vs label set: pad_token '<unk>' vs '</s>')")
    # An ordinary added token (not special) is called what it is.
    plain.add_tokens(["xyzzy"])
    assert tokenizer_difference(plain, AutoTokenizer.from_pretrained(pretrained), manifest).startswith(
        f"the student's tokenizer adds 1 added token the label set's lacks: 'xyzzy' (id {vocab}); past the set's")
