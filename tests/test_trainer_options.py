"""Trainer options: --precision, --gradient-checkpointing, --report-to; and the HF Trainer path.

Cheap on purpose: tiny students, 2-step runs in this process, one label set for all.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch

from softlabels.schemas.errors import UserError
from softlabels.trainer.config import TrainConfig
from softlabels.trainer.data import LabelDataset, collate

from conftest import assert_one_line_error, cli_in_process

FAST = ("--steps", "2", "--batch-size", "2", "--eval-batches", "1", "--eval-fraction", "0.1", "--warmup-steps", "1")


def _rows(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _train_rows(out) -> list[dict]:
    return [r for r in _rows(out) if "loss" in r]


@pytest.fixture(scope="module")
def train(label_set, tmp_path_factory):
    """``train(name, *flags)``: a 2-step run in this process, once per name; returns its output directory."""
    done = {}

    def run(name: str, *flags: str):
        if name not in done:
            out = tmp_path_factory.mktemp("opt") / name
            code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *FAST, *flags)
            assert code == 0, err[-3000:]
            done[name] = out
        return done[name]

    return run


def _fixed_batch(label_set: str, n: int = 2) -> dict[str, torch.Tensor]:
    return collate([s for s, _ in zip(LabelDataset(label_set, split="train", eval_fraction=0.1, shuffle=False), range(n))])


# -- --precision ------------------------------------------------------------------------------


FP32 = ("fp32", "--precision", "fp32")
FP16 = ("fp16", "--precision", "fp16", "--checkpoint-every", "2")  # its checkpoint: the resume test's start


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_runs_close_to_fp32_but_not_in_fp32(precision, train):
    ref = _train_rows(train(*FP32))
    rows = _train_rows(train(*FP16) if precision == "fp16" else train("bf16", "--precision", "bf16"))
    assert len(rows) == len(ref) == 2
    for r, f in zip(rows, ref):
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        # Same init, same batches: the half-precision forward only rounds (bf16 keeps 8 bits, fp16 11).
        assert r["loss"] == pytest.approx(f["loss"], rel=2e-3)
        assert r["grad_norm"] == pytest.approx(f["grad_norm"], rel=3e-2)
    # ... and it did round: autocast was on (a single step's loss may round back to fp32's value exactly).
    assert [(r["loss"], r["grad_norm"]) for r in rows] != [(f["loss"], f["grad_norm"]) for f in ref]
    assert ("loss_scale" in rows[0]) == (precision == "fp16")


@pytest.mark.slow
def test_fp16_keeps_its_loss_scale_across_a_resume(train, label_set, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(train(*FP16), out)
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *FAST[2:], "--steps", "4",
                                  "--checkpoint-every", "2", "--precision", "fp16", "--resume")
    assert code == 0, err[-3000:]
    ckpt = out / "checkpoints"
    saved = [torch.load(ckpt / f"step-00000{s}" / "optimizer.pt", weights_only=True)["scaler"] for s in (2, 4)]
    assert saved[0]["scale"] == _train_rows(out)[1]["loss_scale"]
    # The scaler counts overflow-free steps towards growing its scale: 2 before the resume, 2 after, none lost.
    assert [s["_growth_tracker"] for s in saved] == [2, 4]
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *FAST[2:], "--steps", "5",
                                  "--resume", "--precision", "bf16")
    assert_one_line_error(code, err, "train", "precision", "'bf16'")  # a resume keeps the precision


@pytest.mark.slow
def test_a_run_left_to_the_default_precision_resumes_with_it_named(label_set, tmp_path):
    out = tmp_path / "default"
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *FAST, "--checkpoint-every", "2")
    assert code == 0, err[-3000:]
    assert json.loads((out / "checkpoints" / "step-000002" / "run.json").read_text())["precision"] == "fp32"  # on CPU
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *FAST[2:], "--steps", "3",
                                  "--resume", "--precision", "fp32")
    assert code == 0, err[-3000:]


@pytest.mark.slow
def test_fp16_skips_overflowing_steps_without_calling_them_divergence(label_set, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from softlabels.trainer import loop
    from softlabels.trainer.student import build_student

    # A loss scale far past fp16's range: every step's gradients overflow, as in the first steps of a real run.
    monkeypatch.setattr(loop, "grad_scaler", lambda name, device, sharded=False: torch.amp.GradScaler(device.type, init_scale=2.0**40))
    out = tmp_path / "skipped"
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *FAST, "--precision", "fp16")
    assert code == 0, err[-3000:]
    rows = _train_rows(out)
    assert all(math.isfinite(r["loss"]) and not math.isfinite(r["grad_norm"]) for r in rows)
    assert [r["loss_scale"] for r in rows] == [2.0**39, 2.0**38]  # halved at each skipped step
    init, _ = build_student("tiny", LabelDataset(label_set, split="eval", eval_fraction=0.1).labels, seed=0)
    trained = load_file(out / "model.safetensors")
    assert len(trained) > 10
    assert all(torch.equal(trained[n], p) for n, p in init.state_dict().items() if n in trained)  # no step was taken


@pytest.mark.slow
def test_fp16_still_stops_a_run_whose_loss_diverges(label_set, tmp_path):
    out = tmp_path / "diverged"
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(out), *FAST, "--steps", "4",
                                  "--precision", "fp16", "--lr", "1e30", "--clip", "inf", "--warmup-steps", "0")
    assert_one_line_error(code, err, "train", "the loss is", "no weights saved")
    assert not (out / "model.safetensors").exists()


def test_autocast_is_what_the_precision_says(label_set):
    from softlabels.trainer.precision import autocast, resolve
    from softlabels.trainer.student import build_student

    cpu = torch.device("cpu")
    assert resolve(None, cpu) == "fp32"  # auto: bf16 is for CUDA only
    model, _ = build_student("tiny", LabelDataset(label_set, split="eval", eval_fraction=0.1).labels, seed=0)
    x = torch.randn(3, model.config.hidden_size)
    head = model.get_output_embeddings()
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert resolve(name, cpu) == name  # torch 2.13 autocasts to both half types on the CPU
        with autocast(name, cpu):
            y = head(x)
        assert y.dtype == dtype
        assert torch.allclose(y.float(), x @ head.weight.T, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)


# -- --gradient-checkpointing ----------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_less_saved(label_set):
    from softlabels.trainer.loop import KDModule
    from softlabels.trainer.student import build_student, enable_gradient_checkpointing

    batch = _fixed_batch(label_set)
    labels = LabelDataset(label_set, split="train", eval_fraction=0.1).labels
    cfg = TrainConfig(labels=label_set, output="unused")

    def loss_and_grads(checkpointing: bool):
        model, _ = build_student("tiny", labels, seed=0)
        if checkpointing:
            enable_gradient_checkpointing(model, "tiny")
        model.train()
        saved = [0]  # bytes autograd keeps for backward, outside the recomputed layers

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = KDModule(model, cfg)(batch)
        loss.backward()
        return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}, saved[0]

    loss, grads, saved = loss_and_grads(False)
    loss_gc, grads_gc, saved_gc = loss_and_grads(True)
    assert loss_gc == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_gc.keys()
    for name, g in grads.items():
        assert torch.allclose(grads_gc[name], g, rtol=1e-5, atol=1e-7), name
    assert saved_gc < saved / 2, (saved_gc, saved)


@pytest.mark.slow
def test_gradient_checkpointing_in_a_run_and_tensorboard_get_the_same_numbers(train):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref = _rows(train(*FP32))
    out = train("gc-tb", "--gradient-checkpointing", "--report-to", "tensorboard")  # default precision: fp32 on CPU
    rows = _rows(out)
    # Checkpointing changes memory, not math: the same losses and gradient norms as the plain fp32 run.
    for r, f in zip(_train_rows(out), _train_rows(train(*FP32))):
        assert r["loss"] == pytest.approx(f["loss"], rel=1e-6)
        assert r["grad_norm"] == pytest.approx(f["grad_norm"], rel=1e-5)
    assert len(rows) == len(ref) == 4  # eval before, 2 steps, eval after

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tb = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    want: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            for k, v in (value.items() if isinstance(value, dict) else [(None, value)]):
                if key != "step":
                    want.setdefault(f"{key}/{k}" if k else key, {})[row["step"]] = v
    assert set(tb) == set(want) and "eval/kl" in tb and "grad_norm" in tb
    for tag, series in want.items():
        assert set(tb[tag]) == set(series), tag
        for step, v in series.items():
            got = tb[tag][step]
            assert (math.isnan(got) and math.isnan(v)) or got == pytest.approx(v, rel=1e-6), (tag, step, got, v)


def test_gradient_checkpointing_refused_for_a_student_without_it(label_set, tmp_path):
    student = tmp_path / "ctrl.json"  # transformers' CTRL has no gradient checkpointing
    student.write_text(json.dumps({"model_type": "ctrl", "n_embd": 32, "n_layer": 1, "n_head": 2, "dff": 32}))
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "o"), *FAST,
                                  "--student", str(student), "--gradient-checkpointing")
    assert_one_line_error(code, err, "train", "--gradient-checkpointing", "does not support")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # refused before any training


# -- --report-to and the config ----------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_wandb_without_wandb_is_one_line(label_set, tmp_path):
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "o"),
                                  "--report-to", "tensorboard,wandb")
    assert_one_line_error(code, err, "train", "--report-to wandb", "pip install wandb")
    assert not (tmp_path / "o").exists()


def test_config_checks_the_new_settings():
    base = dict(labels="l", output="o")
    assert TrainConfig(**base).report_to == ()
    assert TrainConfig(**base, report_to="none").report_to == ()
    assert TrainConfig(**base, report_to=["tensorboard", "tensorboard"]).report_to == ("tensorboard",)
    assert TrainConfig(**base, report_to=" tensorboard ,").report_to == ("tensorboard",)
    for bad, fragment in ((dict(precision="fp8"), "precision must be one of"),
                          (dict(precision="auto"), "precision must be one of"),
                          (dict(gradient_checkpointing="yes"), "gradient_checkpointing must be true or false"),
                          (dict(report_to="mlflow"), "not mlflow"),
                          (dict(report_to="none,tensorboard"), "none cannot go with tensorboard"),
                          (dict(report_to=[3]), "report_to takes names")):
        with pytest.raises(UserError, match=fragment):
            TrainConfig(**base, **bad)
    assert "precision" in TrainConfig(**base).resume_record()


# -- transformers.Trainer ----------------------------------------------------------------------


@pytest.mark.slow
def test_hf_trainer_with_our_dataset_collator_and_loss_trains_the_student(label_set, tmp_path):
    from transformers import TrainingArguments

    from softlabels.trainer.hf import DistillationTrainer
    from softlabels.trainer.losses import chunked_loss
    from softlabels.trainer.student import build_student

    ds = LabelDataset(label_set, split="train", eval_fraction=0.1, epochs=None)
    model, _ = build_student("tiny", ds.labels, seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=5, per_device_train_batch_size=2,
                             learning_rate=3e-3, lr_scheduler_type="constant", report_to=[], logging_steps=1,
                             save_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=ds, data_collator=collate, loss="tail-kl")
    batch = _fixed_batch(label_set, 4)  # training samples: the ones the student is fitted to

    def direct() -> float:
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            return float(chunked_loss(hidden, model.get_output_embeddings(), "tail-kl", batch)[0])

    model.eval()
    before = direct()
    with torch.no_grad():
        assert float(trainer.compute_loss(model, dict(batch))) == pytest.approx(before, rel=1e-6)
    result = trainer.train()
    model.eval()
    after = direct()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert result.global_step == 5 and len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters()), "a weight never moved"
    assert after < before - 0.1, (before, after)  # the KD loss on the fixed batch went down
