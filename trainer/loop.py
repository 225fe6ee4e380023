"""The training loop, written out plainly: AdamW, warmup + cosine, clipping, accumulation."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from softlabels.schemas.errors import UserError
from softlabels.trainer.checkpoint import CheckpointStore, rng_state, set_rng_state
from softlabels.trainer.config import CHANGEABLE, TrainConfig, resolve_loss, resolve_weights
from softlabels.trainer.crosstok import attach
from softlabels.trainer.data import LabelDataset, StatefulLoader, merge_states
from softlabels.trainer.evaluate import _move, evaluate
from softlabels.trainer.initfrom import init_from, policy_note
from softlabels.trainer.precision import autocast, grad_scaler, resolve
from softlabels.trainer.progress import Metrics, ProgressBar, fmt_eval
from softlabels.schemas import tokenizer_fingerprint
from softlabels.trainer.student import (
    TRAIN_RECORD, build_student, embedding_rows, enable_gradient_checkpointing,
)
from softlabels.trainer.qat import QAT_EXPORT, apply_qat
from softlabels.trainer.tracking import check_trackers, open_trackers
from softlabels.trainer.sharding import (  # noqa: F401 (KDModule: the name bench/ and tests import from here)
    KDModule, accumulating, as_number, full_student, load_sharded, save_sharded, wrap,
)

from softlabels.common.crash import crash_point
from softlabels.common.files import make_dir, widen_to_umask

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss or the gradients became NaN or infinite."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """``(rank, world, device)``; joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda")
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return rank, world, device
    return 0, 1, torch.device(cfg.device or ("cuda" if cuda else "cpu"))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a student on a label set; returns a summary with eval before/after.

    With ``checkpoint_every`` it saves checkpoints; with ``resume`` it continues
    from the latest one exactly (same data order, optimizer, schedule and RNG).
    """
    rank, world, device = _distributed(cfg)
    if rank == 0:
        log.info("training config: %s", cfg.redacted())
        # A file in the way of the output (or of OUTPUT/tensorboard): refused before any data is read
        if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
            raise UserError(f"--output {cfg.output} is a file, not a directory")
        check_trackers(cfg.report_to, Path(cfg.output))
    seed_everything(cfg.seed)
    train_ds = LabelDataset(
        cfg.labels, cfg.storage_options, "train", cfg.eval_fraction, cfg.seed, epochs=None,
        shuffle_window=cfg.shuffle_window, prefetch=cfg.prefetch, top_k=cfg.top_k, skip_corrupt=cfg.skip_corrupt,
    )
    eval_ds = LabelDataset(
        train_ds.labels, split="eval", eval_fraction=cfg.eval_fraction, shuffle=False, top_k=cfg.top_k,
        skip_corrupt=cfg.skip_corrupt, split_by_rank=False,
    )
    if cfg.loss == "tail-sampled" and not train_ds.manifest.tail_samples:
        raise UserError(f"--loss tail-sampled: the label set {cfg.labels} has no tail samples (label it with --tail-samples S)")
    if cfg.loss == "reverse-kl-sampled" and not train_ds.manifest.target_logprobs:
        raise UserError(f"--loss reverse-kl-sampled: the label set {cfg.labels} holds no target log-probs (labeled "
                        "before softlabels 0.8.0); relabel it, or use --loss reverse-kl")
    if rank == 0 and train_ds.manifest.generation:
        log.info("%s", policy_note(train_ds.manifest.generation, cfg.init_from))
    if (cfg.chunk_weight or 0) > 0 and not train_ds.manifest.target_logprobs:
        raise UserError(f"--chunk-weight: the label set {cfg.labels} holds no target log-probs (labeled before "
                        "softlabels 0.8.0, schema v{}); relabel it, or train with --chunk-weight 0".format(
                            train_ds.manifest.schema_version))
    spec, trained_with = (cfg.student, None) if cfg.init_from is None else init_from(cfg.init_from)
    model, tokenizer = build_student(spec, train_ds.labels, cfg.seed, allow_vocab_mismatch=cfg.allow_vocab_mismatch,
                                     trust_remote_code=cfg.trust_remote_code,
                                     student_tokenizer=None if cfg.init_from else cfg.student_tokenizer,
                                     safetensors_only=cfg.init_from is not None,
                                     where=None if cfg.init_from is None else f"--init-from {cfg.init_from}",
                                     trained_tokenizer=trained_with)
    # The tokenizer decides what each embedding row means: recorded (run.json, the training record) so that a
    # resume, or a later --init-from, notices one rewritten at the same path.
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    train_ds.max_id = eval_ds.max_id = embedding_rows(model)  # a stored id the student has no row for: one line
    cross = attach([train_ds, eval_ds], train_ds.labels, tokenizer, cfg.student_tokenizer or spec,
                   cfg.allow_vocab_mismatch, cfg.top_k, cfg.token_map or "first")
    out = Path(cfg.output)
    make_dir(out, "--output")
    store = CheckpointStore(cfg.checkpoint_dir or str(out / "checkpoints"), cfg.storage_options)
    latest = store.latest()
    if latest and not cfg.resume:
        raise UserError(
            f"{store.url} holds checkpoint {latest}: pass --resume to continue that run, or use another --output"
        )
    # As they apply (and are recorded for a resume): the loss and weights always (unset weights of a resumed run as
    # its checkpoint recorded them), the token map across tokenizers
    weights = resolve_weights(cfg.alpha, cfg.chunk_weight, cross is not None, train_ds.manifest.target_logprobs,
                              store.recorded(latest) if latest else None, loss=cfg.loss,
                              chunk_distance=cfg.chunk_distance)
    if rank == 0 and cfg.chunk_weight is None and cross is None and not train_ds.manifest.target_logprobs:
        log.warning("the chunk likelihood term (on by default) is off: the label set holds no target log-probs "
                    "(labeled before softlabels 0.8); relabel it for the default, or pass --chunk-weight 0")
    cfg = dataclasses.replace(cfg, loss=resolve_loss(cfg.loss, cross is not None), **weights,
                              token_map=(cfg.token_map or "first") if cross is not None else cfg.token_map)
    if cross is not None:  # no chunk term: no chunk columns built in the loader's workers
        cross.with_chunks = cfg.chunk_weight > 0
    model.to(device)
    if cfg.qat:
        kinds = apply_qat(model, cfg.qat)
        if rank == 0:
            counts = {k: list(kinds.values()).count(k) for k in sorted(set(kinds.values()))}
            log.info("quantization-aware (--qat %s): weight matrices as the GGUF --quant %s export stores them: %s",
                     cfg.qat, QAT_EXPORT[cfg.qat], ", ".join(f"{n} {k}" for k, n in counts.items()))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, spec)
    precision = resolve(cfg.precision, device)  # one line now if this torch cannot autocast to it here
    if cfg.qat and precision != "fp32" and rank == 0:
        log.warning("--qat with --precision %s: autocast rounds the quantized weights to %s in the forward, so it "
                    "trains on a coarser grid than the file stores; --precision fp32 trains on exactly the file's "
                    "weights", precision, precision)
    scaler = grad_scaler(precision, device, sharded=cfg.fsdp)  # fp16 only; otherwise it passes everything through
    n_params = sum(p.numel() for p in model.parameters())
    kd = KDModule(model, cfg)
    step_fn = wrap(kd, world, device, cfg.fsdp)  # FSDP2 shards the parameters in place: before the optimizer sees them
    score = kd.score if cfg.fsdp else None  # a sharded student is scored inside its own (hooked) forward
    if rank == 0:
        log.info("student %s: %.1fM parameters on %s%s", cfg.student, n_params / 1e6, device,
                 f", {world} ranks" if world > 1 else "")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    # --packing: a batch's sequences share rows of up to the set's max_length tokens, each in its own block.
    loader = StatefulLoader(train_ds, cfg.batch_size, cfg.num_workers,
                            pack_to=train_ds.manifest.sequence.max_length if cfg.packing else None)
    start, tokens, before, rng = 0, 0, None, None
    # The precision as resolved: a run left to the default resumes with it named, and vice versa.
    # The student's tokenizer by its content, not its path: a --student-tokenizer DIR rewritten since is another run.
    run_record = {"labels": train_ds.labels.manifest_sha256, **cfg.resume_record(), "precision": precision,
                  "student_tokenizer_fingerprint": tokenizer_fp}
    if latest and cfg.resume:
        store.check_resume(latest, run_record, cfg.allow_changed, CHANGEABLE)
        opt_state, progress, state = store.load(latest, model, rank, sharded=cfg.fsdp)
        if cfg.fsdp:
            load_sharded(store.path(latest, "sharded"), cfg.storage_options, model, opt)
        else:
            opt.load_state_dict(opt_state["optimizer"])
        sched.load_state_dict(opt_state["scheduler"])
        if opt_state.get("scaler"):  # fp16 runs; checkpoints before --precision have none
            scaler.load_state_dict(opt_state["scaler"])
        loader.load_state_dict(progress["data"])
        start, before = progress["step"], progress["before"]
        tokens, rng = (state["tokens"], state["rng"]) if state is not None else (0, None)
        if state is None:  # a rank the checkpoint's run did not have: its own RNG streams, from the seed
            seed_everything(cfg.seed * 1_000_003 + rank * 7_919 + start)
        if rank == 0:
            log.info("resuming from %s at step %d", latest, start)
            if progress["world"] != world:
                log.warning("resuming on %d rank(s), saved on %d: the global batch is now %d sequences (was %d); "
                            "the schedule continues by step", world, progress["world"],
                            world * cfg.batch_size * cfg.grad_accum, progress["world"] * cfg.batch_size * cfg.grad_accum)
    elif cfg.resume and rank == 0:
        log.info("--resume: no checkpoint in %s yet, starting from step 0", store.url)

    # The first batch now, before any evaluation: a split or reader slot without samples is refused
    # before training starts (and the workers start reading meanwhile).
    pending = [next(loader)] if start < cfg.steps else []
    metrics_path = Path(cfg.metrics) if cfg.metrics else out / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")
    metrics = Metrics(metrics_path, keep_until=start,
                       tracker=open_trackers(cfg.report_to, rank, out, cfg.redacted(), resumed_at=start))
    if before is None:
        before = evaluate(model, eval_ds, cfg.batch_size, cfg.eval_batches, cfg.head_chunk, score)
        metrics.write({"step": 0, "eval": before})
        if rank == 0:
            log.info("eval before training: %s", fmt_eval(before))

    samples_log = open(out / f"samples.rank{rank}.txt", "a") if cfg.log_samples else None
    if rng is not None:
        set_rng_state(rng)
    model.train()
    t0 = time.time()
    bar = ProgressBar(cfg.steps, start, enabled=rank == 0)
    for step in range(start, cfg.steps):
        opt.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = _move(pending.pop() if pending else next(loader), device)
            sync = world == 1 or micro == cfg.grad_accum - 1
            with autocast(precision, device), accumulating(step_fn, sync):
                loss, parts = step_fn(batch)
                scaler.scale(loss / cfg.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
            if samples_log is not None:
                samples_log.write(" ".join(f"{int(e)}:{int(k)}" for e, k in zip(batch["position"][:, 2], batch["sample_key"])) + "\n")
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        grad_norm = as_number(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        # fp16: an overflowed gradient is routine (the scaler skips the step and lowers its scale); the loss is not
        if not (math.isfinite(float(loss.detach())) and (scaler.is_enabled() or math.isfinite(float(grad_norm)))):
            # Before opt.step: the weights stay finite, and nothing of this step is saved.
            raise TrainingDiverged(
                f"step {step + 1}: the loss is {float(loss.detach())} (gradient norm {float(grad_norm)}) at lr "
                f"{sched.get_last_lr()[0]:.3g}; stopped, no weights saved from it. Lower --lr or --clip, or check "
                "the label set" + (f"; the last checkpoint is in {store.url}" if cfg.checkpoint_every else ""))
        scaler.step(opt)
        scaler.update()
        sched.step()
        row = {"step": step + 1, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
               "grad_norm": float(grad_norm), **parts_sum, "tokens": tokens, "elapsed_s": time.time() - t0,
               **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {})}
        metrics.write(row)
        bar.update(row)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            ev = evaluate(model, eval_ds, cfg.batch_size, cfg.eval_batches, cfg.head_chunk, score)
            metrics.write({"step": step + 1, "eval": ev})
            if rank == 0:
                log.info("eval at step %d: %s", step + 1, fmt_eval(ev))
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            name = f"step-{step + 1:06d}"
            data = loader.state_dict()  # this rank's readers; every rank's joined, so any world size can resume
            if world > 1:
                every: list[Any] = [None] * world
                dist.all_gather_object(every, data)
                data = merge_states(every)
            if cfg.fsdp:  # every rank writes its share of weights and optimizer state
                save_sharded(store.path(name, "sharded"), cfg.storage_options, model, opt)
            if rank == 0:
                store.save_shared(name, None if cfg.fsdp else model, {
                    **({} if cfg.fsdp else {"optimizer": opt.state_dict()}), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict()}, run_record)
                store.save_progress(name, {"step": step + 1, "before": before, "data": data, "world": world})
            store.save_rank(name, rank, {"tokens": tokens, "rng": rng_state()})
            if world > 1:
                dist.barrier()
            if rank == 0:
                store.commit(name)
        crash_point("trainer.step")
    bar.close()
    if samples_log is not None:
        samples_log.close()
    train_s = time.time() - t0
    after = evaluate(model, eval_ds, cfg.batch_size, cfg.eval_batches, cfg.head_chunk, score)
    metrics.write({"step": cfg.steps, "eval": after})
    metrics.close()
    if train_ds.corrupt_skipped:
        log.warning("skipped %d corrupt shard(s) (--skip-corrupt)", train_ds.corrupt_skipped)
    whole = full_student(model) if cfg.fsdp else model  # sharded: gathered on rank 0 only
    if rank == 0:
        log.info("eval after training: %s", fmt_eval(after))
        whole.save_pretrained(out)
        tokenizer.save_pretrained(out)
        widen_to_umask(out)  # safetensors writes 0600: others sharing the volume could not load the student
        (out / TRAIN_RECORD).write_text(json.dumps({"config": cfg.redacted(), "label_set": {
            "url": train_ds.labels.url, "tokenizer_fingerprint": train_ds.manifest.tokenizer.fingerprint,
            "teacher": train_ds.manifest.teacher.id, "top_k": train_ds.manifest.top_k},
            "student_tokenizer_fingerprint": tokenizer_fp}, indent=2) + "\n")
        if cfg.plot:
            from softlabels.trainer.plot import plot_metrics

            plot_metrics(metrics_path, cfg.plot)
    digest = None
    if world > 1 and not cfg.fsdp:
        digest = _params_sha256(model)
        (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "params_sha256": digest}) + "\n")
        dist.barrier()
    return {
        "output": str(out),
        "student": cfg.student,
        "parameters": n_params,
        "steps": cfg.steps,
        "resumed_from": start,
        "train_tokens": tokens,
        "train_s": train_s,
        "before": before,
        "after": after,
        **({"params_sha256": digest} if digest else {}),
    }


def _params_sha256(model: torch.nn.Module) -> str:
    """Digest of every parameter's bytes: equal across DDP ranks when they stayed in sync."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
