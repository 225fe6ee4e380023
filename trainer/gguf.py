"""GGUF export of a trained student, for llama.cpp (and Ollama, LM Studio): ``softlabels export --format gguf``.

The student is written with the ``gguf`` package (the writer llama.cpp's own
converter uses) and quantized by llama.cpp's own quantizer
(``llama_model_quantize``, through ``llama-cpp-python``): no quantization is
written here. One ``.gguf`` file holds the weights, the tokenizer (ids checked
against the student's own on a probe text before the file is published), the
chat template when the tokenizer has one, and the student's training record
(``softlabels.train_record``: the held-out share ``eval``/``compare`` use).

``--quant``:

- ``f16``: 2-D weights in fp16, norms in fp32 (llama.cpp's converter does the same);
- ``q8_0``, ``q4_0``: every weight matrix in blocks of 32 (one fp16 scale per block), the embedding (tied:
  also the LM head) too (llama-quantize's ``--pure``); a matrix whose rows are not a multiple of 32 long stays
  fp16 (llama.cpp's own fallback). These are what ``train --qat q8_0|q4`` trains against, tensor for tensor
  (:mod:`trainer.qat`);
- ``q4_k_m``: llama.cpp's own mixture, untouched (4-bit K-quants in super-blocks of 256, some tensors at
  6 bits, the embedding at 6 or 8).

Architectures: Llama-shaped students (``tiny``, ``.json`` configs, SmolLM and Llama checkpoints without rope scaling:
Llama 3.0-style, not 3.1/3.2's ``llama3`` scaling) as llama.cpp's ``llama``, Qwen2 (without a sliding window) as
``qwen2``; anything else is refused in one line.
Tokenizers: byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2 pre-tokenizers).

Load back with one call (the runner is :mod:`trainer.gguf_run`)::

    from softlabels.trainer.gguf import load_gguf
    model = load_gguf("student-q4_k_m.gguf")      # logits = model.logits(input_ids, attention_mask)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from softlabels.schemas.errors import UserError

from softlabels.common.files import current_umask, make_dir
from softlabels.trainer.gguf_run import (  # noqa: F401 (the runner's names, importable from here too)
    GGUFCausalLM, check_gguf, is_gguf, load_for_labels, load_gguf, metadata_string, need_llama_cpp, train_record,
)

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
# llama.cpp's enums (include/llama.h, ggml.h): llama_ftype and ggml_type values
_FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15}
# Probe for the tokenizer check: spaces and tabs, accents, CJK, emoji, digits, code, newlines.
PROBE_TEXT = ("Hello,  world!\tCafé déjà vu — naïve façade. 日本語のテキスト、中文。 Emoji: 🙂🚀👩‍💻 "
              "Numbers 1234567 and 3.14159.\n\ndef f(x):\n    return x**2  # ok\n   trailing   ")


# --- the model ------------------------------------------------------------------------------------------------


def _permute(w: Any, heads: int) -> Any:
    """HF's rotary layout (halves) -> llama.cpp's ``llama`` layout (interleaved pairs), per head (q and k rows)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch(config: Any, where: str) -> str:
    mt = getattr(config, "model_type", None)
    arch = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}.get(mt or "")
    if arch is None:
        raise UserError(f"{where}: architecture {mt!r} ({', '.join(getattr(config, 'architectures', None) or [])}) "
                        "has no GGUF mapping here; supported: llama (tiny, SmolLM, Llama), qwen2")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"{where}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not mapped to GGUF here")
    if mt == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UserError(f"{where}: a sliding attention window (use_sliding_window) has no qwen2 GGUF mapping here")
    if mt == "mistral" and getattr(config, "sliding_window", None):
        raise UserError(f"{where}: a sliding attention window ({config.sliding_window}) has no llama GGUF mapping")
    if mt in ("llama", "mistral") and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise UserError(f"{where}: a llama with attention or MLP biases is not mapped to GGUF here")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"{where}: activation {config.hidden_act!r} is not llama.cpp's silu")
    return arch


def rope_theta(config: Any) -> float:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def gguf_tensors(model: Any, arch: str) -> list[tuple[str, Any]]:
    """``(gguf name, fp32 numpy array)`` for every tensor, in llama.cpp's names and layouts."""
    c = model.config
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tied = bool(getattr(c, "tie_word_embeddings", False))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    out = [("token_embd.weight", sd.pop("model.embed_tokens.weight"))]
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                t = sd.pop(f"model.layers.{i}.{hf}.{kind}", None)
                if t is None:
                    continue
                if arch == "llama" and gg in ("attn_q", "attn_k"):
                    t = _permute(t, heads if gg == "attn_q" else kv)
                out.append((f"blk.{i}.{gg}.{kind}", t))
    out.append(("output_norm.weight", sd.pop("model.norm.weight")))
    head = sd.pop("lm_head.weight", None)
    if not tied and head is not None:
        out.append(("output.weight", head))
    left = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
    if left:  # a tensor the mapping does not know would be silently dropped
        raise UserError(f"model: tensors with no GGUF mapping here: {', '.join(left[:3])}"
                        f"{f' and {len(left) - 3} more' if len(left) > 3 else ''}")
    return out


# --- the tokenizer --------------------------------------------------------------------------------------------


def _pre_type(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` (byte-level BPE), None if unknown."""
    if not pre:
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex", "")
        if regex.endswith(r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+") and "(?i:'s" in regex:
            return "qwen2"
        if r"\p{N}{1,3}" in regex and "(?i:'s" in regex:
            return "llama-bpe"
    return None


def _bytes_token(tokenizer: Any) -> bool:
    return getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer")


def tokenizer_fields(tokenizer: Any, rows: int, where: str) -> dict[str, Any]:
    """What GGUF stores of a byte-level BPE tokenizer: tokens (padded to ``rows``), types, merges, pre-tokenizer,
    special ids and whether BOS/EOS are added; one line for a tokenizer llama.cpp would read otherwise."""
    if not _bytes_token(tokenizer):
        raise UserError(f"{where}: a slow (Python) tokenizer has no GGUF mapping here; byte-level BPE fast tokenizers are supported")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    pre = _pre_type(spec.get("pre_tokenizer"))
    # NFC (Qwen2's) is accepted as llama.cpp's own converter accepts it: llama.cpp does not normalize, so only text
    # not already in NFC (rare: decomposed accents) can tokenize differently
    normalizer = spec.get("normalizer")
    if model.get("type") != "BPE" or pre is None or (normalizer and normalizer.get("type") != "NFC"):
        what = f"{model.get('type')} model, pre-tokenizer {json.dumps((spec.get('pre_tokenizer') or {}).get('type'))}"
        raise UserError(f"{where}: its tokenizer ({what}{', with a normalizer' if normalizer else ''}) has no "
                        "llama.cpp equivalent written here; supported: byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens") or []}
    for content, t in added.items():
        vocab[content] = t["id"]
    by_id = {i: s for s, i in vocab.items()}
    if rows < len(by_id) or max(by_id) >= rows:
        raise UserError(f"{where}: its tokenizer has {len(by_id)} tokens (ids to {max(by_id)}), more than the model's "
                        f"{rows} embedding rows")
    tokens, types = [], []
    for i in range(rows):  # llama.cpp token types: 1 normal, 3 control, 4 user-defined, 5 unused
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)
        else:
            tokens.append(s)
            types.append((3 if added[s].get("special") else 4) if s in added else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = bool(tokenizer.bos_token_id is not None and len(probe) > len(bare) and probe[0] == tokenizer.bos_token_id)
    add_eos = bool(tokenizer.eos_token_id is not None and len(probe) > len(bare) and probe[-1] == tokenizer.eos_token_id)
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    return dict(tokens=tokens, types=types, merges=merges, pre=pre, add_bos=add_bos, add_eos=add_eos,
                bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                unk=tokenizer.unk_token_id, chat_template=template)


# --- writing and quantizing -----------------------------------------------------------------------------------


def _write(path: Path, model: Any, arch: str, tok: dict[str, Any], dtype: str, name: str,
           extra: dict[str, str]) -> None:
    """The unquantized GGUF (``dtype`` f32 or f16 for matrices; vectors always f32)."""
    import numpy as np
    import gguf

    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    w.add_block_count(int(c.num_hidden_layers))
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count(int(heads))
    w.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or heads))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_freq_base(rope_theta(c))
    w.add_rope_dimension_count(int(head_dim))
    if head_dim * heads != c.hidden_size:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_vocab_size(len(tok["tokens"]))
    w.add_file_type(_FTYPE[dtype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                     ("unk", w.add_unk_token_id)):
        if tok[key] is not None:
            add(int(tok[key]))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])
    for k, v in extra.items():
        w.add_string(k, v)
    for tname, t in gguf_tensors(model, arch):
        w.add_tensor(tname, t.astype(np.float16 if dtype == "f16" and t.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_file(src: Path, dst: Path, quant: str, threads: int) -> None:
    """llama.cpp's quantizer: ``q8_0``/``q4_0`` pure (every matrix whose rows fit the blocks, the embedding too),
    ``q4_k_m`` as llama.cpp mixes it."""
    _, llama_cpp = need_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = _FTYPE[quant]
    if quant in ("q8_0", "q4_0"):
        params.pure = True  # every tensor the default type, embedding and head included (llama-quantize --pure)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed on {src} ({quant}): return code {rc}")


def tensor_types(path: str | Path) -> dict[str, str]:
    """``{tensor name: ggml type name}`` of a GGUF file (read with the ``gguf`` package)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def export_gguf(model_dir: str, output: str, quant: str = "q8_0", trust_remote_code: bool = False,
                threads: int | None = None) -> dict[str, Any]:
    """Export ``model_dir`` (a Hugging Face causal LM directory) to the GGUF file ``output``, quantized by ``quant``.

    Written beside ``output`` and renamed into place only after llama.cpp has loaded it, encoded
    :data:`PROBE_TEXT` to the student's own ids and scored a fixed probe batch (the figures come back,
    with sizes and tensor types).
    """
    if quant not in QUANTS:
        raise UserError(f"--quant must be one of {list(QUANTS)}, got {quant!r}")
    src, out = Path(model_dir), Path(output)
    if "://" in output:
        raise UserError(f"export output {output}: must be a local file (copy it to object storage afterwards)")
    if out.suffix != ".gguf":
        raise UserError(f"export output {output}: a GGUF export is one file; name it *.gguf")
    if out.exists():
        raise UserError(f"export output {output} already exists; choose another name")
    if not (src / "config.json").is_file():
        what = "does not exist" if not src.exists() else "has no config.json (not a Hugging Face model directory)"
        raise UserError(f"model {model_dir} {what}")
    if not any(f.name.endswith((".safetensors", ".bin")) for f in src.iterdir()):
        raise UserError(f"model {model_dir} has no weights (no *.safetensors or *.bin): was training finished?")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from softlabels.common.cli import remote_code_guard
    from softlabels.schemas import tokenizer_fingerprint
    from softlabels.trainer.export import _probe, weights_bytes
    from softlabels.trainer.student import TRAIN_RECORD

    where = f"model {model_dir}"
    with remote_code_guard(where):
        arch = _arch(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code), where)
    _, llama_cpp = need_llama_cpp()
    t0 = time.time()
    with remote_code_guard(where):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    rows = model.get_input_embeddings().weight.shape[0]
    tok = tokenizer_fields(tokenizer, rows, where)
    record = (src / TRAIN_RECORD).read_text() if (src / TRAIN_RECORD).is_file() else None
    extra = {"softlabels.tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "softlabels.quant": quant,
             "softlabels.source": str(src.resolve())}
    if record:
        extra["softlabels.train_record"] = record
    threads = threads or os.cpu_count() or 1
    make_dir(out.parent, "export output folder")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    stage, base = Path(tmp), Path(tmp + ".base")
    try:
        log.info("writing %s as GGUF (%s, %s)", model_dir, arch, "f16" if quant == "f16" else "f32 for the quantizer")
        _write(stage if quant == "f16" else base, model, arch, tok, "f16" if quant == "f16" else "f32",
               src.resolve().name, extra)
        if quant != "f16":
            log.info("quantizing to %s with llama.cpp's quantizer (%d threads)", quant, threads)
            quantize_file(base, stage, quant, threads)
            base.unlink()
        os.chmod(stage, 0o666 & ~current_umask())
        runner = GGUFCausalLM(stage, threads=threads)
        try:
            got_ids = runner.tokenize(PROBE_TEXT)
            want_ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
            if got_ids != want_ids:
                first = next((i for i, (a, b) in enumerate(zip(got_ids, want_ids)) if a != b),
                             min(len(got_ids), len(want_ids)))
                raise UserError(f"{where}: llama.cpp tokenizes a probe text differently from the student's tokenizer "
                                f"(pre-tokenizer {tok['pre']!r}; first difference at token {first}); not exported")
            ids, mask = _probe(rows)
            with torch.no_grad():
                want = model(input_ids=ids, attention_mask=mask).logits
            got = runner.logits(ids, mask)
        finally:
            runner.close()
        valid = mask.bool()
        diff = (got - want)[valid]
        probe = {"max_abs_logit_diff": float(diff.abs().max()),
                 "relative_logit_error": float(diff.norm() / want[valid].norm().clamp_min(1e-12)),
                 "top1_agreement": float((got.argmax(-1) == want.argmax(-1))[valid].float().mean()),
                 "positions": int(valid.sum())}
        if not torch.isfinite(got[valid]).all():
            raise UserError(f"{where}: the {quant} GGUF gives non-finite logits in llama.cpp")
        types = tensor_types(stage)
        os.replace(stage, out)
    except BaseException:
        for p in (stage, base):
            p.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"format": "gguf", "output": str(out), "source": str(src.resolve()), "quant": quant, "architecture": arch,
            "pre_tokenizer": tok["pre"], "chat_template": bool(tok["chat_template"]), "bytes": out.stat().st_size,
            "source_bytes": weights_bytes(src), "tensor_types": counts, "probe": probe,
            "tokenizer_probe": f"{len(want_ids)} ids equal", "threads": threads,
            "versions": {"llama_cpp_python": llama_cpp.__version__}, "export_s": round(time.time() - t0, 1)}
