"""Training checkpoints on a local path or any fsspec URL.

Layout under the checkpoint directory::

    step-000100/model.safetensors       student weights (tied weights stored once)
    step-000100/optimizer.pt            optimizer + scheduler state
    step-000100/progress.json           step, eval before training, the data position of every rank's readers
    step-000100/state-rank0.pt          tokens, RNG states (one per rank)
    latest                              "step-000100", written last (the commit)

Objects are written whole, then ``latest`` names the finished checkpoint, so
a crash while saving leaves the previous checkpoint in force.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from softlabels.common.crash import crash_point
from softlabels.common.files import sweep_partial_writes, write_whole
from softlabels.schemas import join_url, resolve_url, retry_io
from softlabels.schemas.errors import UserError

log = logging.getLogger(__name__)
LATEST = "latest"
# Run-record keys added after checkpoints already existed: a checkpoint that lacks one is not checked for it
# (it still resumes). The student tokenizer's fingerprint: issue 29.
RECORDED_LATER = ("student_tokenizer_fingerprint", "chunk_weight", "reverse_weight", "importance_cap",  # (0.8, 0.9)
                  "chunk_distance")  # (0.11)


def rng_state() -> dict[str, Any]:
    """Every RNG's state in types ``torch.load(weights_only=True)`` accepts (no numpy objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors (same storage) kept once: safetensors refuses shared storage."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


class CheckpointStore:
    """Saves and finds checkpoints under one directory or URL."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = resolve_url(self.url, storage_options)

    def _write(self, rel: str, data: bytes) -> None:
        write_whole(self.fs, join_url(self.root, rel), data, f"write {join_url(self.url, rel)}")

    def _read(self, rel: str) -> bytes:
        return retry_io(lambda: self.fs.cat_file(join_url(self.root, rel)), f"read {join_url(self.url, rel)}")

    def latest(self) -> str | None:
        """Name of the last committed checkpoint, or None."""
        self.fs.invalidate_cache()
        sweep_partial_writes(self.fs, self.root)
        try:
            return self._read(LATEST).decode().strip() or None
        except FileNotFoundError:
            return None

    def path(self, name: str, rel: str) -> str:
        """The URL of ``rel`` inside checkpoint ``name`` (``sharded``: the DCP folder of an FSDP run)."""
        return join_url(self.url, f"{name}/{rel}")

    def save_shared(self, name: str, model: torch.nn.Module | None, optimizer_state: dict[str, Any],
                    run: dict[str, Any]) -> None:
        """What every rank holds the same copy of: written by rank 0. ``run``: what a resume must keep.
        ``model`` None: the weights are sharded (written by every rank, :mod:`softlabels.trainer.sharding`)."""
        from safetensors.torch import save

        self._write(f"{name}/run.json", (json.dumps(run, indent=2, sort_keys=True) + "\n").encode())
        if model is not None:
            self._write(f"{name}/model.safetensors", save(_unique_tensors(model)))
        self._write(f"{name}/optimizer.pt", _torch_bytes(optimizer_state))

    def recorded(self, name: str) -> dict[str, Any]:
        """The settings checkpoint ``name`` recorded (``{}`` where it records none or they cannot be read:
        :meth:`check_resume` says why)."""
        try:
            stored = json.loads(self._read(f"{name}/run.json"))
        except (FileNotFoundError, ValueError):
            return {}
        return stored if isinstance(stored, dict) else {}

    def check_resume(self, name: str, run: dict[str, Any], allow_changed: tuple[str, ...] = (),
                     changeable: tuple[str, ...] = ()) -> None:
        """Refuse to resume checkpoint ``name`` with settings other than those it recorded (each named).

        Raises:
            UserError: a difference outside ``allow_changed``; the message says which of them
                ``changeable`` settings ``--allow-changed`` would let through.
        """
        if not self.fs.exists(join_url(self.root, f"{name}/progress.json")) and self.fs.exists(
                join_url(self.root, f"{name}/state-rank0.pt")):
            raise UserError(f"checkpoint {join_url(self.url, name)} was written by softlabels < 0.6, whose data position "
                            "this version cannot continue exactly: finish that run with softlabels 0.5, or start a new one")
        try:
            stored = json.loads(self._read(f"{name}/run.json"))
        except FileNotFoundError:
            log.warning("checkpoint %s records no settings (written before 0.4.0): they are not checked", name)
            return
        except ValueError as e:
            raise UserError(f"checkpoint {join_url(self.url, name)}/run.json is not valid JSON ({e})") from e
        diffs = [f"{k}: checkpoint {_show(stored.get(k))}, now {_show(v)}" for k, v in run.items()
                 if k not in allow_changed and stored.get(k) != v and not (k in RECORDED_LATER and k not in stored)]
        if diffs:
            hint = [d.split(":")[0] for d in diffs if d.split(":")[0] in changeable]
            raise UserError(
                f"--resume from {join_url(self.url, name)} with other settings than the run it continues "
                f"({'; '.join(diffs)}); "
                + (f"--allow-changed {' --allow-changed '.join(hint)} accepts the change; " if hint else "")
                + "for a new run use another --output"
            )

    def save_progress(self, name: str, progress: dict[str, Any]) -> None:
        """Where the run is, the same for every rank (the data position of all of them): written by rank 0."""
        self._write(f"{name}/progress.json", (json.dumps(progress, sort_keys=True) + "\n").encode())

    def save_rank(self, name: str, rank: int, state: dict[str, Any]) -> None:
        self._write(f"{name}/state-rank{rank}.pt", _torch_bytes(state))

    def commit(self, name: str) -> None:
        crash_point("trainer.checkpoint-written")  # every file of `name` is written; `latest` still names the last one
        self._write(LATEST, name.encode())
        log.info("checkpoint %s saved to %s", name, self.url)

    def load(self, name: str, model: torch.nn.Module, rank: int,
             sharded: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """Load weights into ``model``; return ``(optimizer_state, progress, rank_state)``.

        ``rank_state`` is None for a rank the saved run did not have (resumed on more ranks).
        ``sharded``: the weights and optimizer state are read by :func:`~softlabels.trainer.sharding.load_sharded`.
        """
        where = join_url(self.url, name)
        try:
            progress = json.loads(self._read(f"{name}/progress.json"))
        except FileNotFoundError as e:
            raise UserError(f"checkpoint {where} was written by softlabels < 0.6, whose data position this version "
                            "cannot continue exactly: finish that run with softlabels 0.5, or start a new one") from e
        except ValueError as e:
            raise UserError(f"checkpoint {where}/progress.json is not valid JSON ({e})") from e
        if not sharded:
            self._load_weights(name, model)
        try:
            state = _torch_load(self._read(f"{name}/state-rank{rank}.pt"), join_url(self.url, f"{name}/state-rank{rank}.pt"))
        except FileNotFoundError:
            state = None
        return _torch_load(self._read(f"{name}/optimizer.pt"), join_url(self.url, f"{name}/optimizer.pt")), progress, state


    def _load_weights(self, name: str, model: torch.nn.Module) -> None:
        from safetensors.torch import load

        try:
            weights = load(self._read(f"{name}/model.safetensors"))
        except FileNotFoundError as e:
            raise UserError(f"checkpoint {join_url(self.url, name)} holds sharded weights (an --fsdp run): "
                            "resume it with --fsdp") from e
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # tensor shapes differ: another student
            raise UserError(f"checkpoint {join_url(self.url, name)} does not fit this student "
                            f"({str(e).strip().splitlines()[-1].strip()[:200]})") from e
        tied = set(model.state_dict()) - set(_unique_tensors(model))
        if unexpected or set(missing) - tied:
            raise UserError(
                f"checkpoint {join_url(self.url, name)} does not fit this student "
                f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )


def _show(value: Any) -> str:
    """A recorded setting as a message shows it: fingerprints (``sha256:`` + 64 hex) cut to their first 12 hex."""
    if isinstance(value, str) and value.startswith("sha256:") and len(value) > 19:
        return value[:19] + "..."
    return repr(value)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(data: bytes, where: str) -> Any:
    # weights_only: tensors and plain containers only, so a checkpoint (perhaps fetched from a
    # shared bucket) cannot run code when loaded. Everything we save fits (see rng_state).
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint {where} holds objects other than tensors and plain data (refused to unpickle them): "
                         f"{str(e).splitlines()[0]}") from e
