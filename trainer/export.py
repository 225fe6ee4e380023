"""Quantized export of a trained student: ``softlabels export``.

The student is traced to ONNX (``torch.onnx.export``) and its weights are
quantized by ONNX Runtime's dynamic quantization: int8 weights with one
scale per output channel, activations quantized on the fly
(``MatMulInteger``). Why ONNX Runtime, measured on this project's 2-core AMD
EPYC (AVX2, no VNNI) with torch 2.13 CPU (``bench/quantizers.py``):

- ``torch.ao.quantization.quantize_dynamic`` warns that it is deprecated and
  will be removed, and ran no faster than fp32 here;
- torchao 0.18, its successor, installs but its int8 CPU paths ran slower
  than fp32 here (weight-only about 0.6x, dynamic about 0.1x);
- ONNX Runtime is a maintained ~17 MB wheel with no compiler step, its int8
  path ran faster than the fp32 student in torch, and the result is one
  ``.onnx`` file that loads with one call in any ONNX Runtime (Python, C++,
  C#, Java, mobile).

Tied embeddings stay tied: a student whose input embedding is its LM head
(``tiny``, SmolLM2, most small models) would otherwise store the vocabulary
matrix twice. After quantization the embedding lookup is rewritten to read
rows of the LM head's int8 matrix (one scale per row, the same numbers), so
the vocabulary matrix is stored once, in int8.

Load back with one call::

    from softlabels.trainer.export import load_exported
    model = load_exported("student-int8")          # logits = model.logits(input_ids, attention_mask)

or with ONNX Runtime alone::

    onnxruntime.InferenceSession("student-int8/model.onnx").run(
        ["logits"], {"input_ids": ids, "attention_mask": mask})   # int64 [batch, seq] -> float32 [batch, seq, vocab]

The graph scores whole sequences (no KV cache): held-out loss, reranking,
classification and prefill run on it; step-by-step generation would re-run
the whole prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from softlabels.schemas.errors import UserError

from softlabels.common.files import current_umask, make_dir

log = logging.getLogger(__name__)

SCHEMES = ("int8", "none")
ONNX_FILE = "model.onnx"
META_FILE = "softlabels_export.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx.data", ".gguf")
# ONNX keeps the graph in one protobuf under 2 GiB; larger models put their weights beside it.
_PROTOBUF_LIMIT = 1_800_000_000


def _need_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(
            f"export needs onnx and onnxruntime ({e.name} is not installed): pip install 'softlabels[export]'"
        ) from e
    return onnx, onnxruntime


def is_export_dir(path: str | Path) -> bool:
    """True for a directory written by :func:`export_model`."""
    return (Path(path) / META_FILE).is_file() and (Path(path) / ONNX_FILE).is_file()


def weights_bytes(path: str | Path) -> int | None:
    """Bytes of the weight files in a model directory (tokenizer and configs excluded), or of a weights file (a
    .gguf); None otherwise."""
    p = Path(path)
    if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES):  # one file holds it all (a .gguf)
        return p.stat().st_size
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def _logits_module(model: Any) -> Any:
    """``forward(input_ids, attention_mask) -> logits``: the signature that is traced."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits(model)


def _probe(vocab: int, seed: int = 0) -> tuple[Any, Any]:
    """A fixed batch for checking an export: 2 x 48 ids, the second row right-padded by 9."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -9:] = 0
    return ids, mask


def _tie_embedding(model: Any, vocab: int, hidden: int) -> bool:
    """Make the embedding lookup read the LM head's int8 matrix; True if the graph was rewritten.

    After ONNX Runtime's quantization the head is ``MatMulInteger(x, Wq [H, V])``
    with a per-column scale ``s [V]`` and zero point 0, so row ``v`` of the
    embedding is ``Wq[:, v] * s[v]``. The fp32 ``Gather`` over ``E [V, H]`` is
    replaced by ``Gather(Wq, ids, axis=1)`` -> float -> transpose -> ``* s[ids]``,
    and ``E`` is dropped, but only if ``E`` dequantizes to within half a step of
    ``Wq * s`` (the weights really are tied).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    head = emb_node = None
    for node in g.node:
        if node.op_type == "MatMulInteger" and node.input[1] in inits and list(inits[node.input[1]].dims) == [hidden, vocab]:
            head = node
        if node.op_type == "Gather" and node.input[0] in inits and list(inits[node.input[0]].dims) == [vocab, hidden]:
            emb_node = node
    if head is None or emb_node is None:
        return False
    wq_name = head.input[1]
    base = wq_name[: -len("_quantized")] if wq_name.endswith("_quantized") else wq_name
    scale_t, zp_t = inits.get(base + "_scale"), inits.get(base + "_zero_point")
    if scale_t is None or zp_t is None:
        return False
    wq = numpy_helper.to_array(inits[wq_name]).astype(np.float32)  # [H, V]
    scale = numpy_helper.to_array(scale_t).astype(np.float32)  # [V]
    if scale.shape != (vocab,) or np.any(numpy_helper.to_array(zp_t) != 0):
        return False
    emb = numpy_helper.to_array(inits[emb_node.input[0]])  # [V, H]
    if not np.all(np.abs(emb - (wq * scale).T) <= 0.5 * scale[:, None] + 1e-6):
        return False  # untied: the embedding keeps its own fp32 matrix
    ids, out, p = emb_node.input[1], emb_node.output[0], "/softlabels/tied_embedding/"
    axes = helper.make_tensor(p + "axes", TensorProto.INT64, [1], [-1])
    g.initializer.append(axes)
    new = [
        helper.make_node("Gather", [wq_name, ids], [p + "q"], axis=1, name=p + "gather_rows"),  # [H, B, S] int8
        helper.make_node("Cast", [p + "q"], [p + "f"], to=TensorProto.FLOAT, name=p + "cast"),
        helper.make_node("Transpose", [p + "f"], [p + "t"], perm=[1, 2, 0], name=p + "transpose"),  # [B, S, H]
        helper.make_node("Gather", [scale_t.name, ids], [p + "s"], axis=0, name=p + "gather_scales"),  # [B, S]
        helper.make_node("Unsqueeze", [p + "s", p + "axes"], [p + "s1"], name=p + "unsqueeze"),
        helper.make_node("Mul", [p + "t", p + "s1"], [out], name=p + "scale"),
    ]
    at = list(g.node).index(emb_node)
    g.node.remove(emb_node)
    for i, node in enumerate(new):
        g.node.insert(at + i, node)
    if not any(emb_node.input[0] in n.input for n in g.node):
        g.initializer.remove(inits[emb_node.input[0]])
    return True


def export_model(
    model_dir: str, output: str, scheme: str = "int8", trust_remote_code: bool = False, opset: int = 17,
) -> dict[str, Any]:
    """Export ``model_dir`` (a Hugging Face causal LM directory) to ``output`` as ONNX, quantized by ``scheme``.

    ``int8``: dynamic int8 (per-channel weights); ``none``: the fp32 graph, for
    comparison. ``output`` gets ``model.onnx``, the tokenizer, ``config.json``,
    ``softlabels_export.json`` (source, scheme, versions, sizes, and how far
    the export's logits are from the source's on a fixed probe batch) and a copy
    of the student's ``softlabels_train.json`` when it has one (so ``eval`` and
    ``compare`` find the share it held out even after the student folder moves).
    It is written beside ``output`` and renamed into place whole.
    """
    if scheme not in SCHEMES:
        raise UserError(f"--quantize must be one of {list(SCHEMES)}, got {scheme!r}")
    src, out = Path(model_dir), Path(output)
    if "://" in output:
        raise UserError(f"export output {output}: must be a local directory (copy it to object storage afterwards)")
    if not (src / "config.json").is_file():
        what = "does not exist" if not src.exists() else "has no config.json (not a Hugging Face model directory)"
        raise UserError(f"model {model_dir} {what}")
    if is_export_dir(src):
        raise UserError(f"model {model_dir} is already an export; pass the trained student's directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export output {output} already exists and is not empty; choose another directory")
    onnx, ort = _need_onnx()
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softlabels.common.cli import remote_code_guard
    from softlabels.trainer.student import TRAIN_RECORD

    t0 = time.time()
    with remote_code_guard(f"model {model_dir}"):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager", trust_remote_code=trust_remote_code
        ).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    hidden = model.get_output_embeddings().weight.shape[1]
    params = sum(p.numel() for p in model.parameters())
    make_dir(out.parent, "export output folder")
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp's 0700 would make the published directory private
    try:
        work = stage / "work"  # intermediates (and their external data), removed before publishing
        work.mkdir()
        fp32 = work / "fp32.onnx"
        ids, mask = _probe(vocab)
        log.info("tracing %s (%.1fM parameters) to ONNX", model_dir, params / 1e6)
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer's notes on transformers' shape checks and on index ops do not apply to this signature.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _logits_module(model), (ids, mask), str(fp32), input_names=["input_ids", "attention_mask"],
                output_names=["logits"], opset_version=opset, dynamo=False,
                dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "logits")},
            )
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        large = params * 4 > _PROTOBUF_LIMIT
        tied = False
        if scheme == "int8":
            log.info("quantizing to int8 (ONNX Runtime %s, dynamic, per-channel weights)", ort.__version__)
            q = work / "int8.onnx"
            root, level = logging.getLogger(), logging.getLogger().level
            root.setLevel(logging.ERROR)  # its advice to run shape pre-processing is for static quantization
            try:
                quantize_dynamic(
                    str(fp32), str(q), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                    use_external_data_format=large, extra_options={"MatMulConstBOnly": True},
                    # 7-bit weight range: without it, CPUs with AVX2 but no VNNI (this project's test machine
                    # included) saturate int16 sums in the u8 x s8 kernel; the tiny test teacher's logits
                    # were 8.2% off without it, 1.5% with it. Storage stays one byte per weight.
                    reduce_range=True,
                )
            finally:
                root.setLevel(level)
            graph = onnx.load(str(q))
            tied = _tie_embedding(graph, vocab, hidden)
        else:
            graph = onnx.load(str(fp32))
        final = stage / ONNX_FILE
        big = graph.ByteSize() > _PROTOBUF_LIMIT if not large else True
        onnx.save_model(graph, str(final), save_as_external_data=big, location=ONNX_FILE + ".data")
        onnx.checker.check_model(str(final))
        shutil.rmtree(work)
        # Check the export against the source on the probe batch, padded positions excluded.
        sess = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        valid = mask.bool()
        if not torch.isfinite(got[valid]).all():
            raise UserError(f"export of {model_dir}: the {scheme} model gives non-finite logits")
        diff = float((got - want).abs()[valid].max())
        rel = float((got - want)[valid].norm() / want[valid].norm().clamp_min(1e-12))
        agree = float((got.argmax(-1) == want.argmax(-1))[valid].float().mean())
        tokenizer.save_pretrained(stage)
        model.config.save_pretrained(stage)
        if (src / TRAIN_RECORD).is_file():  # the held-out share `eval`/`compare` use travels with the export
            shutil.copyfile(src / TRAIN_RECORD, stage / TRAIN_RECORD)
        digest = hashlib.sha256(final.read_bytes()).hexdigest()
        meta = {
            "format": "softlabels-export/1",
            "source": str(src.resolve()),
            "scheme": scheme,
            "method": ("onnxruntime.quantization.quantize_dynamic: int8 weights (7-bit range) per output channel, "
                       "activations quantized per tensor at run time" if scheme == "int8" else "fp32 ONNX graph"),
            "tied_embedding": tied,
            "parameters": params,
            "vocab_size": vocab,
            "onnx_bytes": weights_bytes(stage),
            "source_bytes": weights_bytes(src),
            "sha256": digest,
            "inputs": {"input_ids": "int64 [batch, sequence]", "attention_mask": "int64 [batch, sequence]"},
            "outputs": {"logits": "float32 [batch, sequence, vocab]"},
            "probe": {"max_abs_logit_diff": diff, "relative_logit_error": rel, "top1_agreement": agree, "positions": int(valid.sum())},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            "load": f"softlabels.trainer.export.load_exported({str(out)!r})",
            "export_s": round(time.time() - t0, 1),
        }
        (stage / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return {**meta, "output": str(out)}


class OnnxCausalLM:
    """An exported model, run by ONNX Runtime on the CPU.

    ``logits(input_ids, attention_mask)`` takes and returns torch tensors
    (int64 ``[B, S]`` in, float32 ``[B, S, V]`` out); ``meta`` is the export's
    ``softlabels_export.json``. :func:`trainer.evaluate.evaluate` accepts it
    in place of a transformers model.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        _, ort = _need_onnx()
        p = Path(path)
        if not is_export_dir(p):
            raise UserError(f"{path} is not an export directory (no {ONNX_FILE} and {META_FILE})")
        self.path = p
        self.meta = json.loads((p / META_FILE).read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(p / ONNX_FILE), options, providers=["CPUExecutionProvider"])

    def logits(self, input_ids: Any, attention_mask: Any | None = None) -> Any:
        import torch

        ids = input_ids.detach().to("cpu", torch.int64)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.detach().to("cpu", torch.int64)
        out = self.session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        return torch.from_numpy(out)

    __call__ = logits

    @property
    def parameters_count(self) -> int:
        return int(self.meta["parameters"])


def load_exported(path: str | Path, threads: int | None = None) -> OnnxCausalLM:
    """Load a directory written by ``softlabels export``: the one call to get a runnable model back."""
    return OnnxCausalLM(path, threads)
