"""LabelConfig: everything one labeling run needs, validated at construction.

A run is configured by a YAML file (``--config``), CLI flags overriding it,
and the defaults below for anything neither sets. YAML keys are the field
names below (``top_k`` or ``top-k``); ``storage_options`` is a mapping that
``--storage-option`` entries extend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from softlabels.schemas import DEFAULT_ENCODING, Encoding
from softlabels.schemas.errors import UserError

from softlabels.common.settings import clip, resolve_settings, short_repr

DTYPES = ("float32", "bfloat16", "float16")  # the --dtype flag's choices


@dataclass(frozen=True)
class LabelConfig:
    output: str = ""  # required: a local path or URL
    teacher: str = "smollm2-135m"
    corpus: str = "pydoc"
    top_k: int = 64
    temperature: float = 1.0
    max_length: int = 512
    packing: bool = False
    add_eos: bool = False
    limit: int | None = None  # at most this many sequences
    # bytes one read task may decompress or decode (compressed JSON Lines, Parquet); None: $SOFTLABELS_MAX_EXPAND_BYTES
    # or 256 MiB. It changes nothing that is labeled, so it is neither recorded nor checked on resume
    max_expand_bytes: int | None = None
    shard_tokens: int = 32768
    text_field: str = "text"
    format: str = "auto"  # corpus rows: auto, text, chat, prompt-completion
    messages_field: str | None = None  # chat rows (default: messages, else conversations)
    prompt_field: str = "prompt"
    completion_field: str | None = None  # prompt-completion rows (default: completion, else response)
    train_on: str | None = None  # all, assistant, completion (default: assistant for chat, completion, all for text)
    chat_template: str | None = None  # a Jinja file overriding the tokenizer's chat template
    # the date a chat template's strftime_now() sees (YYYY-MM-DD): pinned, so labels never depend on the day
    chat_date: str = "2024-07-26"
    split: str = "train"  # of an hf:NAME corpus or a save_to_disk folder of splits
    storage_options: dict[str, Any] = field(default_factory=dict)
    batch_tokens: int = 4096
    head_chunk: int = 1024
    dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    device: str | None = None  # default: cuda if the Ray cluster has GPUs, else cpu
    num_replicas: int | None = None  # default: one per GPU (per --gpus-per-replica GPUs), else one per Ray node
    gpus_per_replica: int = 1  # >1: a teacher too big for one GPU, spread over that many GPUs of one node
    threads: int | None = None  # torch threads per CPU replica (default: cores / replicas)
    ray_address: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False
    take_over: bool = False  # claim the output even though another run's claim has not expired
    on_error: str = "fail"  # undecodable corpus rows: "fail" or "skip"
    encoding: str = DEFAULT_ENCODING  # label columns: fp16, packed, packed-q8, compact[:max_kl=X]
    tail_samples: int = 0  # draws per position from the teacher's tail (0: off)
    # token byte spans (cross-tokenizer students): None stores them when the teacher's tokenizer reproduces
    # text exactly (checked on a probe text), True insists (one line if it cannot), False never
    store_spans: bool | None = None
    # prompts-only corpora (labeler.generation): "teacher" (the labeling teacher writes the responses) or a causal
    # LM's directory sharing the teacher's tokenizer (a student saved by `softlabels train`); None: label rows as they are
    generate_with: str | None = None
    max_new_tokens: int = 128
    sampling_temperature: float = 1.0  # of the generator (0: greedy); --temperature is the labels' own
    top_p: float = 1.0
    samples_per_prompt: int = 1
    seed: int = 0  # each response is a function of (seed, prompt id, sample index)

    def __post_init__(self) -> None:
        for name in ("output", "teacher", "corpus"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"{name} must be a non-empty string, got {short_repr(getattr(self, name))}")
        positive = ("top_k", "max_length", "shard_tokens", "batch_tokens", "head_chunk", "gpus_per_replica")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {short_repr(v)}")
        for name in ("limit", "num_replicas", "threads", "max_expand_bytes"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise UserError(f"{name} must be a positive integer, got {short_repr(v)}")
        address = self.ray_address
        if address and address != "auto" and "://" not in address:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise UserError(f"--ray-address {short_repr(address)}: expected host:port, 'auto' or ray://host:port")
        if self.train_on not in (None, "auto", "all", "assistant", "completion"):
            raise UserError(f"train_on must be all, assistant or completion, got {short_repr(self.train_on)}")
        if self.format not in ("auto", "text", "chat", "prompt-completion", "prompt"):
            raise UserError(f"format must be auto, text, chat, prompt-completion or prompt, got {short_repr(self.format)}")
        if self.on_error not in ("fail", "skip"):
            raise UserError(f"on_error must be 'fail' or 'skip', got {short_repr(self.on_error)}")
        if not isinstance(self.tail_samples, int) or isinstance(self.tail_samples, bool) or not 0 <= self.tail_samples <= 255:
            raise UserError(f"tail_samples must be an integer in 0..255 (draws per position), got {short_repr(self.tail_samples)}")
        _check_date(self.chat_date)
        if self.store_spans not in (None, True, False):
            raise UserError(f"store_spans must be true or false, got {short_repr(self.store_spans)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"dtype must be {', '.join(DTYPES)} (or unset), got {short_repr(self.dtype)}")
        if not isinstance(self.encoding, str):
            raise UserError(f"encoding must be a string such as 'compact', got {short_repr(self.encoding)}")
        try:
            Encoding.parse(self.encoding)  # an unknown name or parameter fails here, before any work
        except UserError as e:  # its message quotes the whole --encoding value
            raise UserError(clip(str(e))) from e
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < float("inf")):
            raise UserError(f"temperature must be a finite number > 0, got {short_repr(t)}")
        object.__setattr__(self, "temperature", float(t))  # YAML may give 1
        gen = self.generation  # bad sampling settings are refused even when nothing is generated
        if self.generate_with is not None:
            if not isinstance(self.generate_with, str) or not self.generate_with.strip():
                raise UserError(f"generate_with must be 'teacher' or a model directory, got {short_repr(self.generate_with)}")
            if self.packing:
                raise UserError("--packing cannot be used with --generate-with: each response is a sequence of its own")
            if self.train_on not in (None, "auto"):
                raise UserError("--train-on cannot be used with --generate-with: the responses are trained, the prompts not")
            if self.format == "text":
                raise UserError("--format text cannot be used with --generate-with: plain-text prompts are --format prompt")
        del gen
        if self.batch_tokens < self.max_length:
            raise UserError(
                f"batch_tokens ({short_repr(self.batch_tokens)}) must be >= max_length ({short_repr(self.max_length)}) "
                "so that one full sequence fits in a batch"
            )

    @property
    def generation(self) -> Any:
        """The sampling settings (:class:`softlabels.common.generate.GenerationSettings`; one line if bad)."""
        from softlabels.common.generate import GenerationSettings

        return GenerationSettings(self.max_new_tokens, self.sampling_temperature, self.top_p, self.samples_per_prompt,
                                  self.seed)

    @property
    def label_encoding(self) -> Encoding:
        return Encoding.parse(self.encoding)

    def redacted(self) -> dict[str, Any]:
        """The config for logs: storage option values are hidden (they may be secrets)."""
        d = asdict(self)
        d["storage_options"] = {k: "***" for k in self.storage_options}
        return d


def _check_date(value: Any) -> None:
    """``chat_date`` is a real calendar date written YYYY-MM-DD."""
    from datetime import date

    try:
        ok = isinstance(value, str) and len(value) == 10 and date.fromisoformat(value) is not None
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"chat_date must be a date written YYYY-MM-DD, got {short_repr(value)}")


def resolve_config(yaml_path: str | None, overrides: Mapping[str, Any]) -> LabelConfig:
    """Defaults < YAML file < CLI flags (``overrides`` holds only the flags given)."""
    return resolve_settings(LabelConfig, yaml_path, overrides, required=("output",))
