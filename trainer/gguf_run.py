"""Running a GGUF file in llama.cpp (through ``llama-cpp-python``): :class:`GGUFCausalLM` for ``eval`` and
``compare``, and the metadata a softlabels export carries. Writing one: :mod:`trainer.gguf`.

    from softlabels.trainer.gguf_run import load_gguf      # also importable from softlabels.trainer.gguf
    model = load_gguf("student-q4_k_m.gguf")                # logits = model.logits(input_ids, attention_mask)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from softlabels.schemas.errors import UserError

MAGIC = b"GGUF"


def need_llama_cpp() -> tuple[Any, Any]:
    """``(gguf, llama_cpp)``, or a one-line error naming the extra to install."""
    try:
        import gguf
        import llama_cpp
    except ImportError as e:
        raise UserError(f"GGUF export and evaluation need gguf and llama-cpp-python ({e.name} is not installed): "
                        "pip install 'softlabels[gguf]' (builds llama.cpp from source: a C++ compiler and cmake)") from e
    return gguf, llama_cpp


def is_gguf(path: str | Path) -> bool:
    """True for a file that starts with GGUF's magic (any file name)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return p.is_file() and f.read(4) == MAGIC
    except OSError:
        return False


def check_gguf(spec: str) -> None:
    """A model named ``*.gguf`` must be a GGUF file: one line otherwise (before anything loads)."""
    p = Path(spec)
    if not p.exists():
        raise UserError(f"model {spec} does not exist")
    if not p.is_file():
        raise UserError(f"model {spec} is not a file (a GGUF model is one .gguf file)")
    if not is_gguf(p):
        raise UserError(f"model {spec} is not a GGUF file (its first bytes are not 'GGUF')")


def metadata_string(path: str | Path, key: str) -> str | None:
    """A string value of a GGUF file's metadata (read with the ``gguf`` package, no model loaded); None if absent."""
    try:
        import gguf
    except ImportError as e:
        raise UserError("reading a GGUF file needs the gguf package: pip install 'softlabels[gguf]'") from e
    try:
        field = gguf.GGUFReader(str(path)).fields.get(key)
    except (ValueError, OSError) as e:  # a damaged or truncated file
        raise UserError(f"model {path}: not a readable GGUF file ({str(e)[:100]})") from e
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def train_record(path: str | Path) -> str | None:
    """The training record (JSON text) an export carries, None for a GGUF file from elsewhere."""
    return metadata_string(path, "softlabels.train_record")


def load_for_labels(spec: str, labels: Any, threads: int | None = None, n_ctx: int = 512) -> tuple[GGUFCausalLM, Any]:
    """``(model, tokenizer)`` of a GGUF file scored on ``labels``: the set's own tokenizer when the file records
    that one (``softlabels.tokenizer_fingerprint``), else the tokenizer transformers reads from the file."""
    from softlabels.trainer.student import check_tokenizer, load_label_tokenizer

    check_gguf(spec)
    fp = metadata_string(spec, "softlabels.tokenizer_fingerprint")
    if fp is not None and fp == labels.manifest.tokenizer.fingerprint and labels.manifest.tokenizer.files:
        tokenizer = load_label_tokenizer(labels)
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(Path(spec).parent), gguf_file=Path(spec).name)
        except Exception as e:  # transformers' GGUF reader: many error types for one cause
            raise UserError(f"model {spec}: its tokenizer cannot be read from the GGUF file ({str(e).splitlines()[0][:120]})") from e
    check_tokenizer(tokenizer, labels, spec)
    model = GGUFCausalLM(spec, threads=threads, n_ctx=max(n_ctx, labels.manifest.sequence.max_length))
    return model, tokenizer


class GGUFCausalLM:
    """A GGUF model run by llama.cpp on the CPU (through ``llama-cpp-python``).

    ``logits(input_ids, attention_mask)``: int64 ``[B, S]`` in, float32 ``[B, S, V]`` out (each row
    evaluated alone from an empty cache; padded positions 0); ``doc_lengths`` evaluates each packed
    document alone. :func:`trainer.evaluate.evaluate` and ``compare`` accept it in place of a model.
    ``meta``: the file's metadata (strings).
    """

    takes_documents = True

    def __init__(self, path: str | Path, threads: int | None = None, n_ctx: int = 2048) -> None:
        check_gguf(str(path))
        _, llama_cpp = need_llama_cpp()
        self.path = Path(path)
        self.threads = threads or os.cpu_count() or 1
        self.n_ctx = n_ctx
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                                   logits_all=True, n_threads=self.threads, n_threads_batch=self.threads,
                                   verbose=False)
        self.meta = dict(self.llm.metadata)
        self.vocab = int(self.llm.n_vocab())

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _run(self, ids: list[int]) -> Any:
        import numpy as np

        if len(ids) > self.n_ctx:
            raise UserError(f"{self.path}: a sequence of {len(ids)} tokens is longer than the context {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def logits(self, input_ids: Any, attention_mask: Any | None = None, doc_lengths: Any | None = None) -> Any:
        import torch

        ids = input_ids.detach().cpu()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.detach().cpu()
        out = torch.zeros(ids.shape[0], ids.shape[1], self.vocab, dtype=torch.float32)
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            docs = [int(d) for d in doc_lengths[b].tolist() if d > 0] if doc_lengths is not None else [n]
            at = 0
            for d in docs:
                if d:
                    out[b, at: at + d] = torch.from_numpy(self._run(ids[b, at: at + d].tolist()))
                at += d
        return out

    __call__ = logits

    def speed(self, prompt: list[int], new_tokens: int = 64, seconds: float = 3.0) -> dict[str, float]:
        """Prompt and generation tokens/s in llama.cpp: the fastest of repeated passes (at least 3, the first a
        warm-up, and ``seconds``) of evaluating ``prompt`` from an empty cache, then ``new_tokens`` greedy steps one
        at a time."""
        import numpy as np

        best_p = best_g = float("inf")
        start, passes = time.perf_counter(), 0
        while passes < 3 or time.perf_counter() - start < seconds:  # the first pass warms up
            self.llm.reset()
            t = time.perf_counter()
            self.llm.eval(prompt)
            tp = time.perf_counter() - t
            nxt = int(np.argmax(self.llm.scores[len(prompt) - 1]))
            t = time.perf_counter()
            for i in range(new_tokens):
                self.llm.eval([nxt])
                nxt = int(np.argmax(self.llm.scores[len(prompt) + i]))
            tg = time.perf_counter() - t
            if passes:
                best_p, best_g = min(best_p, tp), min(best_g, tg)
            passes += 1
        return {"prompt_tokens_per_s": len(prompt) / best_p, "gen_tokens_per_s": new_tokens / best_g,
                "threads": self.threads}

    @property
    def parameters_count(self) -> int:
        import gguf

        return sum(int(t.n_elements) for t in gguf.GGUFReader(str(self.path)).tensors)

    def close(self) -> None:
        self.llm.close()


def load_gguf(path: str | Path, threads: int | None = None, n_ctx: int = 2048) -> GGUFCausalLM:
    """Load a GGUF file (what ``softlabels export --format gguf`` wrote, or any llama.cpp model) to score it."""
    return GGUFCausalLM(path, threads, n_ctx)
