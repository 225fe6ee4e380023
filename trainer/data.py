"""Streaming a label set into training batches.

:class:`LabelDataset` is a torch ``IterableDataset`` over a label set URL
(local or any fsspec URL). Shards are split over DDP ranks and DataLoader
workers with no overlap and no gaps; the shard order is shuffled per epoch
from a seed. A held-out split is chosen by ``sample_id`` hash, so eval never
sees a training sample, whatever the shard layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from schemas import LabelSet, Sample, open_label_set


def in_eval_split(sample_id: str, eval_fraction: float) -> bool:
    """Deterministic held-out membership from the content address."""
    return int(sample_id[:8], 16) / 2**32 < eval_fraction


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LabelDataset(IterableDataset):
    """Samples of a label set as dicts of tensors.

    Args:
        split: "train" (samples outside the held-out fraction), "eval" (inside it) or "all".
        epochs: passes over the data; ``None`` repeats forever (training).
        shuffle: shuffle shard order each epoch (seeded by ``seed`` + epoch).
        verify: check each shard's size and sha256 against the manifest.
    """

    def __init__(
        self,
        url: str | LabelSet,
        storage_options: Mapping[str, Any] | None = None,
        split: str = "train",
        eval_fraction: float = 0.05,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = 1,
        verify: bool = True,
    ) -> None:
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be train, eval or all, got {split!r}")
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
        self.labels = url if isinstance(url, LabelSet) else open_label_set(url, storage_options)
        self.split, self.eval_fraction = split, eval_fraction
        self.seed, self.shuffle, self.epochs, self.verify = seed, shuffle, epochs, verify

    @property
    def manifest(self):
        return self.labels.manifest

    def _keep(self, s: Sample) -> bool:
        if self.split == "all":
            return True
        return in_eval_split(s.sample_id, self.eval_fraction) == (self.split == "eval")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = _rank_world()
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = rank * nworkers + wid, world * nworkers
        shards = list(self.labels.shards)
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = np.arange(len(shards))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(shards))
            for i in order[slot::slots]:
                for s in self.labels.read_shard(shards[i], verify=self.verify):
                    if self._keep(s):
                        yield sample_to_tensors(s)
            epoch += 1


def sample_to_tensors(s: Sample) -> dict[str, torch.Tensor]:
    # Decoded arrays may be read-only views of Arrow buffers: torch.tensor copies.
    return {
        "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
        "topk_ids": torch.tensor(s.topk_ids, dtype=torch.long),
        "topk_logprobs": torch.tensor(s.topk_logprobs, dtype=torch.float32),
        "tail_logprob": torch.tensor(s.tail_logprob, dtype=torch.float32),
    }


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into a batch.

    Adds ``attention_mask`` (real tokens), ``label_mask`` (positions with a
    teacher label: every real position) and ``targets`` (the true next token,
    -100 at the last real position and on padding).
    """
    b = len(samples)
    t = max(len(s["input_ids"]) for s in samples)
    k = samples[0]["topk_ids"].shape[-1]
    out = {
        "input_ids": torch.zeros((b, t), dtype=torch.long),
        "attention_mask": torch.zeros((b, t), dtype=torch.long),
        "topk_ids": torch.zeros((b, t, k), dtype=torch.long),
        "topk_logprobs": torch.zeros((b, t, k), dtype=torch.float32),
        "tail_logprob": torch.zeros((b, t), dtype=torch.float32),
        "targets": torch.full((b, t), -100, dtype=torch.long),
    }
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        out["input_ids"][i, :n] = s["input_ids"]
        out["attention_mask"][i, :n] = 1
        out["topk_ids"][i, :n] = s["topk_ids"]
        out["topk_logprobs"][i, :n] = s["topk_logprobs"]
        out["tail_logprob"][i, :n] = s["tail_logprob"]
        out["targets"][i, : n - 1] = s["input_ids"][1:]
    out["label_mask"] = out["attention_mask"].bool()
    return out
