"""The labeling job: plan on the driver, label on Ray actors, commit, publish.

The driver reads and tokenizes the corpus into a deterministic plan, skips
units that are already committed (resume), and hands the rest to a pool of
teacher actors (one per GPU; fractional-CPU actors on CPU so Ray's own tasks
are never starved). Each actor writes its unit's shard and commit marker and
returns the :class:`ShardInfo` through Ray; the driver writes the manifest
last, from those results.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from labeler.config import LabelConfig
from labeler.corpus import Corpus
from labeler.plan import Unit, build_sequences, make_units
from labeler.sink import LabelSetWriter
from labeler.teacher import TeacherSource, load_tokenizer, pick_device_dtype, resolve_teacher, teacher_info
from schemas import (
    SCHEMA_VERSION,
    CorpusInfo,
    Manifest,
    SequenceConfig,
    ShardInfo,
    TokenizerInfo,
    Totals,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)
LABELER_VERSION = "0.1.0"


@dataclass
class Summary:
    output: str
    sequences: int
    tokens: int
    shards: int
    bytes: int
    resumed_units: int
    labeled_tokens: int  # tokens labeled by this run (excludes resumed units)
    wall_s: float
    label_s: float  # time spent labeling (Ray start and planning excluded)
    status: str

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(1, self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.labeled_tokens / self.label_s if self.label_s > 0 else 0.0


def _teacher_context(source: TeacherSource, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source.path, revision=source.revision, trust_remote_code=trust_remote_code)
    return getattr(cfg, "max_position_embeddings", None)


def run(cfg: LabelConfig) -> Summary:
    """Run (or resume) a labeling job and return its summary."""
    t0 = time.time()
    log.info("labeling config: %s", cfg.redacted())
    writer = LabelSetWriter(cfg.output, cfg.storage_options)
    writer.check_reachable()
    corpus = Corpus(cfg.corpus, cfg.text_field, cfg.storage_options)
    source = resolve_teacher(cfg.teacher, cfg.revision)
    context = _teacher_context(source, cfg.trust_remote_code)
    if context is not None and cfg.max_length > context:
        raise ValueError(f"--max-length {cfg.max_length} exceeds the teacher's context of {context} tokens")
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    vocab = len(tokenizer)
    if cfg.top_k > vocab:
        raise ValueError(f"--top-k {cfg.top_k} exceeds the tokenizer's vocabulary of {vocab}")
    device, dtype = pick_device_dtype(cfg.device, cfg.dtype)

    seq_cfg = SequenceConfig(cfg.max_length, cfg.packing, cfg.add_eos, cfg.limit, cfg.shard_tokens)
    units = make_units(build_sequences(corpus.iter_documents(), tokenizer, seq_cfg), cfg.shard_tokens)
    if not units:
        raise ValueError(
            f"corpus {cfg.corpus!r} has no text to label "
            f"({corpus.stats.documents} documents, {corpus.stats.empty} empty)"
        )
    tok_info = TokenizerInfo(name=source.display_name, vocab_size=vocab, fingerprint=tokenizer_fingerprint(tokenizer))
    t_info = teacher_info(source, dtype)
    corpus_info = CorpusInfo(cfg.corpus, corpus.stats.fingerprint, corpus.stats.documents, corpus.stats.empty)
    identity = {
        "schema_version": SCHEMA_VERSION,
        "teacher": {"id": t_info.id, "revision": t_info.revision, "weights_sha256": t_info.weights_sha256},
        "tokenizer": tok_info.fingerprint,
        "top_k": cfg.top_k,
        "temperature": cfg.temperature,
        "corpus": {"source": corpus_info.source, "fingerprint": corpus_info.fingerprint},
        "sequence": asdict(seq_cfg),
    }
    status = writer.begin(identity, cfg.overwrite)
    done = writer.committed() if status != "new" else {}
    todo = [u for u in units if u.name not in done]
    log.info(
        "plan: %d sequences, %d tokens in %d units; %d already committed",
        sum(len(u.sequences) for u in units),
        sum(u.tokens for u in units),
        len(units),
        len(done),
    )
    if not writer.exists("tokenizer/tokenizer_config.json"):
        writer.write_tokenizer(tokenizer)

    results, label_s = _label_on_ray(cfg, source, device, dtype, tok_info.fingerprint, todo) if todo else ({}, 0.0)
    shards = tuple(done.get(u.name) or results[u.name] for u in units)
    manifest = Manifest(
        teacher=t_info,
        tokenizer=tok_info,
        top_k=cfg.top_k,
        temperature=cfg.temperature,
        corpus=corpus_info,
        sequence=seq_cfg,
        shards=shards,
        totals=Totals(
            sequences=sum(s.rows for s in shards),
            tokens=sum(s.tokens for s in shards),
            bytes=sum(s.bytes for s in shards),
        ),
        labeler_version=LABELER_VERSION,
        created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    )
    if status != "complete" or todo:
        writer.write_manifest(manifest)
    return Summary(
        output=cfg.output,
        sequences=manifest.totals.sequences,
        tokens=manifest.totals.tokens,
        shards=len(shards),
        bytes=manifest.totals.bytes,
        resumed_units=len(done),
        labeled_tokens=sum(u.tokens for u in todo),
        wall_s=time.time() - t0,
        label_s=label_s,
        status="already complete" if status == "complete" and not todo else "written",
    )


def _label_on_ray(
    cfg: LabelConfig, source: TeacherSource, device: str, dtype: str, tokenizer_fp: str, todo: list[Unit]
) -> tuple[dict[str, ShardInfo], float]:
    """Label ``todo`` on a pool of teacher actors; returns results and seconds spent labeling."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from labeler.actor import TeacherActor

    started = False
    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
        started = True
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if device.startswith("cuda") else 0
        replicas = cfg.num_replicas or max(1, gpus)
        replicas = min(replicas, len(todo))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads = cfg.threads or max(1, cpus // replicas)
        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 0.5}
        actor_cls = ray.remote(max_restarts=2, max_task_retries=2)(TeacherActor)
        actors = [
            actor_cls.options(**options).remote(
                source, dtype, device, cfg.top_k, cfg.temperature, cfg.batch_tokens, cfg.head_chunk,
                cfg.trust_remote_code, cfg.output, cfg.storage_options, threads, tokenizer_fp,
            )
            for _ in range(replicas)
        ]
        ray.get([a.ping.remote() for a in actors])  # teacher loaded: start the clock
        log.info("labeling %d units on %d teacher replica(s) (%s, %s)", len(todo), replicas, device, dtype)
        t0 = time.time()
        results = _dispatch(ray, actors, todo)
        return results, time.time() - t0
    finally:
        if started:
            ray.shutdown()


def _dispatch(ray: Any, actors: list[Any], todo: list[Unit]) -> dict[str, ShardInfo]:
    """Keep every actor busy with up to two units; collect results as they finish."""
    from labeler.progress import Progress

    pending: dict[Any, tuple[Unit, int]] = {}
    queue = list(todo)
    results: dict[str, ShardInfo] = {}
    progress = Progress(total_units=len(todo), total_tokens=sum(u.tokens for u in todo))

    def submit(actor_idx: int) -> None:
        unit = queue.pop(0)
        seqs = [(s.source, s.input_ids) for s in unit.sequences]
        pending[actors[actor_idx].label_unit.remote(unit.name, seqs)] = (unit, actor_idx)

    for i in range(len(actors)):
        for _ in range(2):
            if queue:
                submit(i)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            unit, actor_idx = pending.pop(ready[0])
            results[unit.name] = ShardInfo(**ray.get(ready[0]))
            progress.update(unit.tokens)
            if queue:
                submit(actor_idx)
    finally:
        progress.close()
    return results


def print_summary(s: Summary, file: Any = sys.stdout) -> None:
    rows = [
        ("output", s.output),
        ("status", s.status),
        ("sequences", f"{s.sequences:,}"),
        ("tokens", f"{s.tokens:,}"),
        ("shards", f"{s.shards} ({s.resumed_units} resumed)"),
        ("bytes", f"{s.bytes:,} ({s.bytes_per_token:.1f} bytes/token)"),
        ("wall time", f"{s.wall_s:.1f} s"),
        ("labeling", f"{s.labeled_tokens:,} tokens in {s.label_s:.1f} s ({s.tokens_per_s:,.0f} tokens/s)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=file)
