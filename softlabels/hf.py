"""A label set as a Hugging Face ``datasets`` dataset, with decoded columns (needs ``softlabels[hf]``).

::

    import softlabels
    ds = softlabels.to_hf_dataset("s3://bucket/labels/run1")                  # datasets.Dataset
    it = softlabels.to_hf_dataset("s3://bucket/labels/run1", streaming=True)  # datasets.IterableDataset

One row per sequence, whatever the set's encoding: ``sample_id``, ``source``,
``input_ids [L]`` int32, ``topk_ids [L][k]`` int32 (descending by log-prob),
``topk_logprobs [L][k]`` float32, ``tail_logprob [L]`` float32, and for sets labeled
with ``--tail-samples S`` also ``tail_sample_ids [L][S]`` and ``tail_sample_counts [L][S]``; sets written
since 0.8.0 (schema v6) ``target_logprob [L]`` float32 (the teacher's log-prob of the token that follows; NaN
where none does).
Sets with untrained positions (chat, prompt-completion, packing) also have ``trained [L]`` bool (the positions with labels: the label
columns then hold one row per trained position, ``T = sum(trained)`` rows, not ``L``), and packed
sets ``doc_lengths`` (the documents packed into the sequence).
Every shard is checked against the manifest's sha256 as it is read.

``split="eval"`` / ``"train"`` keep the trainer's held-out split (by ``sample_id`` hash, the samples
``softlabels train`` holds out, and ``softlabels eval`` scores, for the same ``eval_fraction``)::

    from softlabels.trainer.student import trained_eval_fraction   # no torch needed
    f = trained_eval_fraction("runs/student")                     # what the student was trained with (None: no record)
    held_out = softlabels.to_hf_dataset("s3://bucket/labels/run1", split="eval", eval_fraction=f or 0.05)

``Dataset`` writes the decoded rows to the ``datasets`` cache once (keyed by the
manifest's sha256, so a rewritten set is never served stale); ``IterableDataset``
streams shard by shard and splits shards over DataLoader workers.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from softlabels.common.cli import require_extra
from softlabels.schemas import open_label_set
from softlabels.schemas.errors import UserError
from softlabels.schemas.manifest import Manifest


def has_masks(m: Manifest) -> bool:
    """Whether the set leaves some positions untrained (chat, prompt-completion, packing): its rows then
    carry the ``trained`` column."""
    return (m.totals.trained is not None and m.totals.trained < m.totals.tokens) or m.sequence.packing


def features(manifest: Manifest) -> Any:
    """The ``datasets.Features`` of a label set's decoded rows."""
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence  # datasets >= 4 names it List
    k, s = manifest.top_k, manifest.tail_samples
    cols = {
        "sample_id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "input_ids": seq(datasets.Value("int32")),
        "topk_ids": seq(seq(datasets.Value("int32"), length=k)),
        "topk_logprobs": seq(seq(datasets.Value("float32"), length=k)),
        "tail_logprob": seq(datasets.Value("float32")),
    }
    if s:
        cols["tail_sample_ids"] = seq(seq(datasets.Value("int32"), length=s))
        cols["tail_sample_counts"] = seq(seq(datasets.Value("uint8"), length=s))
    if manifest.target_logprobs:
        cols["target_logprob"] = seq(datasets.Value("float32"))
    if has_masks(manifest):
        cols["trained"] = seq(datasets.Value("bool"))
    if manifest.sequence.packing:
        cols["doc_lengths"] = seq(datasets.Value("int32"))
    return datasets.Features(cols)


SPLITS = ("all", "train", "eval")


def in_eval_split(sample_id: str, eval_fraction: float) -> bool:
    """The trainer's held-out rule (:func:`softlabels.trainer.data.in_eval_split`, which needs torch; a test holds
    the two equal): the first 32 bits of the content address, as a share of 2**32, below ``eval_fraction``."""
    return int(sample_id[:8], 16) / 2**32 < eval_fraction


def split_key(s: Any, m: Manifest) -> str:
    """What a row's held-out membership hashes: its content address (``sample_id``), or, in a set whose responses a
    model wrote (``generation``), its prompt's (sha256 of the prompt id, the ``source`` before ``#``), so every
    response to a held-out prompt is held out, in every set written from the same prompts (rounds, samples)."""
    if m.generation is None:
        return s.sample_id
    return hashlib.sha256(s.source.rpartition("#")[0].encode("utf-8")).hexdigest()


_OPEN: dict[tuple[str, str], Any] = {}  # (url, manifest sha256) -> LabelSet, opened once per process


def _label_set(url: str, storage_options: dict[str, Any], manifest_sha256: str) -> Any:
    """The label set, opened once per process: ``datasets`` calls the generator once per shard, and a
    10B-token set's manifest (300,000 shards) takes seconds to parse."""
    key = (url, manifest_sha256)
    if key not in _OPEN:
        ls = open_label_set(url, storage_options)
        if ls.manifest_sha256 != manifest_sha256:
            raise UserError(f"the label set at {url} changed while being read (its manifest is another one now)")
        _OPEN.clear()
        _OPEN[key] = ls
    return _OPEN[key]


def _rows(url: str, storage_options: dict[str, Any], manifest_sha256: str, shards: list[int], split: str = "all",
          eval_fraction: float = 0.05) -> Iterator[dict[str, Any]]:
    ls = _label_set(url, storage_options, manifest_sha256)
    m = ls.manifest
    for index in shards:
        for s in ls.read_shard(ls.shards[index]):
            if split != "all" and in_eval_split(split_key(s, m), eval_fraction) != (split == "eval"):
                continue
            row = {"sample_id": s.sample_id, "source": s.source, "input_ids": s.input_ids, "topk_ids": s.topk_ids,
                   "topk_logprobs": s.topk_logprobs, "tail_logprob": s.tail_logprob}
            if s.tail_sample_ids is not None:
                row.update(tail_sample_ids=s.tail_sample_ids, tail_sample_counts=s.tail_sample_counts)
            if m.target_logprobs:
                row["target_logprob"] = s.target_logprob
            if has_masks(m):
                row["trained"] = [True] * len(s.input_ids) if s.trained is None else s.trained
            if m.sequence.packing:
                row["doc_lengths"] = [len(s.input_ids)] if s.doc_lengths is None else s.doc_lengths
            yield row


def to_hf_dataset(
    url: str, storage_options: Mapping[str, Any] | None = None, streaming: bool = False, cache_dir: str | None = None,
    split: str = "all", eval_fraction: float = 0.05,
) -> Any:
    """The label set at ``url`` as a ``datasets.Dataset`` (or ``IterableDataset`` with ``streaming``).

    Args:
        split: ``"all"`` (every row, the default), ``"eval"`` (the held-out rows: those ``softlabels train`` never
            trains on and ``softlabels eval`` scores) or ``"train"`` (the others), chosen by ``sample_id`` hash
            exactly as the trainer does.
        eval_fraction: the held-out share for ``split`` (default 0.05, the trainer's default). For a trained
            student, the share it was trained with: ``softlabels.trainer.student.trained_eval_fraction(DIR)``
            (its ``softlabels_train.json``); a larger share holds rows it trained on.

    Raises:
        UserError: ``datasets`` is not installed, ``split`` or ``eval_fraction`` is not one of the above, or the
            label set cannot be opened (see :func:`softlabels.schemas.open_label_set`).
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not (isinstance(eval_fraction, (int, float)) and not isinstance(eval_fraction, bool) and 0 <= eval_fraction < 1):
        raise UserError(f"eval_fraction must be a share in [0, 1), got {eval_fraction!r}")
    require_extra("hf", "datasets")
    import datasets

    ls = open_label_set(url, storage_options)
    gen_kwargs = {
        "url": ls.url,
        "storage_options": dict(ls.storage_options),
        "manifest_sha256": ls.manifest_sha256,
        "shards": list(range(len(ls.shards))),  # (datasets splits this list over its workers)
        "split": split,
        "eval_fraction": float(eval_fraction),
    }
    feats = features(ls.manifest)
    if streaming:
        return datasets.IterableDataset.from_generator(_rows, features=feats, gen_kwargs=gen_kwargs)
    # The cache key: what the set holds (its manifest) and which of its rows, never the storage options (they
    # may hold secrets). The whole set keeps the key it always had.
    part = "" if split == "all" else f"-{split}-" + hashlib.sha256(repr(float(eval_fraction)).encode()).hexdigest()[:8]
    key = {"fingerprint": "softlabels-" + ls.manifest_sha256[:32] + part}
    if "fingerprint" not in inspect.signature(datasets.Dataset.from_generator).parameters:
        key = {}  # older datasets hash the generator's arguments instead
    return datasets.Dataset.from_generator(_rows, features=feats, gen_kwargs=gen_kwargs, cache_dir=cache_dir, **key)
