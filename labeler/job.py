"""The labeling job: check inputs, claim the output, label on Ray, publish.

Everything that can fail on bad input is checked before any work is sent to
Ray and before the teacher loads: the output location and the corpus before Ray
starts, the teacher's config and tokenizer (k, max-length, EOS) while a local Ray
starts (both take seconds; a refusal shuts Ray down again). Then :class:`labeler.pipeline.Pipeline` reads, tokenizes,
labels and commits units in parallel; the driver writes ``manifest.json``
last, from the units' commit records.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from softlabels.labeler.config import LabelConfig
from softlabels.labeler.corpus import Corpus, RowFormat
from softlabels.labeler.plan import Rendering, tokenizer_bos
from softlabels.labeler.pipeline import NothingToLabel, Pipeline
from softlabels.labeler.replicas import Replicas, start_replicas
from softlabels.labeler.raysession import cluster_gpus, ray_session
from softlabels.labeler.teacher import TeacherSource, load_tokenizer, pick_device_dtype, resolve_teacher, teacher_info
from softlabels.schemas import (
    SCHEMA_VERSION,
    CorpusInfo,
    Manifest,
    SequenceConfig,
    TokenizerInfo,
    Totals,
    tokenizer_fingerprint,
)
from softlabels.schemas.errors import UserError

from softlabels import __version__
from softlabels.common.cli import remote_code_guard
from softlabels.common.commit import LabelSetWriter

log = logging.getLogger(__name__)


LABELER_VERSION = __version__  # recorded in every manifest


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
    label_s: float  # from the teachers being loaded to the last commit
    status: str
    skipped_documents: int = 0
    empty_documents: int = 0
    replicas: int = 0
    units_per_node: dict[str, int] = field(default_factory=dict)
    # From the command's start (or run()'s, in a program) to the teacher's first batch labeled; None if none was.
    startup_s: float | None = None
    # startup_s in consecutive phases: imports (the command's start to run()), ray (to Ray up: the driver's input
    # checks start beside it), teacher (to the first replica's teacher loaded: the replicas start as soon as Ray is up,
    # while the checks finish), first_batch (to its first batch labeled)
    startup_split: dict[str, float] = field(default_factory=dict)
    trained_tokens: int = 0  # positions holding labels (all of them for plain text)
    format: str = "text"
    train_on: str = "all"
    truncated: int = 0  # conversations cut after their last assistant turn that fits --max-length
    too_long: int = 0  # conversations skipped: not even their first trained turn fits
    untrained: int = 0  # documents skipped: no token to train on
    generated_tokens: int = 0  # --generate-with: response tokens written by this run (excludes resumed units)
    generator: str | None = None

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(1, self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.labeled_tokens / self.label_s if self.label_s > 0 else 0.0


def _teacher_shape(source: TeacherSource, trust_remote_code: bool) -> tuple[int | None, int | None]:
    """The teacher's context length and output vocabulary (from its config; no weights loaded).

    A local directory whose ``config.json`` states both (at its top, or in its ``text_config``) is read as JSON:
    ``AutoConfig`` would import the model family's code, and torch with it (seconds of the driver's start-up,
    on the cores that start Ray and the teacher). Anything else goes through ``AutoConfig``."""
    import json

    if source.is_local and not trust_remote_code:
        try:
            with open(os.path.join(source.path, "config.json"), encoding="utf-8") as fh:
                raw = json.load(fh)
        except (OSError, ValueError):
            raw = None
        text = raw.get("text_config") or raw if isinstance(raw, dict) else None
        if isinstance(text, dict):
            shape = text.get("max_position_embeddings"), text.get("vocab_size")
            if all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
                return shape
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source.path, revision=source.revision, trust_remote_code=trust_remote_code)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(text, "max_position_embeddings", None), getattr(text, "vocab_size", None)


def check_scratch_space(cfg: LabelConfig) -> None:
    """Temporary folders this process and a local Ray need, writable: else one line naming the variable."""
    import tempfile

    try:
        tempfile.TemporaryDirectory().cleanup()
    except OSError as e:
        raise UserError(f"no writable temporary folder ({e}): set TMPDIR to a writable folder") from e
    if not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        # Where a local Ray puts its session: RAY_TMPDIR, else TMPDIR (taken as it is, on Linux), else /tmp.
        ray_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        try:
            os.makedirs(ray_tmp, exist_ok=True)
            tempfile.TemporaryDirectory(dir=ray_tmp).cleanup()
        except OSError as e:
            raise UserError(f"Ray's temporary folder {ray_tmp} is not writable ({e.strerror or e}): "
                            "set RAY_TMPDIR (or TMPDIR) to a writable folder") from e


def run(cfg: LabelConfig, started: float | None = None) -> Summary:
    """Run (or resume) a labeling job and return its summary.

    ``started``: when the command started (epoch seconds), for the summary's start-up time.
    """
    t0 = time.time()
    started = started or t0
    check_scratch_space(cfg)
    log.info("labeling config: %s", cfg.redacted())
    if cfg.format == "prompt" and cfg.generate_with is None:
        raise UserError("--format prompt reads prompts to generate responses for: give --generate-with teacher or DIR")
    writer = LabelSetWriter(cfg.output, cfg.storage_options)
    writer.check_reachable(cfg.overwrite)
    rows = RowFormat(cfg.format, cfg.text_field, cfg.messages_field, cfg.prompt_field, cfg.completion_field, cfg.train_on,
                     prompts=cfg.generate_with is not None)
    corpus = Corpus(cfg.corpus, rows, cfg.storage_options, cfg.on_error, exclude=cfg.output, split=cfg.split,
                    max_expand=cfg.max_expand_bytes)
    template = _chat_template(cfg.chat_template)
    from softlabels.labeler.chattemplate import DEFAULT_SECONDS, DEFAULT_STEPS, render_bounds

    # The driver's bounds on rendering one conversation travel to every read task (one line if a variable is bad).
    render_limits = render_bounds() if corpus.rows.format == "chat" else (DEFAULT_STEPS, DEFAULT_SECONDS)
    source = resolve_teacher(cfg.teacher, cfg.revision)
    # The teacher's config and tokenizer (seconds: they import transformers and torch) are checked
    # while Ray starts; a refusal there shuts Ray down again before it is reported.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-checks")
    checks = pool.submit(_check_teacher, cfg, source, corpus.rows.format, template)
    pool.shutdown(wait=False)
    try:
        writer.acquire(cfg.overwrite, cfg.take_over)  # before Ray starts: a second run on the output is refused at once
    except BaseException:
        checks.cancel()
        raise
    try:
        with ray_session(cfg.ray_address) as ray:
            t_ray = time.time()
            try:
                # The device default follows the cluster (the driver may have no GPU).
                device, dtype = pick_device_dtype(cfg.device or ("cuda" if cluster_gpus(ray) else "cpu"), cfg.dtype)
                if device.startswith("cuda") and not cluster_gpus(ray):
                    raise UserError(f"--device {device}: the Ray cluster has no GPUs")
                # The replicas start and load (process start, imports, weights: the longest part of start-up)
                # while the driver's checks finish; a refusal below drops them with their handles.
                replicas = start_replicas(ray, cfg, source, device, dtype)
                tokenizer, id_space, span_bytes = checks.result()
            except BaseException:
                writer.finish(forget=True)  # refused: the output is left as it was
                raise
            if corpus.rows.format == "chat" and template is None:
                from softlabels.labeler.chat import tokenizer_template

                template = tokenizer_template(tokenizer)  # recorded by its sha256 like a given one
            rendering = Rendering(corpus.rows.format, corpus.rows.train_on or "all", template,
                                  tokenizer_bos(tokenizer) if corpus.rows.format != "chat" else None,
                                  tokenizer.eos_token_id if corpus.rows.format == "prompt-completion" else None,
                                  span_bytes, cfg.max_length, cfg.chat_date, *render_limits,
                                  prompts=cfg.generate_with is not None)
            generation = None
            if cfg.generate_with is not None:
                from softlabels.labeler.generation import start_generators

                try:
                    generation = start_generators(ray, cfg, tokenizer, rendering, replicas)
                except BaseException:
                    writer.finish(forget=True)
                    raise
            return _run(cfg, ray, writer, corpus, source, tokenizer, id_space, (started, t0, t_ray), rendering,
                        replicas, generation)
    finally:
        checks.cancel()
        writer.finish()


def _chat_template(path: str | None) -> str | None:
    """The text of ``--chat-template FILE`` (one line if it cannot be read)."""
    if path is None:
        return None
    from softlabels.labeler.chattemplate import check_template

    limit = 1 << 20  # templates are a few KiB; a bigger file is not one
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            text = fh.read(limit + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chat-template {path}: cannot be read ({e})") from e
    if len(text) > limit:
        raise UserError(f"--chat-template {path}: over {limit:,} characters; not a chat template")
    if not text.strip():
        raise UserError(f"--chat-template {path}: the file is empty")
    try:
        check_template(text)
    except UserError as e:
        raise UserError(f"--chat-template {path}: {e}") from None
    return text


def _check_teacher(cfg: LabelConfig, source: TeacherSource, fmt: str = "text",
                   template: str | None = None) -> tuple[Any, int, Any]:
    """The teacher's tokenizer, the id space its labels live in, and its token bytes when spans are stored;
    one line on what does not fit."""
    with remote_code_guard(f"teacher {cfg.teacher}"):
        context, head_vocab = _teacher_shape(source, cfg.trust_remote_code)
    if context is not None and cfg.max_length > context:
        raise UserError(f"--max-length {cfg.max_length} exceeds the teacher's context of {context} tokens")
    with remote_code_guard(f"teacher {cfg.teacher}"):
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    vocab = len(tokenizer)
    if cfg.top_k > vocab:
        raise UserError(f"--top-k {cfg.top_k} exceeds the tokenizer's vocabulary of {vocab}")
    from softlabels.labeler.chat import tokenizer_template

    if fmt == "chat" and not (template or tokenizer_template(tokenizer)):
        raise UserError(f"the corpus holds conversations but the tokenizer of teacher {cfg.teacher} has no chat "
                        "template: give one with --chat-template FILE")
    if fmt == "chat" and not template:
        from softlabels.labeler.chattemplate import check_template

        try:
            check_template(tokenizer_template(tokenizer))
        except UserError as e:
            raise UserError(f"teacher {cfg.teacher}'s tokenizer: {e} (give another with --chat-template FILE)") from None
    if fmt == "chat" and not getattr(tokenizer, "is_fast", False):
        raise UserError(f"chat corpora need a fast tokenizer (offsets mark the assistant tokens); "
                        f"teacher {cfg.teacher} has a slow one")
    if (cfg.packing or cfg.add_eos) and tokenizer.eos_token_id is None:
        raise UserError("--packing/--add-eos need a tokenizer with an EOS token; this one has none")
    # Heads padded past the tokenizer (e.g. 32064 rows for 32000 tokens) can emit those ids too.
    return tokenizer, max(vocab, head_vocab or 0), _span_bytes(cfg, tokenizer)


def _span_bytes(cfg: LabelConfig, tokenizer: Any) -> Any:
    """The teacher tokenizer's :class:`TokenBytes` when spans are to be stored: on request, or by default when
    its tokens reproduce a probe text (spaces, tabs, CRLF, accents, CJK, an emoji, a ligature) byte for byte."""
    if cfg.store_spans is False:
        return None
    from softlabels.common.tokenbytes import check_lossless, token_bytes

    where = f"the tokenizer of teacher {cfg.teacher}"
    try:
        tb = token_bytes(tokenizer, where)
        check_lossless(tokenizer, tb, where)
    except UserError as e:
        if cfg.store_spans:
            raise UserError(f"--store-spans: {e}") from None
        log.warning("token spans not stored (%s): students with another tokenizer cannot distill from this set", e)
        return None
    return tb


def _run(cfg: LabelConfig, ray: Any, writer: LabelSetWriter, corpus: Corpus, source: TeacherSource, tokenizer: Any,
         id_space: int, marks: tuple[float, float, float], rendering: Rendering, replicas: Replicas,
         generation: Any = None) -> Summary:
    """The job once Ray is up, the output claimed and every input checked: label, publish.

    ``marks``: when the command started, run() was called, and Ray was ready (epoch seconds)."""
    started, t0, t_ray = marks
    seq_cfg = SequenceConfig(cfg.max_length, cfg.packing, cfg.add_eos, cfg.limit, cfg.shard_tokens)
    tok_info = TokenizerInfo(name=source.display_name, vocab_size=len(tokenizer), fingerprint=tokenizer_fingerprint(tokenizer),
                             id_space=id_space)

    dtype = replicas.dtype
    try:
        t_info = teacher_info(source, dtype)
        identity = {
            "schema_version": SCHEMA_VERSION,
            "teacher": {"id": t_info.id, "revision": t_info.revision, "weights_sha256": t_info.weights_sha256,
                        "dtype": dtype},
            "tokenizer": tok_info.fingerprint,
            "top_k": cfg.top_k,
            "temperature": cfg.temperature,
            # Not --on-error: each committed unit's input digest already says what it was made from.
            "corpus": {"source": cfg.corpus, "listing": corpus.listing_fingerprint(), "rows": asdict(corpus.rows),
                       "split": cfg.split},
            "rendering": _rendering_record(rendering, cfg.chat_template is not None),
            "sequence": asdict(seq_cfg),
            "encoding": cfg.label_encoding.to_dict(),
            "tail_samples": cfg.tail_samples,
            "spans": rendering.spans is not None,
            "target_logprobs": True,  # since 0.8.0 (schema v6): a set begun without them is not resumed with them
            **({"generation": generation.record} if generation is not None else {}),
        }
        status = writer.begin(identity, cfg.overwrite)
        if status == "complete":
            return _already_complete(writer, cfg, t0)
        done = writer.committed() if status == "resume" else {}
        if done:
            log.info("resuming: %d committed unit(s) verified", len(done))
        tok_info = dataclasses.replace(tok_info, checksums=writer.write_tokenizer(tokenizer))
        try:
            out = Pipeline(ray, cfg, replicas, tokenizer, tok_info.fingerprint, corpus, seq_cfg, done,
                           id_space, writer.owner(), writer.record, rendering, generation).run()
        except NothingToLabel:
            if status == "new":
                writer.abandon()  # leave the output as it was: a fixed corpus can then use it
            raise
        shards = tuple(out.shards)
        manifest = Manifest(
            teacher=t_info,
            tokenizer=tok_info,
            top_k=cfg.top_k,
            temperature=cfg.temperature,
            corpus=CorpusInfo(cfg.corpus, out.corpus.fingerprint, out.corpus.documents, out.corpus.empty,
                              out.corpus.skipped),
            sequence=seq_cfg,
            shards=shards,
            totals=Totals(
                sequences=sum(s.rows for s in shards),
                tokens=sum(s.tokens for s in shards),
                bytes=sum(s.bytes for s in shards),
                trained=sum(s.tokens if s.trained is None else s.trained for s in shards),
            ),
            labeler_version=LABELER_VERSION,
            rendering={**_rendering_record(rendering, cfg.chat_template is not None), "truncated_conversations": out.plan.truncated,
                       "skipped_too_long": out.plan.too_long, "skipped_untrained": out.plan.untrained},
            encoding=cfg.label_encoding.to_dict(),
            tail_samples=cfg.tail_samples,
            spans=rendering.spans is not None,
            target_logprobs=True,
            generation=None if generation is None else generation.record,
            sampler_logprobs=generation is not None,
            created_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        )
        writer.write_manifest(manifest)
    finally:
        writer.finish()
    return Summary(
        output=cfg.output,
        sequences=manifest.totals.sequences,
        tokens=manifest.totals.tokens,
        shards=len(shards),
        bytes=manifest.totals.bytes,
        resumed_units=out.resumed,
        labeled_tokens=out.labeled_tokens,
        wall_s=time.time() - t0,
        label_s=out.label_s,
        status="written",
        skipped_documents=out.corpus.skipped,
        empty_documents=out.corpus.empty,
        replicas=out.replicas,
        units_per_node=out.units_per_node,
        startup_s=None if out.first_batch is None else out.first_batch - started,
        startup_split=_startup_split(started, t0, t_ray, out.teacher_loaded, out.first_batch),
        trained_tokens=manifest.totals.trained or manifest.totals.tokens,
        format=rendering.format,
        train_on=rendering.train_on,
        truncated=out.plan.truncated,
        too_long=out.plan.too_long,
        untrained=out.plan.untrained,
        generated_tokens=out.generated_tokens,
        generator=None if generation is None else generation.name,
    )


def _startup_split(started: float, t0: float, t_ray: float, loaded: float | None,
                   first: float | None) -> dict[str, float]:
    """The start-up's consecutive phases, in seconds (empty when no batch was labeled)."""
    if loaded is None or first is None:
        return {}
    loaded = max(loaded, t_ray)  # a kept replica (SOFTLABELS_KEEP_TEACHERS) loaded before this run
    marks = {"imports": (started, t0), "ray": (t0, t_ray), "teacher": (t_ray, loaded), "first_batch": (loaded, first)}
    return {name: round(max(0.0, b - a), 3) for name, (a, b) in marks.items()}


def _rendering_record(r: Rendering, template_given: bool) -> dict[str, Any]:
    """The manifest's record of how documents became sequences and which positions are trained."""
    import hashlib

    if r.format == "chat":
        special = "as the chat template writes them (none added)"
    else:
        special = "none added" if r.bos is None else f"BOS {r.bos} before each document (as the tokenizer adds it)"
        if r.format == "prompt-completion" and r.eos is not None:
            special += f"; EOS {r.eos} after each completion (trained)"
    return {
        "format": r.format,
        "train_on": r.train_on,
        "chat_template_sha256": None if r.chat_template is None else hashlib.sha256(r.chat_template.encode()).hexdigest(),
        "chat_template": None if r.format != "chat" else ("--chat-template" if template_given else "the tokenizer's"),
        "special_tokens": special,
        "long_conversations": "cut after the last trained turn that fits --max-length; skipped if none fits",
        **({"date": r.date} if r.format == "chat" else {}),  # what the template's strftime_now() saw (--chat-date)
    }


def _already_complete(writer: LabelSetWriter, cfg: LabelConfig, t0: float) -> Summary:
    """Same command, finished set: nothing to do (the manifest is the commit of the whole set)."""
    m = writer.read_manifest()
    return Summary(
        output=cfg.output,
        sequences=m.totals.sequences,
        tokens=m.totals.tokens,
        shards=len(m.shards),
        bytes=m.totals.bytes,
        resumed_units=len(m.shards),
        labeled_tokens=0,
        wall_s=time.time() - t0,
        label_s=0.0,
        status="already complete",
        skipped_documents=m.corpus.skipped_documents,
        empty_documents=m.corpus.empty_documents,
        trained_tokens=m.totals.tokens if m.totals.trained is None else m.totals.trained,
        format=(m.rendering or {}).get("format", "text"),
        train_on=(m.rendering or {}).get("train_on", "all"),
        truncated=(m.rendering or {}).get("truncated_conversations", 0),
        too_long=(m.rendering or {}).get("skipped_too_long", 0),
        untrained=(m.rendering or {}).get("skipped_untrained", 0),
    )


def print_summary(s: Summary, file: Any = sys.stdout) -> None:
    rows = [
        ("output", s.output),
        ("status", s.status),
        ("sequences", f"{s.sequences:,}"),
        ("tokens", f"{s.tokens:,}"),
        ("shards", f"{s.shards} ({s.resumed_units} resumed)"),
        ("documents", f"{s.empty_documents} empty, {s.skipped_documents} skipped (bad rows)"),
        ("replicas", f"{s.replicas} teacher replica(s); units per node: "
                     + (", ".join(f"{n[:8]}={c}" for n, c in sorted(s.units_per_node.items())) or "-")),
        ("format", f"{s.format}, trained on {s.train_on}: {s.trained_tokens:,} of {s.tokens:,} positions labeled"
                   f" ({s.trained_tokens / max(1, s.tokens):.0%})"),
        ("long", f"{s.truncated} conversation(s) cut after their last turn that fits, {s.too_long} skipped "
                 f"(too long), {s.untrained} skipped (nothing to train)"),
        ("bytes", f"{s.bytes:,} ({s.bytes_per_token:.1f} bytes/token)"),
        ("wall time", f"{s.wall_s:.1f} s"),
        ("start-up", "-" if s.startup_s is None else f"{s.startup_s:.1f} s (command start to the first batch labeled"
                     + (": " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in s.startup_split.items())
                        if s.startup_split else "") + ")"),
        ("labeling", f"{s.labeled_tokens:,} tokens in {s.label_s:.1f} s ({s.tokens_per_s:,.0f} tokens/s)"),
    ]
    if s.generator is not None:
        rows.append(("generation", f"{s.generated_tokens:,} response tokens written by {s.generator} "
                                   f"({s.generated_tokens / s.label_s if s.label_s > 0 else 0:,.1f} tokens/s, "
                                   "generation and labeling together)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=file)
