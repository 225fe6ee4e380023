"""The teacher actor: loads the teacher once, then labels and commits units."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from labeler.sink import LabelSetWriter
from labeler.teacher import TeacherRunner, TeacherSource
from schemas import Sample, encode_samples, sample_id, table_to_parquet_bytes


class TeacherActor:
    """Plain class; :mod:`labeler.job` wraps it with ``ray.remote``."""

    def __init__(
        self,
        source: TeacherSource,
        dtype: str,
        device: str,
        top_k: int,
        temperature: float,
        batch_tokens: int,
        head_chunk: int,
        trust_remote_code: bool,
        output: str,
        storage_options: dict[str, Any],
        threads: int,
        tokenizer_fp: str,
    ) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        # Ray sets OMP_NUM_THREADS=1 in workers; give torch the cores we planned for.
        torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()
        self.runner = TeacherRunner(source, dtype, device, top_k, temperature, batch_tokens, head_chunk, trust_remote_code)
        self.writer = LabelSetWriter(output, storage_options)
        self.top_k = top_k
        self.tokenizer_fp = tokenizer_fp

    def label_unit(self, name: str, sequences: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
        """Label one unit, write its shard and commit marker, return the ShardInfo as a dict."""
        labels = self.runner.label([ids for _, ids in sequences])
        samples = [
            Sample(sample_id(self.tokenizer_fp, ids), src, np.asarray(ids, dtype=np.int32), *lab)
            for (src, ids), lab in zip(sequences, labels)
        ]
        data = table_to_parquet_bytes(encode_samples(samples, self.top_k))
        info = self.writer.commit_unit(name, data, rows=len(samples), tokens=sum(len(s.input_ids) for s in samples))
        return asdict(info)

    def ping(self) -> bool:
        return True
