"""LabelConfig: everything one labeling run needs, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LabelConfig:
    teacher: str
    corpus: str
    output: str
    top_k: int = 64
    temperature: float = 1.0
    max_length: int = 512
    packing: bool = False
    add_eos: bool = False
    limit: int | None = None  # at most this many sequences
    shard_tokens: int = 32768
    text_field: str = "text"
    storage_options: dict[str, Any] = field(default_factory=dict)
    batch_tokens: int = 4096
    head_chunk: int = 1024
    dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    device: str | None = None  # default: cuda if available
    num_replicas: int | None = None  # default: one per GPU, else 1
    threads: int | None = None  # torch threads per CPU replica (default: cores / replicas)
    ray_address: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        positive = ("top_k", "max_length", "shard_tokens", "batch_tokens", "head_chunk")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("limit", "num_replicas", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.batch_tokens < self.max_length:
            raise ValueError(
                f"batch_tokens ({self.batch_tokens}) must be >= max_length ({self.max_length}) "
                "so that one full sequence fits in a batch"
            )

    def redacted(self) -> dict[str, Any]:
        """The config for logs: storage option values are hidden (they may be secrets)."""
        d = asdict(self)
        d["storage_options"] = {k: "***" for k in self.storage_options}
        return d
