"""Which int8 quantizer for `softlabels export`: the candidates side by side on this CPU.

    .venv/bin/python bench/quantizers.py [--model runs/demo-full/student]

For one student (default: a fresh `tiny` with the built-in teacher's 49,152-id
vocabulary) it times a forward pass over a fixed [8, 128] batch with:
PyTorch fp32; torch.ao.quantization.quantize_dynamic (int8 Linear); torchao's
Int8WeightOnlyConfig and Int8DynamicActivationInt8WeightConfig (only if torchao
is installed: it is not a dependency); ONNX Runtime fp32 and int8 as
`softlabels export` writes them. Prints tokens/s, the ratio to PyTorch fp32, and
the relative logit error against PyTorch fp32, all from this one run.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, seconds: float) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)  # the fastest pass: on a shared machine other work only slows passes down


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a trained student directory (default: a fresh tiny student)")
    p.add_argument("--seconds", type=float, default=4.0, help="time each candidate at least this long")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from softlabels.trainer.export import export_model, load_exported, weights_bytes
    from softlabels.trainer.student import TINY

    with tempfile.TemporaryDirectory() as tmp:
        src = args.model
        if src is None:
            from softlabels.labeler.builtin import builtin_teacher_dir

            torch.manual_seed(0)
            src = f"{tmp}/tiny"
            AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=49152, **TINY)).save_pretrained(src)
            AutoTokenizer.from_pretrained(builtin_teacher_dir("smollm2-135m")).save_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            ref = model(input_ids=ids, attention_mask=mask).logits
        rows = []

        def add(name: str, fn, size: int | None, note: str = "") -> None:
            with torch.inference_mode():
                out = fn()
                dt = timed(fn, args.seconds)
            err = float((out - ref).norm() / ref.norm())
            rows.append((name, ids.numel() / dt, size, err, note))
            print(f"  measured {name}", file=sys.stderr, flush=True)

        add("torch fp32", lambda: model(input_ids=ids, attention_mask=mask).logits, weights_bytes(src))
        import torch.ao.quantization as tq

        dyn = tq.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        add("torch.ao quantize_dynamic int8", lambda: dyn(input_ids=ids, attention_mask=mask).logits, None,
            "deprecated in torch 2.13")
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
        except ImportError:
            print("  torchao not installed: skipped (pip install torchao to include it)", file=sys.stderr)
        else:
            for name, cfg in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                              ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
                m = copy.deepcopy(model)
                quantize_(m, cfg)
                add(name, lambda m=m: m(input_ids=ids, attention_mask=mask).logits, None)
        for scheme in ("none", "int8"):
            export_model(src, f"{tmp}/{scheme}", scheme)
            onnx_model = load_exported(f"{tmp}/{scheme}")
            add(f"onnxruntime {'fp32' if scheme == 'none' else 'int8'}", lambda o=onnx_model: o.logits(ids, mask),
                weights_bytes(f"{tmp}/{scheme}"), "softlabels export" if scheme == "int8" else "")
    base = rows[0][1]
    print(f"\n{'candidate':<32}{'tokens/s':>10}{'vs fp32':>9}{'weights MB':>12}{'logit err':>11}  note")
    for name, tps, size, err, note in rows:
        mb = f"{size / 1e6:.1f}" if size else "-"
        print(f"{name:<32}{tps:>10,.0f}{tps / base:>8.2f}x{mb:>12}{err:>10.2%}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
