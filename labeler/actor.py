"""What runs on Ray workers: the teacher actor, and the shard writer beside it.

The teacher actor loads the teacher once and only runs forwards; encoding a
unit's shard and writing it (plus its commit marker) happens in a writer
actor on the same node, so the teacher goes straight on to its next unit
while the last one is compressed and uploaded. Writers are long-lived (not a
task per unit) so no worker process is started mid-run.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from softlabels.labeler.seams import LabelSettings, UnitInput, UnitLabels
from softlabels.labeler.teacher import TeacherRunner, TeacherSource, resolve_teacher
from softlabels.schemas import Encoding, Sample, encode_samples, sample_id, table_to_parquet_bytes

from softlabels.common.commit import LabelSetWriter
from softlabels.common.crash import crash_point
from softlabels.common.malloc import keep_freed_memory

class TeacherActor:
    """Plain class; :mod:`labeler.pipeline` wraps it with ``ray.remote``."""

    def __init__(
        self,
        source: TeacherSource,
        dtype: str,
        device: str,
        settings: LabelSettings,
        trust_remote_code: bool,
        threads: int | None,
        gpus: int = 1,
    ) -> None:
        # Nothing heavy here: the driver learns the replica's node from a started process at once and
        # starts the shard writers beside it while the teacher loads (:meth:`load`).
        self.source, self.dtype, self.device, self.settings = source, dtype, device, settings
        self.trust_remote_code, self.threads, self.gpus = trust_remote_code, threads, gpus
        self.runner: TeacherRunner | None = None
        self.loaded_at: float | None = None  # epoch seconds: the teacher is ready (the summary's start-up split)

    def load(self) -> bool:
        """Load the teacher (once; a restarted replica loads again on its first unit)."""
        if self.runner is None:
            import torch
            from transformers.utils import logging as hf_logging

            keep_freed_memory()  # this worker process is the replica's own (common/malloc.py)
            # Ray sets OMP_NUM_THREADS=1 in workers; give torch the cores we planned for.
            if self.threads:
                torch.set_num_threads(self.threads)
            hf_logging.disable_progress_bar()
            source = self.source
            if source.is_builtin:
                # The driver's cache path may not exist on this node: fetch/convert here.
                source = resolve_teacher(source.spec, source.revision)
            self.runner = TeacherRunner(source, self.dtype, self.device, self.settings, self.trust_remote_code,
                                        spread=self.gpus > 1)
            import time

            self.loaded_at = time.time()
        return True

    def label(self, unit: UnitInput) -> UnitLabels:
        """The unit's labels, log-probs in fp32 (not what the shard stores: lossy encodings measure
        their error against them)."""
        self.load()
        labels = self.runner.label(unit.input_ids, unit.trained, unit.doc_lengths, lead=unit.lead)
        crash_point("labeler.labeled")  # the unit is labeled, nothing of it written yet
        return labels

    def generate(self, unit: UnitInput, job: Any) -> UnitInput:
        """``--generate-with teacher``: the unit's prompts completed by this teacher (labeler.generation)."""
        from softlabels.labeler.generation import complete_unit

        self.load()
        return complete_unit(self.runner.model, unit, job)

    def new_run(self, settings: LabelSettings) -> None:
        """A kept replica starts another run (labeler.replicas.KEEP_TEACHERS_ENV) with that run's label settings
        (the loaded model stays); its first batch is to come."""
        self.settings = settings
        if self.runner is not None:
            self.runner.configure(settings)
            self.runner.first_batch_at = None

    def first_batch_at(self) -> tuple[float | None, float | None]:
        """When this replica had its teacher loaded and finished its first batch (epoch seconds, this node's
        clock), where it has."""
        return self.loaded_at, None if self.runner is None else self.runner.first_batch_at

    def node(self) -> str:
        """The Ray node this replica runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()


def encode_shard(
    unit: UnitInput, labels: UnitLabels, top_k: int, tokenizer_fp: str, encoding: Encoding, vocab_size: int
) -> bytes:
    """One unit's Parquet shard bytes (deterministic: same unit and labels, same bytes)."""
    samples = [
        Sample(sample_id(tokenizer_fp, ids), src, np.asarray(ids, dtype=np.int32), **labels.sequence(i),
               trained=unit.mask(i), doc_lengths=None if unit.docs(i) is None else np.asarray(unit.docs(i), np.int32),
               spans=unit.span(i), sampler_logprob=unit.sampler(i))
        for i, (src, ids) in enumerate(zip(unit.sources, unit.input_ids))
    ]
    return table_to_parquet_bytes(encode_samples(samples, top_k, encoding, vocab_size))


class ShardWriterActor:
    """Encodes and commits units next to a teacher replica (same node, warm storage client)."""

    def __init__(
        self, output: str, storage_options: dict[str, Any], top_k: int, tokenizer_fp: str, encoding: Encoding,
        vocab_size: int, owner: tuple[int, str] | None = None,
    ) -> None:
        self.writer = LabelSetWriter(output, storage_options)
        self.writer.follow(owner)  # every commit first checks that the driver still holds the output
        self.top_k, self.tokenizer_fp = top_k, tokenizer_fp
        self.encoding, self.vocab_size = encoding, vocab_size

    def write(self, name: str, unit: UnitInput, labels: UnitLabels, inputs: str) -> dict[str, Any]:
        """Encode and commit one unit (shard, then marker); returns its ShardInfo as a dict."""
        data = encode_shard(unit, labels, self.top_k, self.tokenizer_fp, self.encoding, self.vocab_size)
        return asdict(self.writer.commit_unit(name, data, rows=len(unit.input_ids), tokens=unit.tokens, inputs=inputs,
                                              trained=sum(labels.lengths)))

    def ready(self) -> bool:
        return True
