"""``--precision``: the autocast dtype of the student's forward, and fp16's loss scaler.

The weights and the optimizer stay fp32 in every mode; autocast runs the matmuls in
bf16 or fp16. fp16 has a narrow exponent range, so its loss is scaled up before
backward (``torch.amp.GradScaler``) and a step whose gradients overflowed is skipped
while the scale is lowered: an infinite gradient norm there is routine, not divergence.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from softlabels.schemas.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str | None, device: torch.device) -> str:
    """``precision`` or, for None (auto), bf16 on CUDA and fp32 elsewhere.

    Raises:
        UserError: this torch cannot autocast to that dtype on ``device`` (checked by running one matmul).
    """
    name = precision or ("bf16" if device.type == "cuda" else "fp32")
    if name == "fp32":
        return name
    x = torch.ones(2, 2, device=device)
    try:
        # An unsupported dtype does not raise: torch warns and turns autocast off, so look at the result.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=DTYPES[name]):
                got = (x @ x).dtype
    except RuntimeError as e:
        raise UserError(f"--precision {name}: torch {torch.__version__} cannot autocast on {device.type} "
                        f"({str(e).splitlines()[0]}); use --precision fp32") from e
    if got != DTYPES[name]:
        raise UserError(f"--precision {name}: torch {torch.__version__} has no {DTYPES[name]} autocast on "
                        f"{device.type}; use --precision fp32")
    return name


@contextlib.contextmanager
def autocast(name: str, device: torch.device) -> Iterator[None]:
    """The forward's autocast for a resolved precision (a no-op for fp32)."""
    with torch.autocast(device.type, dtype=DTYPES[name], enabled=name != "fp32"):
        yield


def grad_scaler(name: str, device: torch.device, sharded: bool = False) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16; a disabled one passes ``scale``/``unscale_``/``step`` straight through.

    ``sharded`` (``--fsdp``): each rank sees only its share of the gradients, so whether any overflowed
    is agreed over all ranks (``ShardedGradScaler``), and every rank skips the same steps.
    """
    if sharded and name == "fp16":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type, enabled=name == "fp16")
