"""How the student is spread over the ranks: one module for student + loss, DDP or FSDP2 (``--fsdp``).

DDP keeps a whole student on every rank. FSDP2 (``fully_shard``) keeps a ``1/world`` share of
every parameter, gradient and optimizer state per rank, gathering a layer's weights only while
it runs: students that do not fit one device. Each decoder layer is its own group and
:class:`KDModule` (student + loss) is the root, so the trainer's split forward (body, then the
chunked loss on the head's weight) runs inside FSDP's hooks, and a tied head stays tied.

Sharded checkpoints are written with ``torch.distributed.checkpoint`` (DCP): every rank writes
its own share, in parallel (DCP can reshard them for another number of ranks; only a resume on
the same number is tested). The finished
student is gathered once, on rank 0, and saved with ``save_pretrained`` like any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from softlabels.schemas import resolve_url
from softlabels.schemas.errors import UserError
from softlabels.trainer.config import TrainConfig, resolve_loss, resolve_weights
from softlabels.trainer.data import model_inputs
from softlabels.trainer.evaluate import score_batch
from softlabels.trainer.losses import chunked_loss


class KDModule(torch.nn.Module):
    """Student + loss as one module, so DDP sees (and syncs) the whole forward, and FSDP hooks it."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        body, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = body(**model_inputs(batch, self.model)).last_hidden_state
        # train() resolves the loss; built directly, an unset one is the default (another tokenizer's: its batches say)
        loss = cfg.loss or resolve_loss(None, "kd_mask" in batch)
        w = resolve_weights(cfg.alpha, cfg.chunk_weight, "kd_mask" in batch, "chunk_len" in batch, loss=loss,
                            chunk_distance=cfg.chunk_distance)
        return chunked_loss(hidden, head, loss, batch, cfg.temperature, w["alpha"], cfg.head_chunk, w["chunk_weight"],
                            cfg.reverse_weight, cfg.importance_cap, w["chunk_distance"])

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """Held-out sums of one batch (:func:`~softlabels.trainer.evaluate.score_batch`)."""
        body, head = self.model.get_decoder(), self.model.get_output_embeddings()
        return score_batch(body(**model_inputs(batch, self.model)).last_hidden_state, head, batch, self.cfg.head_chunk)


def wrap(kd: KDModule, world: int, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """What the training step calls: ``kd`` itself, under DDP, or sharded in place by FSDP2."""
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(kd) if world > 1 else kd
    if world < 2:
        raise UserError("--fsdp shards the student over the ranks torchrun starts: launch with "
                        "torchrun --nproc-per-node N (N >= 2), or drop --fsdp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = getattr(kd.model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UserError(f"--fsdp: the student ({type(kd.model).__name__}) has no list of decoder layers to shard")
    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(kd, mesh=mesh)  # the root: embeddings, the (tied) head and the final norm
    register_fsdp_forward_method(kd, "score")
    return kd


def accumulating(step_fn: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce of a micro-batch that is not the last of its step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(step_fn, "no_sync"):  # DDP
        return step_fn.no_sync()
    if hasattr(step_fn, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused() -> Iterator[None]:
            step_fn.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                step_fn.set_requires_gradient_sync(True)

        return paused()
    return contextlib.nullcontext()


def as_number(t: torch.Tensor) -> float:
    """A gradient norm as a float (FSDP2's is a replicated DTensor)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _dcp_storage(url: str, storage_options: Mapping[str, Any] | None, write: bool) -> Any:
    import torch.distributed.checkpoint as dcp

    fs, root = resolve_url(url, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return dcp.FileSystemWriter(root) if write else dcp.FileSystemReader(root)
    # fsspec URLs (s3://...): DCP's fsspec storage (a private module in torch 2.13, stable in use since 2.2)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    return FsspecWriter(url, **dict(storage_options or {})) if write else FsspecReader(url, **dict(storage_options or {}))


def save_sharded(url: str, storage_options: Mapping[str, Any] | None, model: torch.nn.Module,
                 opt: torch.optim.Optimizer) -> None:
    """Every rank writes its share of the weights and optimizer state (DCP); a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=_dcp_storage(url, storage_options, write=True))


def load_sharded(url: str, storage_options: Mapping[str, Any] | None, model: torch.nn.Module,
                 opt: torch.optim.Optimizer) -> None:
    """Read a :func:`save_sharded` checkpoint into ``model`` and ``opt``, on any number of ranks; a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=_dcp_storage(url, storage_options, write=False))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_student(model: torch.nn.Module) -> torch.nn.Module | None:
    """The sharded student gathered whole on rank 0 (None elsewhere) as a plain model, to save; a collective.

    Built on the meta device and given the gathered tensors, so rank 0 holds the weights once; buffers
    that are not saved (rotary frequencies) stay on the meta device: for ``save_pretrained``, not a forward.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):  # the student's own class (remote code included), no second random init
        plain = type(model)(model.config)
    plain.load_state_dict(full, assign=True)
    plain.tie_weights()
    return plain
