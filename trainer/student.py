"""Students: the built-in ``tiny`` config, a local HF model directory, an HF id, or a config file.

The tokenizer comes with the label set (the labeler copies it there), so a
student never needs the teacher. Its fingerprint must match the manifest's.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from softlabels.common.cli import remote_code_guard
from softlabels.schemas import LabelSet, join_url, tokenizer_fingerprint
from softlabels.schemas.errors import UserError

log = logging.getLogger(__name__)

TINY = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def refuse_code(files: dict[str, bytes], where: str) -> None:
    """Refuse tokenizer files that would make transformers load Python code (``auto_map``, ``*.py``).

    A label set is untrusted input: its tokenizer is data, never code, whatever
    ``--trust-remote-code`` says (that flag is for the student the user chose).
    """
    for name, data in sorted(files.items()):
        if name.endswith(".json"):
            try:
                d = json.loads(data)
            except (ValueError, RecursionError) as e:
                raise UserError(f"{where}/{name}: not valid JSON ({str(e)[:80]})") from e
            if isinstance(d, dict) and "auto_map" in d:
                raise UserError(f"{where}/{name} has an auto_map entry (custom Python code); a label set's tokenizer "
                                "never runs code: refused (nothing was run)")
    for name in sorted(files):
        if name.endswith((".py", ".pyc", ".so")):
            raise UserError(f"{where}/{name}: a label set's tokenizer must not carry code; refused (nothing was run)")


def load_label_tokenizer(labels: LabelSet) -> Any:
    """The tokenizer stored inside the label set (files checked against the manifest; no code ever runs)."""
    from transformers import AutoTokenizer

    if not labels.manifest.tokenizer.files:
        raise UserError(f"label set {labels.url} carries no tokenizer files; pass a student with its own tokenizer")
    files = labels.tokenizer_files()
    where = join_url(labels.url, labels.manifest.tokenizer.files)
    refuse_code(files, where)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        with remote_code_guard(f"tokenizer {where}"):
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)


def check_tokenizer(tokenizer: Any, labels: LabelSet, where: str, allow_mismatch: bool = False) -> bool:
    """Stop before training if the student's tokenizer is not the teacher's.

    With ``allow_mismatch`` a different tokenizer is accepted (and False
    returned); the caller must still check that every id fits the student.
    """
    fp = tokenizer_fingerprint(tokenizer)
    want = labels.manifest.tokenizer.fingerprint
    if fp == want:
        return True
    msg = (f"student tokenizer ({where}, {fp[:19]}) differs from the label set's "
           f"({labels.manifest.tokenizer.name}, {want[:19]})")
    if not allow_mismatch:
        raise UserError(f"{msg}: the student must share the teacher's tokenizer (--allow-vocab-mismatch overrides)")
    log.warning("%s; training anyway (--allow-vocab-mismatch): ids mean what the teacher's tokenizer says", msg)
    return False


def build_student(
    spec: str, labels: LabelSet, seed: int = 0, dtype: str = "float32", allow_vocab_mismatch: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for ``--student``.

    ``tiny`` and ``*.json`` config files build a freshly initialized Llama-style
    model (seeded) with the label set's tokenizer; anything else goes to
    ``from_pretrained`` (local directory or hub id) with its own tokenizer;
    a model's own Python code runs only with ``trust_remote_code``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    vocab = labels.manifest.tokenizer.vocab_size
    rows_needed = labels.manifest.id_space  # a padded teacher head's ids may lie past the tokenizer
    torch_dtype = getattr(torch, dtype)
    if spec == "tiny" or spec.endswith(".json"):
        tokenizer = load_label_tokenizer(labels)
        check_tokenizer(tokenizer, labels, f"{labels.url}/{labels.manifest.tokenizer.files}")
        if len(tokenizer) != vocab:  # the fingerprint vouches for the tokenizer, not for the number beside it
            raise UserError(f"label set {labels.url}: the manifest's vocab_size {vocab} is not its tokenizer's "
                            f"{len(tokenizer)}; refused (a student's embeddings would be sized from it)")
        if spec == "tiny":
            config = LlamaConfig(vocab_size=rows_needed, **TINY)
        else:
            d = json.loads(Path(spec).read_text())
            config = AutoConfig.for_model(**d) if "model_type" in d else LlamaConfig(**d)
            config.vocab_size = max(getattr(config, "vocab_size", 0) or 0, rows_needed)
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
        return model, tokenizer
    if not Path(spec).exists() and spec.startswith((".", "/", "~")):
        raise UserError(f"student path {spec} does not exist")
    if Path(spec).exists() and not (Path(spec) / "config.json").exists():
        raise UserError(f"student directory {spec} has no config.json (not a Hugging Face model directory)")
    with remote_code_guard(f"student {spec}"):
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
        check_tokenizer(tokenizer, labels, spec, allow_vocab_mismatch)
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=torch_dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    rows = embedding_rows(model)
    if rows < rows_needed:
        raise UserError(
            f"student {spec} has {rows} embeddings, fewer than the label set's id space of {rows_needed}"
            f"{'' if rows_needed == vocab else f' (the teacher head rows; its tokenizer has {vocab})'}: "
            "its ids do not all fit"
        )
    return model, tokenizer


def embedding_rows(model: Any) -> int:
    """How many token ids a student can take in and score (the smaller of its two embedding matrices)."""
    return min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])


def enable_gradient_checkpointing(model: Any, spec: str) -> None:
    """``--gradient-checkpointing``: keep only each decoder layer's input and recompute the rest in backward.

    Less activation memory for one more forward per step; the loss and gradients are the same.

    Raises:
        UserError: the student's architecture does not support it.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"--gradient-checkpointing: student {spec} ({type(model).__name__}) does not support "
                        "gradient checkpointing; train without it")
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad, and warns
    # Recent transformers name it activation_checkpointing_enable (the old name is a deprecated alias there)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
