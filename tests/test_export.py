"""`softlabels export` (ONNX Runtime int8) and `softlabels compare` on the tiny teacher's label set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli_in_process


@pytest.fixture(scope="module")
def student(label_set, tmp_path_factory) -> str:
    """An untrained `tiny` student (tied embeddings) saved as a Hugging Face directory, with a training record
    as `train` writes one (held-out share 0.2, what the tests below score on)."""
    from softlabels.schemas import open_label_set
    from softlabels.trainer.config import TrainConfig
    from softlabels.trainer.student import TRAIN_RECORD, build_student

    path = tmp_path_factory.mktemp("student")
    model, tok = build_student("tiny", open_label_set(label_set), seed=1)
    assert model.config.tie_word_embeddings
    model.save_pretrained(path)
    tok.save_pretrained(path)
    config = TrainConfig(labels=label_set, output=str(path), student="tiny", eval_fraction=0.2).redacted()
    (path / TRAIN_RECORD).write_text(json.dumps({"config": config}, indent=2) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def exports(student, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for scheme in ("int8", "none"):
        code, stdout, err = cli_in_process("export", "--model", student, "--output",
                                           str(root / scheme), "--quantize", scheme, "--json")
        assert code == 0, err[-2000:]
        assert json.loads(stdout.strip().splitlines()[-1])["scheme"] == scheme
        out[scheme] = str(root / scheme)
    return out


def _probe_logits(model_dir: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids, attention_mask=mask).logits


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (3, 37), generator=g)  # shapes other than the traced ones
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0
    return ids, mask


@pytest.mark.slow
def test_int8_export_is_smaller_ties_the_embedding_and_loads_with_onnxruntime(student, exports, tmp_path):
    import shutil

    import onnx
    import onnxruntime
    from onnx import numpy_helper

    from softlabels.trainer.export import META_FILE, weights_bytes
    from softlabels.trainer.student import TRAIN_RECORD, trained_eval_fraction

    q = Path(exports["int8"])
    meta = json.loads((q / META_FILE).read_text())
    assert meta["tied_embedding"] is True and meta["sha256"]
    assert meta["onnx_bytes"] == (q / "model.onnx").stat().st_size == weights_bytes(q)
    assert meta["source_bytes"] == (Path(student) / "model.safetensors").stat().st_size
    # Every weight matrix is int8 and the vocabulary matrix is stored once: no fp32 [V, H] or [H, V] left.
    graph = onnx.load(str(q / "model.onnx"))
    vocab, hidden = meta["vocab_size"], json.loads((Path(student) / "config.json").read_text())["hidden_size"]
    big = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer if np.prod(t.dims) >= hidden * hidden // 2}
    assert big and all(a.dtype == np.int8 for a in big.values()), {k: a.dtype for k, a in big.items()}
    assert sum(a.shape in ((vocab, hidden), (hidden, vocab)) for a in big.values()) == 1
    int8_elements = sum(a.size for a in big.values())
    assert int8_elements >= 0.95 * meta["parameters"]  # norms and scales are all that stay float
    assert meta["source_bytes"] / meta["onnx_bytes"] > 3.3
    # The documented one call with ONNX Runtime alone, on shapes and padding it was not traced with.
    ids, mask = _batch(vocab)
    sess = onnxruntime.InferenceSession(str(q / "model.onnx"))
    got = torch.from_numpy(sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    want = _probe_logits(student, ids, mask)
    valid = mask.bool()
    rel = float((got - want)[valid].norm() / want[valid].norm())
    assert rel < 0.08, rel
    assert 0.0 < meta["probe"]["max_abs_logit_diff"]
    # The export carries the student's training record, so its held-out share is known wherever the
    # student folder goes: a copy of the export whose recorded source is gone still reads it.
    for scheme in ("int8", "none"):
        assert (Path(exports[scheme]) / TRAIN_RECORD).read_bytes() == (Path(student) / TRAIN_RECORD).read_bytes()
    moved = tmp_path / "moved"
    shutil.copytree(q, moved)
    (moved / META_FILE).write_text(json.dumps({**meta, "source": str(tmp_path / "gone")}))
    assert trained_eval_fraction(str(moved)) == 0.2


@pytest.mark.slow
def test_fp32_export_matches_the_model_and_evaluate_scores_it_the_same(label_set, student, exports):
    from softlabels.schemas import open_label_set
    from softlabels.trainer.data import LabelDataset
    from softlabels.trainer.evaluate import evaluate
    from softlabels.trainer.export import load_exported
    from softlabels.trainer.student import build_student

    onnx_model = load_exported(exports["none"])
    assert onnx_model.meta["tied_embedding"] is False  # fp32: nothing to share
    ids, mask = _batch(onnx_model.meta["vocab_size"])
    want = _probe_logits(student, ids, mask)
    got = onnx_model.logits(ids, mask)
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-4)
    ds = LabelDataset(label_set, split="eval", eval_fraction=0.2, shuffle=False)
    model, _ = build_student(student, open_label_set(label_set))
    direct = evaluate(model, ds)
    for key in ("ce", "kl", "top1"):
        assert evaluate(onnx_model, ds)[key] == pytest.approx(direct[key], rel=1e-4, abs=1e-6), key
    int8 = evaluate(load_exported(exports["int8"]), ds)
    assert int8["ce"] == pytest.approx(direct["ce"], rel=0.02) and int8["positions"] == direct["positions"]


def test_an_untied_model_keeps_its_own_embedding(tiny_teacher, tmp_path):
    from softlabels.trainer.export import export_model

    meta = export_model(tiny_teacher, str(tmp_path / "q"))
    assert meta["tied_embedding"] is False  # the tiny teacher's embedding and head differ
    assert 0 < meta["probe"]["relative_logit_error"] < 0.08, meta["probe"]


@pytest.mark.slow
def test_compare_measures_every_model_and_scores_the_teacher_against_its_own_labels(
    label_set, tiny_teacher, student, exports, tmp_path
):
    from softlabels.schemas import open_label_set
    from softlabels.trainer.data import LabelDataset
    from softlabels.trainer.evaluate import evaluate
    from softlabels.trainer.student import build_student

    png = tmp_path / "cmp.png"
    code, out, err = cli_in_process(
        "compare", "--labels", label_set, "--models", tiny_teacher, student, exports["int8"],
        "--names", "teacher", "student", "student-int8", "--eval-fraction", "0.2", "--prompt-rows", "2",
        "--prompt-length", "32", "--seconds", "0.2", "--threads", "1", "--rounds", "1", "--plot", str(png), "--json",
        "--teacher", tiny_teacher, "--prompts", "2", "--max-new-tokens", "4")
    assert code == 0, err[-3000:]
    rows = {r["name"]: r for r in json.loads(out)}  # --json: stdout is the JSON and nothing else
    assert "student-int8" in err and "CPU tok/s" in err  # the table went to stderr
    assert list(rows) == ["teacher", "student", "student-int8"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The teacher against its own labels: only the encoding's error is left.
    t = rows["teacher"]
    assert t["kl"] < 1e-3 and t["top1"] > 0.99, t
    # Held-out figures are evaluate()'s, computed here directly.
    ds = LabelDataset(label_set, split="eval", eval_fraction=0.2, shuffle=False)
    model, _ = build_student(tiny_teacher, open_label_set(label_set))
    direct = evaluate(model, ds)
    assert t["ce"] == pytest.approx(direct["ce"], rel=1e-5) and t["kl"] == pytest.approx(direct["kl"], rel=1e-4, abs=1e-7)
    assert t["parameters"] == sum(p.numel() for p in model.parameters())
    assert t["disk_bytes"] == (Path(tiny_teacher) / "model.safetensors").stat().st_size
    # With --teacher, the on-policy metric: the teacher grading its own responses is 0 exactly; an ONNX model writes none
    assert t["onpolicy_reverse_kl"] == pytest.approx(0, abs=1e-5) and t["onpolicy_prompts"] == 2
    assert rows["student"]["onpolicy_reverse_kl"] > 0.01 and "onpolicy_reverse_kl" not in rows["student-int8"]
    assert "on-policy KL" in err
    q, s = rows["student-int8"], rows["student"]
    assert q["format"] == "onnx int8" and s["format"] == "torch float32"
    assert q["parameters"] == s["parameters"] and q["disk_bytes"] < s["disk_bytes"] / 3
    for r in rows.values():
        assert r["cpu_tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["positions"] == direct["positions"]
        assert r["rounds"] == 1  # each model's speed timed once here (a process per model and round)
    from softlabels.cli import build_parser

    compare_cmd = build_parser()._subparsers._group_actions[0].choices["compare"]
    assert compare_cmd.get_default("rounds") == 2  # users' default: every model timed twice, in turn
    lines = err.splitlines()  # the table and ratios: on stderr under --json
    assert any(ln.startswith("student-int8 vs student:") and "smaller on disk" in ln for ln in lines), err
    assert any(ln.startswith("student vs teacher:") for ln in lines), err


@pytest.mark.slow
def test_export_and_compare_refuse_bad_input_in_one_line(label_set, student, exports, tmp_path):
    code, _, err = cli_in_process("export", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, "export", "nope", "does not exist")
    code, _, err = cli_in_process("export", "--model", student, "--output", exports["int8"])
    assert_one_line_error(code, err, "export", "already exists and is not empty")
    code, _, err = cli_in_process("export", "--model", exports["int8"], "--output", str(tmp_path / "o"))
    assert_one_line_error(code, err, "export", "already an export")
    code, _, err = cli_in_process("compare", "--labels", label_set, "--models", student, exports["int8"],
                                  "--names", "one")
    assert_one_line_error(code, err, "compare", "--names gives 1 names for 2 models")
    code, _, err = cli_in_process("compare", "--labels", label_set, "--models", str(tmp_path))
    assert_one_line_error(code, err, "compare", "neither a Hugging Face model directory")
    code, _, err = cli_in_process("compare", "--labels", label_set, "--models", student, "--plot", "x.jpg")
    assert_one_line_error(code, err, "compare", "expected a .png")
    code, _, err = cli_in_process("compare", "--labels", label_set, "--models", student, "--rounds", "0",
                                  "--plot", "")
    assert_one_line_error(code, err, "compare", "--rounds must be at least 1")
    assert not (tmp_path / "o").exists()
