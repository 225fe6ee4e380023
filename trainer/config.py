"""TrainConfig: everything one training run needs, validated at construction.

Filled from the defaults below, then a YAML file (``softlabels train --config``), then
the flags given. Imports neither torch nor transformers, so ``--help`` and a bad
setting answer at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from softlabels.common.settings import clip, short_repr
from softlabels.schemas.errors import UserError
from softlabels.trainer.tracking import parse_report_to

LOSSES = ("tail-kl", "topk-kl", "reverse-kl", "reverse-kl-sampled", "kl-mix", "tail-sampled", "xtok-kl", "xtok-uld", "ce")
# The losses for responses a student wrote (on-policy rounds): their unset --alpha is 1 and --chunk-weight 0 (CE on
# a student's own samples would reinforce them, whatever the teacher thinks of them)
REVERSE_LOSSES = ("reverse-kl", "reverse-kl-sampled", "kl-mix")
# What a student with the set's tokenizer, and one with another (trainer.crosstok), trains with by default.
DEFAULT_LOSS, DEFAULT_CROSS_LOSS = "tail-kl", "xtok-uld"
# --alpha and --chunk-weight left unset: with the set's tokenizer, and with another one (the chunk term only on sets
# with target log-probs); chosen from bench/crosstok.py over several seeds (docs/benchmarks.md, issue 33): with one
# tokenizer half KD + half CE + the chunk term beat CE-only at 1, 3 and 7 passes; across tokenizers the chunk term
# helped a student tokenizer close to the teacher's and hurt one trained on other text, so it is off there
DEFAULT_ALPHA, DEFAULT_CROSS_ALPHA = 0.5, 0.5
DEFAULT_CHUNK_WEIGHT, DEFAULT_CROSS_CHUNK_WEIGHT = 1.0, 0.0
# How the chunk term compares the teacher's and the student's probabilities of a chunk (trainer.losses): "binary"
# (the default, the only form before 0.11) or "surprisal" (measured beside it in docs/benchmarks.md, issue 33)
CHUNK_DISTANCES = ("binary", "surprisal")
DEFAULT_CHUNK_DISTANCE = "binary"
# what an unset setting meant before it was recorded (alpha and the chunk weight before 0.8.0, the chunk distance
# before 0.11.0): a resumed run whose checkpoint does not record it continues with it
EARLIER_DEFAULTS: dict[str, Any] = {"alpha": 1.0, "chunk_weight": 0.0, "chunk_distance": "binary"}
# The losses that need no tokenizer mapping to mean something with another tokenizer.
CROSS_LOSSES = ("xtok-kl", "xtok-uld", "ce")
PRECISIONS = ("fp32", "bf16", "fp16")
QAT_MODES = ("q8_0", "q4")  # train --qat (trainer.qat)
# A resumed run continues one run: these must be what its checkpoint recorded ...
KEEP_ON_RESUME = ("student", "student_tokenizer", "token_map", "init_from", "fsdp", "loss", "alpha", "chunk_weight",
                  "chunk_distance",
                  "reverse_weight", "importance_cap", "qat", "temperature", "top_k", "seed", "batch_size", "grad_accum", "eval_fraction", "shuffle_window", "precision")
# ... and these too, unless named in --allow-changed (deliberate changes to the optimizer's course).
CHANGEABLE = ("lr", "weight_decay", "warmup_steps", "min_lr_ratio", "clip")


@dataclass(frozen=True)
class TrainConfig:
    labels: str
    output: str
    student: str = "tiny"
    # tiny / *.json students: build the model for this tokenizer (a directory or hub id) instead of the set's
    student_tokenizer: str | None = None
    # across tokenizers: teacher ids map to the student token of the same bytes ("exact") or, failing that, to the
    # student token their bytes begin with ("first", the default: None); see trainer.crosstok
    token_map: str | None = None
    init_from: str | None = None  # a trained student's directory: its weights, a fresh optimizer and schedule
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    loss: str | None = None  # None: DEFAULT_LOSS, or DEFAULT_CROSS_LOSS for a student with another tokenizer
    # weight of the KD term; (1 - alpha) goes to CE on true tokens. None: DEFAULT_ALPHA, or DEFAULT_CROSS_ALPHA for a
    # student with another tokenizer (resolve_weights)
    alpha: float | None = None
    # weight of the chunk likelihood term (the teacher's and the student's probabilities of each chunk of text
    # matched; needs a set with target_logprob, schema v6): 0 turns it off. None: as alpha (resolve_weights)
    chunk_weight: float | None = None
    # how the chunk term compares the two probabilities of a chunk: binary or surprisal (None: the default, binary)
    chunk_distance: str | None = None
    reverse_weight: float = 0.5  # --loss kl-mix: (1 - w) KL(teacher || student) + w KL(student || teacher)
    # --loss reverse-kl-sampled on a set with the generator's log-probs: truncated importance weights (0: none)
    importance_cap: float = 2.0
    temperature: float = 1.0
    # quantization-aware: the forward uses the weights as `export --format gguf --quant q8_0|q4_0` stores them
    # (trainer.qat); None: plain fp32 weights
    qat: str | None = None
    seed: int = 0
    eval_fraction: float = 0.05
    eval_every: int = 0  # 0: only before and after training
    eval_batches: int | None = 50
    head_chunk: int = 2048  # positions per LM-head chunk in the loss (docs/trainer.md, "Precision, memory")
    num_workers: int = 0
    device: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    metrics: str | None = None  # JSONL path (default: OUTPUT/metrics.jsonl)
    checkpoint_every: int = 0  # 0: no checkpoints
    checkpoint_dir: str | None = None  # local path or URL (default: OUTPUT/checkpoints)
    resume: bool = False  # continue from the latest checkpoint, if there is one
    fsdp: bool = False  # FSDP2: parameters, gradients and optimizer state sharded over the ranks (torchrun)
    packing: bool = False  # join a batch's sequences into rows of up to the set's max_length (block-diagonal)
    shuffle_window: int = 2  # shards shuffled together (the shuffle buffer)
    prefetch: int = 2  # shards read ahead in the background
    top_k: int | None = None  # read-time truncation to k' < the set's k
    skip_corrupt: bool = False
    allow_vocab_mismatch: bool = False
    plot: str | None = None  # PNG of the loss and eval curves, drawn at the end
    log_samples: bool = False  # write the sample keys each rank trained on (tests, audits)
    trust_remote_code: bool = False  # a hub student's own modeling code runs only if asked
    allow_changed: tuple[str, ...] = ()  # CHANGEABLE settings a --resume may change
    precision: str | None = None  # autocast of the forward: fp32, bf16, fp16 (loss-scaled); None: bf16 on CUDA, else fp32
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward: less memory, same gradients
    report_to: tuple[str, ...] = ()  # also send the metrics to: tensorboard (OUTPUT/tensorboard), wandb

    def __post_init__(self) -> None:
        changed = self.allow_changed
        # a list from flags, a tuple from a --config file
        object.__setattr__(self, "allow_changed", (changed,) if isinstance(changed, str) else tuple(changed or ()))
        # "tensorboard,wandb", a list, or "none"; a tracker whose package is missing stops here, before any work
        try:
            object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        except UserError as e:  # its message lists every name refused
            raise UserError(clip(str(e))) from e
        if self.init_from is not None and self.student != "tiny":
            raise UserError(f"give --student or --init-from, not both (--student {clip(str(self.student), 80)}, "
                            f"--init-from {clip(str(self.init_from), 80)})")
        if self.token_map not in (None, "first", "exact"):
            raise UserError(f"token_map must be first or exact, got {short_repr(self.token_map)}")
        if self.init_from is not None and self.student_tokenizer is not None:
            raise UserError(f"--init-from {clip(str(self.init_from), 80)} brings its own tokenizer; drop --student-tokenizer")
        for name in ("steps", "batch_size", "grad_accum", "head_chunk", "shuffle_window"):
            _check_int(self, name, 1)
        for name in ("warmup_steps", "eval_every", "num_workers", "checkpoint_every", "prefetch", "seed"):
            _check_int(self, name, 0)
        for name in ("eval_batches", "top_k"):
            if getattr(self, name) is not None:
                _check_int(self, name, 1)
        _check_float(self, "lr", 0, None, low_open=True)
        _check_float(self, "weight_decay", 0, None)
        _check_float(self, "min_lr_ratio", 0, 1)
        if self.alpha is not None:
            _check_float(self, "alpha", 0, 1)
        if self.chunk_weight is not None:
            _check_float(self, "chunk_weight", 0, None)
        if self.chunk_distance not in (None, *CHUNK_DISTANCES):
            raise UserError(f"chunk_distance must be one of {', '.join(CHUNK_DISTANCES)}, got {short_repr(self.chunk_distance)}")
        _check_float(self, "reverse_weight", 0, 1)
        _check_float(self, "importance_cap", 0, None)
        _check_float(self, "temperature", 0, None, low_open=True)
        _check_float(self, "eval_fraction", 0, 1, high_open=True)
        if not (isinstance(self.clip, (int, float)) and not isinstance(self.clip, bool) and self.clip > 0):
            raise UserError(f"clip must be > 0 (a gradient-norm bound; inf turns clipping off), got {short_repr(self.clip)}")
        if self.loss is not None and self.loss not in LOSSES:
            raise UserError(f"loss must be one of {LOSSES}, got {short_repr(self.loss)}")
        if self.loss == "tail-sampled" and self.top_k is not None:
            raise UserError("--loss tail-sampled cannot use --top-k: the stored tail draws never saw the entries k' drops")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {PRECISIONS} (or unset: bf16 on CUDA, fp32 elsewhere), got {short_repr(self.precision)}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise UserError(f"gradient_checkpointing must be true or false, got {short_repr(self.gradient_checkpointing)}")
        if self.plot is not None and not self.plot.lower().endswith(".png"):
            raise UserError(f"plot {clip(str(self.plot), 80)}: expected a .png file name")
        if self.qat is not None and self.qat not in QAT_MODES:
            raise UserError(f"--qat must be one of {', '.join(QAT_MODES)}, got {short_repr(self.qat)}")
        if self.qat is not None and self.fsdp:
            raise UserError("--qat with --fsdp is not supported (the fake-quantized forward is tested unsharded); "
                            "train without --fsdp")
        unknown = set(self.allow_changed) - set(CHANGEABLE)
        if unknown:
            raise UserError(f"--allow-changed takes {', '.join(CHANGEABLE)}; not {clip(', '.join(sorted(unknown)), 120)}")

    def resume_record(self) -> dict[str, Any]:
        """The settings a resumed run must keep (the label set is recorded beside them)."""
        return {name: getattr(self, name) for name in (*KEEP_ON_RESUME, *CHANGEABLE)}

    def redacted(self) -> dict[str, Any]:
        d = asdict(self)
        d["storage_options"] = {k: "***" for k in self.storage_options}
        return d


def _check_int(cfg: TrainConfig, name: str, low: int) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise UserError(f"{name} must be {what}, got {short_repr(v)}")


def _check_float(cfg: TrainConfig, name: str, low: float, high: float | None, low_open: bool = False,
                 high_open: bool = False) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > low if low_open else v >= low) and (high is None or (v < high if high_open else v <= high))
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high is None else "]"
        raise UserError(f"{name} must be a finite number in {lo}{low}, {'inf' if high is None else high}{hi}, got {short_repr(v)}")


def resolve_weights(alpha: float | None, chunk_weight: float | None, cross: bool, has_targets: bool,
                    recorded: dict[str, Any] | None = None, loss: str | None = None,
                    chunk_distance: str | None = None) -> dict[str, Any]:
    """``--alpha``, ``--chunk-weight`` and ``--chunk-distance`` as they apply: as given when set; when unset, as the
    checkpoint a resume continues recorded them (``recorded``; one written before 0.8.0 records no chunk weight: 0,
    before 0.11.0 no chunk distance: binary), else the defaults for a student with the set's tokenizer or another
    one (the chunk term only on a set with target log-probs)."""
    defaults = {"alpha": DEFAULT_CROSS_ALPHA if cross else DEFAULT_ALPHA,
                "chunk_weight": (DEFAULT_CROSS_CHUNK_WEIGHT if cross else DEFAULT_CHUNK_WEIGHT) if has_targets else 0.0,
                "chunk_distance": DEFAULT_CHUNK_DISTANCE}
    if loss in REVERSE_LOSSES:
        defaults = {**defaults, "alpha": 1.0, "chunk_weight": 0.0}
    out: dict[str, Any] = {}
    for name, value in (("alpha", alpha), ("chunk_weight", chunk_weight), ("chunk_distance", chunk_distance)):
        if value is None:
            value = recorded.get(name, EARLIER_DEFAULTS[name]) if recorded is not None else defaults[name]
        out[name] = value if name == "chunk_distance" else float(value)
    return out


def resolve_loss(loss: str | None, cross: bool) -> str:
    """``--loss`` as it applies: unset means the default for a student with the set's tokenizer or another one."""
    if loss is None:
        return DEFAULT_CROSS_LOSS if cross else DEFAULT_LOSS
    if cross and loss not in CROSS_LOSSES:
        raise UserError(f"--loss {loss} compares the teacher's token ids with the student's as they are; a student with "
                        f"another tokenizer trains with {', '.join(CROSS_LOSSES)}")
    return loss
