"""Loading the teacher and running it over sequences.

One code path for the built-in alias, a local HF directory and a hub id:
all end in ``from_pretrained``. The forward pass runs the model body, then
the LM head over chunks of positions (:mod:`labeler.topk`), so the full
``[batch, seq, vocab]`` logits never exist.
"""

from __future__ import annotations

import hashlib
import json
import time
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from softlabels.labeler.builtin import BUILTIN_TEACHERS, builtin_teacher_dir, cache_dir
from softlabels.labeler.seams import LabelSettings, UnitLabels
from softlabels.schemas import TeacherInfo
from softlabels.schemas.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherSource:
    """Where to load a teacher from, resolved from the user's ``--teacher``."""

    spec: str  # what the user typed
    path: str  # what from_pretrained gets: a local directory or a hub id
    display_name: str
    revision: str | None
    is_local: bool

    @property
    def is_builtin(self) -> bool:
        return self.spec in BUILTIN_TEACHERS


def resolve_teacher(spec: str, revision: str | None = None) -> TeacherSource:
    """Resolve ``--teacher``: a built-in alias, a local HF model directory, or a hub id."""
    if spec in BUILTIN_TEACHERS:
        path = builtin_teacher_dir(spec)
        return TeacherSource(spec, str(path), BUILTIN_TEACHERS[spec]["name"], None, True)
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"teacher directory {spec} has no config.json (not a Hugging Face model directory)")
        return TeacherSource(spec, str(p.resolve()), p.name, None, True)
    if spec.startswith((".", "/", "~")):
        raise UserError(f"teacher path {spec} does not exist")
    return TeacherSource(spec, spec, spec, revision, False)


def weights_sha256(path: str) -> str:
    """sha256 over a local model directory's weight files (names and bytes, sorted).

    Remembered in ``$SOFTLABELS_CACHE/weights-sha256.json`` by each file's name, size,
    modification and change times, inode and device (any rewrite, copy or touch changes one
    of them), so a rerun on unchanged weights does not hash gigabytes again.
    """
    files = sorted(
        f for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") and f.is_file()
    )
    stamp = [[f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
             for f in files for st in [f.stat()]]
    where, memo = str(Path(path).resolve()), _weights_memo()
    known = memo.get(where)
    if isinstance(known, dict) and known.get("files") == stamp and isinstance(known.get("sha256"), str):
        return known["sha256"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\x00")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    memo[where] = {"files": stamp, "sha256": h.hexdigest()}
    try:
        import fsspec

        from softlabels.common.files import write_whole

        write_whole(fsspec.filesystem("file"), str(_WEIGHTS_MEMO()), json.dumps(memo, indent=1).encode(),
                    f"write {_WEIGHTS_MEMO()}")
    except OSError as e:  # a read-only cache only costs the next run the hashing
        log.debug("could not remember the weights' sha256 in %s: %s", _WEIGHTS_MEMO(), e)
    return h.hexdigest()


def _WEIGHTS_MEMO() -> Path:
    return cache_dir() / "weights-sha256.json"


def _weights_memo() -> dict[str, Any]:
    try:
        memo = json.loads(_WEIGHTS_MEMO().read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def teacher_info(source: TeacherSource, dtype: str) -> TeacherInfo:
    """The manifest's record of the teacher."""
    return TeacherInfo(
        id=source.spec,
        revision=source.revision,
        weights_sha256=weights_sha256(source.path) if source.is_local else None,
        dtype=dtype,
    )


def load_tokenizer(source: TeacherSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path, revision=source.revision, trust_remote_code=trust_remote_code)


def pick_device_dtype(device: str | None, dtype: str | None) -> tuple[str, str]:
    """Defaults: CUDA + bf16 when a GPU is visible, else CPU + fp32 (torch is imported only to look)."""
    if device:
        dev = device
    else:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = dtype or ("bfloat16" if dev.startswith("cuda") else "float32")
    if dt not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be float32, bfloat16 or float16, got {dt!r}")
    return dev, dt


class TeacherRunner:
    """A loaded teacher that labels batches of token sequences."""

    def __init__(
        self,
        source: TeacherSource,
        dtype: str,
        device: str,
        settings: LabelSettings,
        trust_remote_code: bool = False,
        spread: bool = False,
    ) -> None:
        """``spread``: place the teacher's layers over every GPU this process sees (``device_map="auto"``;
        Ray gives an actor with ``num_gpus=N`` exactly N); inputs go to the first layer's device
        and hidden states follow the layers to the head's."""
        import torch
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"device_map": "auto"} if spread else {}
        self.model = AutoModelForCausalLM.from_pretrained(
            source.path,
            revision=source.revision,
            dtype=getattr(torch, dtype),
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
        if not spread:
            self.model.to(torch.device(device))
        self.model.eval()
        self.body = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        self.device = self.model.get_input_embeddings().weight.device
        self.head_device = self.head.weight.device
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.vocab = self.head.weight.shape[0]
        self.configure(settings)
        self.first_batch_at: float | None = None  # epoch seconds

    def configure(self, settings: LabelSettings) -> None:
        """The label settings (a loaded teacher can take another run's)."""
        if settings.top_k > self.vocab:
            raise UserError(f"--top-k {settings.top_k} exceeds the teacher's vocabulary of {self.vocab}")
        self.top_k, self.temperature = settings.top_k, settings.temperature
        self.batch_tokens, self.head_chunk = settings.batch_tokens, settings.head_chunk
        self.tail_samples = settings.tail_samples

    def batches(self, lengths: list[int], lead: bool = False) -> list[list[int]]:
        """Length-bucketed batches (indices), each with padded size <= batch_tokens; with ``lead`` the
        longest sequence alone first (a job's first unit: its first labels come after one sequence's forward).

        Deterministic in ``lengths`` and ``lead`` alone, so a unit is batched the same way
        on every run (part of what makes shard bytes reproducible).
        """
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        out: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            longest = lengths[cur[0]] if cur else lengths[i]
            if cur and longest * (len(cur) + 1) > self.batch_tokens:
                out.append(cur)
                cur = []
            cur.append(i)
        if cur:
            out.append(cur)
        if lead and len(out[0]) > 1:
            out[:1] = [out[0][:1], out[0][1:]]
        return out

    def label(self, sequences: Sequence[np.ndarray], trained: Sequence[np.ndarray | None] | None = None,
              doc_lengths: Sequence[tuple[int, ...] | None] | None = None, lead: bool = False) -> UnitLabels:
        """The labels of ``sequences``: top-k ids and log-probs ``[N, k]`` and the tail ``[N]``, flat in input order.

        ``trained``: per sequence, the positions to label (None: all); the LM head runs only there,
        so ``N`` counts trained positions. ``doc_lengths``: per sequence, the documents packed into it
        (None: one); each attends only within itself and its positions restart at 0. ``lead``: see :meth:`batches`.

        With ``tail_samples``, two extras ``[N, S]``: sampled tail ids and counts. The draws
        are seeded by the batch's tokens, so a unit labeled again (a resumed run) gets the
        same samples. Always the extra ``target_logprob`` ``[N]``: the log-prob of the token that follows each
        position in its sequence (NaN at a sequence's or packed document's last position), from the same head pass.
        """
        import torch
        from softlabels.common.packing import packed_inputs
        from softlabels.labeler.topk import topk_with_tail

        results: list[Any] = [None] * len(sequences)
        for batch in self.batches([len(s) for s in sequences], lead):
            maxlen = len(sequences[batch[0]])
            ids = torch.zeros((len(batch), maxlen), dtype=torch.long)
            mask = torch.zeros((len(batch), maxlen), dtype=torch.long)
            select = torch.zeros((len(batch), maxlen), dtype=torch.bool)
            follows = torch.full((len(batch), maxlen), -1, dtype=torch.long)  # the next token of the same document
            for row, i in enumerate(batch):
                n = len(sequences[i])
                ids[row, :n] = torch.from_numpy(np.asarray(sequences[i], dtype=np.int64))
                mask[row, :n] = 1
                m = None if trained is None else trained[i]
                select[row, :n] = True if m is None else torch.from_numpy(np.array(m, dtype=bool))
                follows[row, : n - 1] = ids[row, 1:n]
                if doc_lengths is not None and doc_lengths[i] is not None:
                    follows[row, torch.as_tensor(np.cumsum(doc_lengths[i]) - 1, dtype=torch.long)] = -1
            docs = [None if doc_lengths is None else doc_lengths[i] for i in batch]
            extra = packed_inputs(docs, maxlen, mask) if any(d is not None for d in docs) else {}
            with torch.inference_mode():
                hidden = self.body(
                    input_ids=ids.to(self.device), attention_mask=extra.pop("attention_mask", mask).to(self.device),
                    use_cache=False, **{k: v.to(self.device) for k, v in extra.items()},
                ).last_hidden_state
                # Only trained (real) positions go through the head (on its own device when spread).
                flat = hidden[select.to(hidden.device)].to(self.head_device)
                gen = None
                if self.tail_samples:
                    seed = hashlib.sha256(b"".join(np.asarray(sequences[i], np.int64).tobytes() for i in batch)).digest()
                    gen = torch.Generator(device=self.head_device).manual_seed(int.from_bytes(seed[:8], "little") >> 1)
                out = topk_with_tail(
                    flat, self.head, self.top_k, self.temperature, self.head_chunk, self.softcap, self.tail_samples, gen,
                    targets=follows[select],
                )
            start = 0
            names = ("topk_ids", "topk_logprobs", "tail_logprob",
                     *(("tail_sample_ids", "tail_sample_counts") if self.tail_samples else ()), "target_logprob")
            assert len(names) == len(out), (names, len(out))
            for row, i in enumerate(batch):
                n = int(select[row].sum())
                results[i] = {name: a[start : start + n].numpy() for name, a in zip(names, out)}
                start += n
            if self.first_batch_at is None:
                self.first_batch_at = time.time()  # the run's start-up ends here (its summary reports it)
        return UnitLabels.concat(results)
