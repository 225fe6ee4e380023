"""Scale-out on Ray Core: parallel reading and tokenizing, teacher replicas, shard writers.

Three kinds of Ray work run at once:

- *read tasks* (fractional CPU) read and tokenize corpus blocks, a bounded
  number ahead of the driver, which consumes them in block order and cuts
  units exactly as a serial reader would (the plan never depends on how many
  workers there are);
- *teacher actors* (one per GPU, ``num_gpus=1``; on CPU, fractional-CPU
  actors so read and write tasks always find room) load the teacher once and
  only run forwards;
- *shard writers* (one fractional-CPU actor beside each replica) encode a
  unit's shard and commit it (shard object, then marker), while the teacher
  is already on its next unit.

A planner thread on the driver feeds units into a bounded queue; the main
thread dispatches them (skipping verified commits of a resumed run) and
collects results through Ray. No polling of storage between workers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from softlabels.labeler.config import LabelConfig
from softlabels.labeler.corpus import Corpus, CorpusTotals
from softlabels.labeler.plan import (PlanCounts, Rendering, Unit, build_sequences, iter_units, read_and_tokenize,
                                    reading_tokenizer, unit_digest)
from softlabels.labeler.progress import Progress
from softlabels.labeler.replicas import JobFailed, Replicas, _first_batch, _first_line, _unwrapped
from softlabels.labeler.seams import UnitInput
from softlabels.schemas import SequenceConfig, ShardInfo
from softlabels.schemas.errors import UserError

from softlabels.common.commit import Commit, OutputError
from softlabels.common.crash import crash_point

log = logging.getLogger(__name__)

TASK_CPUS = 0.25  # read/write tasks: small, so they fit beside the teacher on any node
IN_FLIGHT = 2  # units queued per replica: the next one is ready when the current one ends
MAX_SKIPPED_LOGGED = 20
UNITS_AHEAD = 64  # planned units buffered on the driver (bounds its memory)


class NothingToLabel(UserError):
    """The corpus was read in full and holds no text (every document empty or skipped)."""


@dataclass
class Outcome:
    shards: list[ShardInfo]  # in unit order
    corpus: CorpusTotals
    resumed: int
    labeled_tokens: int
    label_s: float
    replicas: int
    units_per_node: dict[str, int] = field(default_factory=dict)
    first_batch: float | None = None  # when a teacher first finished a batch (epoch seconds)
    teacher_loaded: float | None = None  # when that teacher had loaded
    plan: PlanCounts = field(default_factory=PlanCounts)
    generated_tokens: int = 0  # --generate-with: response tokens of the units this run committed


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


class Pipeline:
    """One labeling run's Ray work; :meth:`run` returns when every unit is committed."""

    def __init__(
        self,
        ray: Any,
        cfg: LabelConfig,
        replicas: Replicas,
        tokenizer: Any,
        tokenizer_fp: str,
        corpus: Corpus,
        seq_cfg: SequenceConfig,
        done: dict[str, Commit],
        vocab_size: int,
        owner: tuple[int, str] | None = None,
        record: Callable[..., None] | None = None,
        rendering: Rendering | None = None,
        generation: Any = None,
    ) -> None:
        self.ray, self.cfg = ray, cfg
        self.replicas = replicas  # started by the job as soon as Ray was up (:func:`~softlabels.labeler.replicas.start_replicas`)
        self.vocab_size = vocab_size  # every id the teacher can emit is below it
        self.owner = owner  # the driver's claim on the output: writers check it before each commit
        # Told of every committed unit, in plan position (LabelSetWriter.record: the commit index).
        self.record = record or (lambda *a, **k: None)
        # With --limit no document can contribute more tokens than limit x max_length sequences hold.
        self.max_doc_tokens = cfg.limit * cfg.max_length if cfg.limit else None
        self.tokenizer, self.tokenizer_fp = tokenizer, tokenizer_fp
        self.corpus, self.seq_cfg, self.done = corpus, seq_cfg, done
        self.totals = CorpusTotals()
        self.rendering = rendering or Rendering()
        self.generation = generation  # labeler.generation.Generation: prompts are completed before labeling
        self.counts = PlanCounts()
        self.read_fraction = 0.0
        self.stop = threading.Event()
        self.units: queue.Queue[Any] = queue.Queue(maxsize=UNITS_AHEAD)

    # -- planner thread --------------------------------------------------------
    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.units.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _documents(self) -> Iterator[tuple[str, np.ndarray]]:
        """Tokenized documents in corpus order, read by parallel tasks a bounded number ahead."""
        ray = self.ray
        read = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(read_and_tokenize)
        # Conversations need the HF tokenizer (its chat template, offsets); text and completions the fast backend.
        tok = self.tokenizer if self.rendering.format == "chat" else reading_tokenizer(self.tokenizer)
        reader, tok, rendering = ray.put(self.corpus.reader), ray.put(tok), ray.put(self.rendering)
        # With --limit a read task stops once its own block fills the limit (the reading tokenizer has no EOS id).
        enough = ray.put((self.seq_cfg, self.tokenizer.eos_token_id)) if self.cfg.limit else None
        blocks = self.corpus.blocks()
        weights = [b.weight for b in blocks]
        total, seen = sum(weights), 0
        lookahead = max(2, int(ray.cluster_resources().get("CPU", 2)))
        inflight: deque[Any] = deque()
        nxt = 0
        skipped = 0
        while inflight or nxt < len(blocks):
            while nxt < len(blocks) and len(inflight) < lookahead:
                inflight.append((read.remote(reader, blocks[nxt], tok, self.max_doc_tokens, rendering, enough), blocks[nxt]))
                nxt += 1
            ref, block = inflight.popleft()
            try:
                docs, stats = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise _unwrapped(e)
            self.totals.add(stats)
            for row in stats.skipped:
                skipped += 1
                if skipped <= MAX_SKIPPED_LOGGED:
                    log.warning("skipped %s", row)
                elif skipped == MAX_SKIPPED_LOGGED + 1:
                    log.warning("skipping more bad rows; the summary gives the count")
            seen += weights[block.index]
            self.read_fraction = seen / total
            yield from docs
        # With --limit, reading stops early: blocks still in flight finish and are dropped
        # (ray.cancel on them makes Ray print alarming errors for a normal stop).

    def _plan(self) -> None:
        try:
            if self.generation is not None:
                from softlabels.labeler.generation import prompt_sequences

                sequences = prompt_sequences(self._documents(), self.cfg.samples_per_prompt, self.cfg.limit)
            else:
                sequences = build_sequences(self._documents(), self.tokenizer.eos_token_id, self.seq_cfg, self.counts)
            grow = 0 if self.generation is None else self.cfg.max_new_tokens
            for unit in iter_units(sequences, self.cfg.shard_tokens, grow):
                if self.stop.is_set():
                    return
                self._put(unit)
                crash_point("labeler.planned")
            self._put(_DONE)
        except BaseException as e:  # handed to the main thread, which raises it
            self._put(_Failed(e))

    # -- teacher replicas ------------------------------------------------------
    def _actors(self) -> tuple[list[Any], list[str]]:
        """The replicas loaded, a shard writer beside each."""
        ray, cfg = self.ray, self.cfg
        from softlabels.labeler.actor import ShardWriterActor

        replicas = self.replicas
        actors, node_ids = replicas.actors, replicas.nodes()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        writer_cls = ray.remote(max_restarts=3, max_task_retries=3, max_concurrency=IN_FLIGHT)(ShardWriterActor)
        self.writers = [
            writer_cls.options(
                num_cpus=TASK_CPUS, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)
            ).remote(cfg.output, cfg.storage_options, cfg.top_k, self.tokenizer_fp, cfg.label_encoding, self.vocab_size,
                     self.owner)
            for node in node_ids
        ]
        ready = [w.ready.remote() for w in self.writers]
        try:
            ray.get(replicas.loading)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise e.cause from None  # e.g. --top-k above the teacher's head rows: one line, exit 2
            raise JobFailed(f"a teacher replica failed to load: {_first_line(e.cause or e)}") from e
        except ray.exceptions.RayActorError as e:
            raise JobFailed(f"a teacher replica failed to load: {_first_line(e)}") from e
        ray.get(ready)
        log.info(
            "%d teacher replica(s) on %d node(s) (%s, %s%s)", len(actors), len(set(node_ids)), replicas.device, replicas.dtype,
            "" if replicas.threads is None else f", {replicas.threads} torch threads each",
        )
        return actors, node_ids

    # -- main loop ---------------------------------------------------------------
    def run(self) -> Outcome:
        ray, cfg = self.ray, self.cfg
        planner = threading.Thread(target=self._plan, name="planner", daemon=True)
        planner.start()  # tokenizing starts while the teachers load
        try:
            actors, node_ids = self._actors()
            progress = Progress(what="tokens" if self.generation is None else "responses")
            count = (lambda u, t: t) if self.generation is None else (lambda u, t: len(u.sequences))
            t0 = time.time()
            shards: dict[int, ShardInfo] = {}
            labeling: dict[Any, int] = {}  # label ref -> replica
            writing: dict[Any, tuple[Unit, int, str]] = {}  # commit ref -> (unit, replica, input digest)
            load = [0] * len(actors)
            per_node: dict[str, int] = {}
            planning, resumed, labeled, generated = True, 0, 0, 0
            gen_job = None if self.generation is None else ray.put(self.generation.job)
            try:
                while planning or labeling or writing:
                    while planning and min(load) < IN_FLIGHT:
                        try:
                            item = self.units.get(timeout=0.05 if (labeling or writing) else 0.5)
                        except queue.Empty:
                            break
                        if item is _DONE:
                            planning = False
                            progress.plan_complete()
                            break
                        if isinstance(item, _Failed):
                            raise item.error
                        unit: Unit = item
                        progress.planned(count(unit, unit.tokens), self.read_fraction)
                        digest = unit_digest(unit)
                        commit = self.done.get(unit.name)
                        if commit is not None and commit.inputs == digest:
                            shards[unit.index] = commit.info
                            self.record(unit.index, unit.name, commit.info, digest, resumed=True)
                            resumed += 1
                            progress.done(count(unit, unit.tokens), resumed=True)
                            continue
                        if commit is not None and commit.inputs is not None:
                            raise OutputError(
                                f"output {cfg.output}: committed unit {unit.name} was labeled from different "
                                "input than planned now (the corpus changed); use --overwrite to start afresh"
                            )
                        r = load.index(min(load))
                        payload = ray.put(UnitInput.of(unit.sequences, lead=unit.index == 0))
                        if self.generation is not None:  # the unit's prompts completed, then labeled as any unit
                            payload = self.generation.actors[r].generate.remote(payload, gen_job)
                        label_ref = actors[r].label.remote(payload)
                        commit_ref = self.writers[r].write.remote(unit.name, payload, label_ref, digest)
                        labeling[label_ref] = r
                        writing[commit_ref] = (unit, r, digest)
                        load[r] += 1
                    if not (labeling or writing):
                        continue
                    ready, _ = ray.wait([*labeling, *writing], num_returns=1, timeout=0.2)
                    for ref in ready:
                        if ref in labeling:
                            load[labeling.pop(ref)] -= 1  # errors surface through the unit's write
                            continue
                        unit, r, digest = writing.pop(ref)
                        shards[unit.index] = ShardInfo(**_get(ray, ref, unit.name))
                        self.record(unit.index, unit.name, shards[unit.index], digest)
                        labeled += shards[unit.index].tokens
                        if self.generation is not None:
                            generated += shards[unit.index].trained or 0
                        per_node[node_ids[r]] = per_node.get(node_ids[r], 0) + 1
                        progress.done(count(unit, shards[unit.index].tokens), generated=self.generation is not None
                                      and shards[unit.index].trained or 0)
            finally:
                progress.close()
            label_s = time.time() - t0
            if not shards:
                c = self.counts
                long = (f"; {c.too_long} conversation(s) whose first trained turn does not fit --max-length "
                        f"{cfg.max_length}" if c.too_long else "") + (f"; {c.untrained} with nothing to train"
                                                                     if c.untrained else "")
                raise NothingToLabel(
                    f"corpus {cfg.corpus!r} has no text to label ({self.totals.documents} documents, "
                    f"{self.totals.empty} empty, {self.totals.skipped} skipped{long})"
                )
            return Outcome(
                shards=[shards[i] for i in range(len(shards))],
                corpus=self.totals,
                resumed=resumed,
                labeled_tokens=labeled,
                label_s=label_s,
                replicas=len(actors),
                units_per_node=per_node,
                **dict(zip(("teacher_loaded", "first_batch"), _first_batch(ray, actors))),
                plan=self.counts,
                generated_tokens=generated,
            )
        finally:
            self.stop.set()


def _get(ray: Any, ref: Any, name: str) -> Any:
    """``ray.get`` that raises a worker's user error as itself (one line for the user).

    Any other error in a worker is a bug: the RayTaskError propagates with the
    worker's traceback. A replica that died past its restarts is ``JobFailed``.
    """
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        raise _unwrapped(e) from None
    except ray.exceptions.RayActorError as e:
        raise JobFailed(f"unit {name}: its teacher replica died past its restarts ({_first_line(e)})") from e


