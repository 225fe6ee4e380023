"""Students: the built-in ``tiny`` config, a local HF model directory, an HF id, or a config file.

The tokenizer comes with the label set (the labeler copies it there), so a
student never needs the teacher. Its fingerprint must match the manifest's.
"""

from __future__ import annotations

import json
import logging
import pickle
import tempfile
from pathlib import Path
from typing import Any

from softlabels.common.cli import remote_code_guard
from softlabels.schemas import LabelSet, Manifest, join_url, tokenizer_fingerprint
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


TRAIN_RECORD = "softlabels_train.json"  # what `softlabels train` writes beside the student it saved
DEFAULT_EVAL_FRACTION = 0.05  # the held-out share of a model that records none (a teacher, an HF id, tiny)


def training_record(spec: str) -> tuple[Path, dict[str, Any]] | None:
    """``(path, record)`` of the :data:`TRAIN_RECORD` beside a trained student; None for a model without one (a
    teacher, an HF id, ``tiny``). An ``export`` directory: the copy it holds, else (an export written before
    exports held one) its source student's. Reads no weights and imports no torch.

    Raises:
        UserError: the record is there but is not one (then which samples the model trained on is unknown).
    """
    if spec == "tiny" or spec.endswith(".json"):  # built here, fresh: whatever folder of that name lies about
        return None
    d = Path(spec).expanduser()
    text = None
    if d.suffix == ".gguf" and d.is_file():  # a GGUF export carries its record in its metadata
        from softlabels.trainer.gguf_run import check_gguf, train_record

        check_gguf(spec)
        path, text = d, train_record(d)
        if text is None:
            return None
    else:
        path = d / TRAIN_RECORD
        # An export's own copy first: its source folder may have moved or been retrained since.
        if not path.is_file() and (d / "softlabels_export.json").is_file():  # trainer.export's META_FILE
            try:
                source = json.loads((d / "softlabels_export.json").read_text()).get("source")
            except (ValueError, AttributeError):
                source = None
            path = Path(source) / TRAIN_RECORD if isinstance(source, str) else path
        if not path.is_file():
            return None
    try:
        record = json.loads(path.read_text() if text is None else text)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a training record ({str(e)[:80]}); which samples {spec} trained on is "
                        "unknown: restore the file, or remove it to treat the model as one without a record") from e
    if not (isinstance(record, dict) and isinstance(record.get("config"), dict)):
        raise UserError(f"{path}: not a training record (no config object); which samples {spec} trained on is "
                        "unknown: restore the file, or remove it to treat the model as one without a record")
    return path, record


def trained_eval_fraction(spec: str, tokenizer_fingerprint: str | None = None) -> float | None:
    """The held-out share (``eval_fraction``) that the student at ``spec`` was trained with, from its
    :data:`TRAIN_RECORD`; None for a model without a record. The held-out samples of a share ``f`` are
    those whose ``sample_id`` hash falls below ``f`` (:func:`softlabels.trainer.data.in_eval_split`), so a
    smaller share picks a subset of them and a larger one also picks samples the student trained on.

    ``tokenizer_fingerprint``: of the label set to score on. Sample ids are content addresses under a
    tokenizer, so a set of another tokenizer holds none of the samples the student trained on: None then."""
    found = training_record(spec)
    if found is None:
        return None
    path, record = found
    trained_on = (record.get("label_set") or {}).get("tokenizer_fingerprint")
    if tokenizer_fingerprint is not None and isinstance(trained_on, str) and trained_on != tokenizer_fingerprint:
        return None
    f = record["config"].get("eval_fraction")
    if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f < 1):
        raise UserError(f"{path}: eval_fraction {f!r:.40} is not a share in [0, 1); which samples {spec} trained on "
                        "is unknown")
    return float(f)


def held_out_fraction(models: list[str], given: float | None, split: str = "eval",
                      tokenizer_fingerprint: str | None = None) -> float:
    """The held-out share to score ``models`` on (``eval``, ``compare``).

    ``given`` None (no ``--eval-fraction``): the smallest share any of them was trained with, i.e. the
    samples none of them trained on (the splits nest), or :data:`DEFAULT_EVAL_FRACTION` when none has a
    record. ``given``: used as it is, unless (``split`` eval) it is larger than a model's own share.
    Records apply to label sets of the tokenizer they were trained under (``tokenizer_fingerprint``: the
    set's), whose samples may be the ones trained on; ``--split all`` scores a set without any split.

    Raises:
        UserError: ``given`` is not in [0, 1), would score a model on samples it trained on, or a model
            trained on every sample (share 0) is to be scored on a held-out split. Refused, not warned: a
            score that silently includes training data looks like a better student.
    """
    if given is not None and not (isinstance(given, (int, float)) and 0 <= given < 1):
        raise UserError(f"--eval-fraction must be in [0, 1), got {given!r}")
    recorded = [(m, f) for m in models if (f := trained_eval_fraction(m, tokenizer_fingerprint)) is not None]
    if split == "eval":
        for model, f in recorded:
            if f == 0:
                raise UserError(f"{model} trained on every sample of its label set (eval_fraction 0, its {TRAIN_RECORD}),"
                                " so no split of a set of its tokenizer is held out from it; on a set it never trained "
                                "on, --split all scores every sample")
    if given is None:
        if not recorded:
            return DEFAULT_EVAL_FRACTION
        model, f = min(recorded, key=lambda mf: mf[1])
        log.info("held-out split: eval_fraction %g, what %s was trained with (its %s)", f, model, TRAIN_RECORD)
        return f
    for model, f in recorded:
        if split == "eval" and given > f:
            raise UserError(f"--eval-fraction {given} would score {model} partly on samples it trained on: it held out "
                            f"{f} (its {TRAIN_RECORD}); give at most {f}, or leave --eval-fraction out to use it (on a "
                            "set it never trained on, --split all scores every sample)")
    return float(given)


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
    """Stop before training if the student's tokenizer is not the teacher's, saying how the two differ.

    With ``allow_mismatch`` a different tokenizer is accepted (and False
    returned); the caller must still check that every id fits the student.
    """
    fp = tokenizer_fingerprint(tokenizer)
    want = labels.manifest.tokenizer.fingerprint
    if fp == want:
        return True
    # The label set's own tokenizer shows what differs (the `tiny` path compares it with itself: nothing to show).
    label_tok = load_label_tokenizer(labels) if labels.manifest.tokenizer.files else None
    precise = tokenizer_difference(tokenizer, label_tok, labels.manifest) if label_tok is not None else None
    if labels.manifest.spans and label_tok is not None and precise is None and not allow_mismatch:
        # another base vocabulary: distilled across tokenizers (trainer.crosstok). One that differs from the set's
        # only in added tokens, ids or roles is told apart precisely below, as for sets without spans.
        log.info("student tokenizer (%s) differs from the label set's (%s): distilling across tokenizers, aligned by "
                 "the set's token spans", where, labels.manifest.tokenizer.name)
        return False
    if precise:
        msg = f"student tokenizer ({where}) differs from the label set's: {precise}"
        why = "" if "--allow-vocab-mismatch" in precise else " (--allow-vocab-mismatch overrides)"
    else:
        vocab = vocab_difference(tokenizer, label_tok) if label_tok is not None else None
        msg = (f"student tokenizer ({where}, {fp[:19]}) differs from the label set's "
               f"({labels.manifest.tokenizer.name}, {want[:19]}){f': {vocab}' if vocab else ''}")
        why = (f"{'; ' if vocab else ': '}the student must share the teacher's tokenizer, as this label set has no "
               "token spans (labeled without --store-spans, or before softlabels 0.7) to align another tokenizer with "
               "(--allow-vocab-mismatch overrides)")
    if not allow_mismatch:
        raise UserError(msg + why)
    log.warning("%s; training anyway (--allow-vocab-mismatch): ids mean what the teacher's tokenizer says", msg)
    return False


def _added(tokenizer: Any, tokens: list[tuple[str, int]], most: int = 3) -> tuple[str, str]:
    """``("2 special tokens", "'<a>' (id 5), '<b>' (id 6)")``, naming at most ``most``."""
    decoder = tokenizer.added_tokens_decoder
    kind = "special" if all(getattr(decoder.get(i), "special", False) for _, i in tokens) else "added"
    shown = ", ".join(f"{t!r} (id {i})" for t, i in tokens[:most])
    more = f" and {len(tokens) - most} more" if len(tokens) > most else ""
    return f"{len(tokens)} {kind} token{'s' if len(tokens) > 1 else ''}", shown + more


def tokenizer_difference(student: Any, label_tok: Any, manifest: Manifest) -> str | None:
    """How ``student`` differs from the label set's tokenizer ``label_tok`` when their base vocabularies agree.

    The tokens added on either side, or the tokens whose ids differ, are named
    with their ids, with whether ``--allow-vocab-mismatch`` is safe (one clause).
    None when the base vocabularies differ (see :func:`vocab_difference`) or nothing differs.
    """
    sv, lv = student.get_vocab(), label_tok.get_vocab()
    s_added, l_added = student.get_added_vocab(), label_tok.get_added_vocab()
    s_only = sorted(((t, i) for t, i in sv.items() if t not in lv), key=lambda x: x[1])
    l_only = sorted(((t, i) for t, i in lv.items() if t not in sv), key=lambda x: x[1])
    if not (all(t in s_added for t, _ in s_only) and all(t in l_added for t, _ in l_only)):
        return None
    moved = sorted(((t, sv[t], i) for t, i in lv.items() if t in sv and sv[t] != i), key=lambda x: x[2])
    if moved:
        shown = ", ".join(f"{t!r} (id {a} in the student's, {b} in the label set's)" for t, a, b in moved[:3])
        return (f"{len(moved)} token{'s have' if len(moved) > 1 else ' has'} a different id on each side: {shown}"
                f"{f' and {len(moved) - 3} more' if len(moved) > 3 else ''}; the student would read those ids as other "
                "tokens: never safe, --allow-vocab-mismatch or not")
    parts = []
    if s_only:
        space = manifest.id_space
        inside = [str(i) for _, i in s_only if i < space]
        count, names = _added(student, s_only)
        parts.append(f"the student's tokenizer adds {count} the label set's lacks: {names}")
        if inside:
            parts.append(f"id(s) {', '.join(inside[:3])} lie inside the set's id space ({space}), where the "
                         "teacher's ids mean other things: not safe")
        elif manifest.tokenizer.id_space is None:
            parts.append("the set records no id space (written before 0.5.0): a padded teacher head may have "
                         "emitted these ids")
        else:
            parts.append(f"past the set's id space ({space}), never emitted by the teacher: "
                         "safe to train with --allow-vocab-mismatch")
    if l_only:
        count, names = _added(label_tok, l_only)
        parts.append(f"the label set's adds {count} the student's lacks: {names}, ids the set may hold and the "
                     "student's tokenizer cannot encode")
    if parts:
        return "; ".join(parts)
    sm, lm = dict(student.special_tokens_map), dict(label_tok.special_tokens_map)
    roles = [f"{k} {sm.get(k)!r} vs {lm.get(k)!r}" for k in sorted(sm.keys() | lm.keys()) if sm.get(k) != lm.get(k)]
    if roles:
        return f"same ids, other special-token roles (student vs label set: {'; '.join(roles[:3])})"
    return None


def vocab_difference(student: Any, label_tok: Any) -> str | None:
    """Vocabulary sizes, tokens in common and the first id that means another token; None if the vocabularies agree."""
    sv, lv = student.get_vocab(), label_tok.get_vocab()
    s_ids, l_ids = {i: t for t, i in sv.items()}, {i: t for t, i in lv.items()}
    first = min((i for i in s_ids.keys() | l_ids.keys() if s_ids.get(i) != l_ids.get(i)), default=None)
    if first is None:
        return None
    return (f"another vocabulary ({len(sv)} tokens vs {len(lv)}, {len(sv.keys() & lv.keys())} in common; "
            f"first difference at id {first}: {s_ids.get(first)!r} vs {l_ids.get(first)!r})")


def build_student(
    spec: str, labels: LabelSet, seed: int = 0, dtype: str = "float32", allow_vocab_mismatch: bool = False,
    trust_remote_code: bool = False, student_tokenizer: str | None = None, safetensors_only: bool = False,
    where: str | None = None, trained_tokenizer: str | None = None,
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for ``--student``.

    ``tiny`` and ``*.json`` config files build a freshly initialized Llama-style
    model (seeded) with the label set's tokenizer, or with ``student_tokenizer``
    (a directory or hub id) sized to it; anything else goes to
    ``from_pretrained`` (local directory or hub id) with its own tokenizer;
    a model's own Python code runs only with ``trust_remote_code``. Weights load from safetensors, or
    (not ``safetensors_only``) from a ``pytorch_model.bin`` of tensors only (``weights_only``: no object is
    ever unpickled). ``where``: how the user named the model, for messages (default ``student SPEC``).
    ``trained_tokenizer``: the fingerprint of the tokenizer the model's weights were trained with (its
    training record); a model directory whose tokenizer is another one now is refused before anything else.

    Raises:
        UserError: the model, its tokenizer or its weights cannot be used (one line saying why).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    vocab = labels.manifest.tokenizer.vocab_size
    rows_needed = labels.manifest.id_space  # a padded teacher head's ids may lie past the tokenizer
    torch_dtype = getattr(torch, dtype)
    if student_tokenizer is not None and not (spec == "tiny" or spec.endswith(".json")):
        raise UserError(f"--student-tokenizer is for students built here (tiny, a config .json); {spec} has its own")
    if spec == "tiny" or spec.endswith(".json"):
        if student_tokenizer is not None:
            tokenizer = _own_tokenizer(student_tokenizer)
            if not check_tokenizer(tokenizer, labels, student_tokenizer, allow_vocab_mismatch):
                rows_needed = len(tokenizer)  # its own ids (across tokenizers), or all ids fit (--allow-vocab-mismatch)
                rows_needed = max(rows_needed, labels.manifest.id_space if allow_vocab_mismatch else 0)
        else:
            tokenizer = load_label_tokenizer(labels)
            check_tokenizer(tokenizer, labels, f"{labels.url}/{labels.manifest.tokenizer.files}")
        if student_tokenizer is None and len(tokenizer) != vocab:  # the fingerprint vouches for the tokenizer, not for the number beside it
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
    from safetensors import SafetensorError

    where = where or f"student {spec}"
    with remote_code_guard(where):
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
        now = tokenizer_fingerprint(tokenizer)
        if trained_tokenizer is not None and now != trained_tokenizer:
            # each embedding row means the token the weights were trained with: another vocabulary at the same
            # path would pair them with other tokens, silently (or fail later on a count of rows)
            raise UserError(f"{where}: its tokenizer ({now[:19]}...) is not the one its weights were trained with "
                            f"({trained_tokenizer[:19]}..., in its {TRAIN_RECORD}): the folder changed since; restore "
                            "its tokenizer files, or start from another student")
        check_tokenizer(tokenizer, labels, spec, allow_vocab_mismatch)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec, dtype=torch_dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code,
                **({"use_safetensors": True} if safetensors_only else {}),
            )
        except (SafetensorError, pickle.UnpicklingError) as e:  # a damaged file, or a pickle of objects
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            if isinstance(e, pickle.UnpicklingError):  # torch's text goes on to suggest weights_only=False: never
                first = "a pickle of objects other than tensors, which are never unpickled"
            accepted = ("model.safetensors" if safetensors_only else
                        "model.safetensors, or a pytorch_model.bin of tensors only (read weights_only)")
            raise UserError(f"{where}: its weights cannot be read ({first}); accepted: {accepted}") from e
    rows = embedding_rows(model)
    if tokenizer_fingerprint(tokenizer) != labels.manifest.tokenizer.fingerprint and not allow_vocab_mismatch:
        rows_needed = len(tokenizer)  # across tokenizers: the student's own ids
    if rows < rows_needed:
        raise UserError(
            f"student {spec} has {rows} embeddings, fewer than the label set's id space of {rows_needed}"
            f"{'' if rows_needed == vocab else f' (the teacher head rows; its tokenizer has {vocab})'}: "
            "its ids do not all fit"
        )
    return model, tokenizer


def _own_tokenizer(spec: str) -> Any:
    """``--student-tokenizer``: a tokenizer directory or hub id (never its code, whatever ``--trust-remote-code`` says).

    Raises:
        UserError: no such tokenizer, or one that loads only with its own Python code (the message says what works).
    """
    from transformers import AutoTokenizer

    if not Path(spec).exists() and spec.startswith((".", "/", "~")):
        raise UserError(f"--student-tokenizer {spec} does not exist")
    # Not under remote_code_guard: its advice (--trust-remote-code) does nothing here, and it would rewrite this
    # function's own UserError (a ValueError naming "custom code") into that advice.
    try:
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if isinstance(e, ValueError) and ("trust_remote_code" in str(e) or "custom code" in str(e)):
            fast = Path(spec, "tokenizer.json")
            how = (f"its tokenizer.json loads without code: transformers.PreTrainedTokenizerFast(tokenizer_file="
                   f"'{fast}').save_pretrained(NEW_DIR), then --student-tokenizer NEW_DIR" if fast.is_file() else
                   "give a tokenizer that loads without code (one with a tokenizer.json)")
            raise UserError(f"--student-tokenizer {spec} loads only with its own Python code (not run): a "
                            f"--student-tokenizer never runs code, --trust-remote-code or not; {how}, or train a "
                            "student that brings this tokenizer (--student DIR_OR_ID --trust-remote-code)") from None
        raise UserError(f"--student-tokenizer {spec}: not a tokenizer ({first})") from None


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
