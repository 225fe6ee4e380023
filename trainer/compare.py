"""``softlabels compare``: teacher, students and quantized students side by side.

For each model: parameters, weights on disk, peak memory, tokens/s on a fixed
prompt set (CPU; and GPU when there is one, for PyTorch models), and on the
label set's held-out split the CE on true tokens, bits per byte (comparable across
tokenizers), the KL to the teacher's stored labels and top-1 agreement (for a model with
another tokenizer: at the aligned positions, over the ids that map). Every model is measured in a fresh child
process, one after the other, so peak memory is its own and no two models
compete for the cores. Prints a table and ratios, and draws a PNG bar chart.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from softlabels.schemas.errors import UserError
from softlabels.trainer.speed import peak_bytes, prompt_batch, rss_bytes, tokens_per_s, torch_speed

log = logging.getLogger(__name__)

def measure(spec: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Measure one model (in this process). ``opts``: labels, storage_options, eval_fraction, batch_size,
    eval_batches, rows, length, seconds, threads, trust_remote_code, and speed_only (time it, nothing else)."""
    import torch
    from softlabels.schemas import open_label_set
    from softlabels.trainer.data import LabelDataset
    from softlabels.trainer.evaluate import evaluate
    from softlabels.trainer.export import OnnxCausalLM, is_export_dir, weights_bytes
    from softlabels.trainer.crosstok import attach
    from softlabels.trainer.student import build_student, check_tokenizer, embedding_rows

    torch.set_num_threads(opts["threads"])
    labels = open_label_set(opts["labels"], opts["storage_options"])
    base = rss_bytes()
    row: dict[str, Any] = {"model": spec, "disk_bytes": weights_bytes(spec), "gpu_tokens_per_s": None,
                           "threads": opts["threads"]}
    if spec.endswith(".gguf"):  # run by llama.cpp: its own logits, its own prompt and generation speeds
        from softlabels.trainer.gguf_run import load_for_labels

        model, tokenizer = load_for_labels(spec, labels, threads=opts["threads"],
                                           n_ctx=opts["length"] + opts.get("new_tokens", 64) + 1)
        prompts = prompt_batch(tokenizer, opts["rows"], opts["length"])
        mask = torch.ones_like(prompts)
        quant = model.meta.get("softlabels.quant") or f"file type {model.meta.get('general.file_type', '?')}"
        row.update(format=f"gguf {quant}", parameters=model.parameters_count)

        def run() -> Any:
            return model.logits(prompts, mask)

        row.update(model.speed(prompts[0].tolist(), new_tokens=opts.get("new_tokens", 64), seconds=opts["seconds"] / 2))
    elif is_export_dir(spec):
        from transformers import AutoTokenizer

        from softlabels.common.cli import remote_code_guard

        with remote_code_guard(f"model {spec}"):
            tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=opts["trust_remote_code"])
        check_tokenizer(tokenizer, labels, spec)
        model: Any = OnnxCausalLM(spec, threads=opts["threads"])
        prompts = prompt_batch(tokenizer, opts["rows"], opts["length"])  # its own tokens (another tokenizer: other ids)
        mask = torch.ones_like(prompts)
        row.update(format=f"onnx {model.meta['scheme']}", parameters=model.parameters_count)

        def run() -> Any:
            return model.logits(prompts, mask)
    else:
        model, tokenizer = build_student(spec, labels, trust_remote_code=opts["trust_remote_code"])
        model.eval()
        prompts = prompt_batch(tokenizer, opts["rows"], opts["length"])
        mask = torch.ones_like(prompts)
        row.update(format=f"torch {str(next(model.parameters()).dtype).removeprefix('torch.')}",
                   parameters=sum(p.numel() for p in model.parameters()))

        @torch.inference_mode()
        def run() -> Any:
            return model(input_ids=prompts.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits

    tokens = prompts.numel()
    row["cpu_tokens_per_s"] = tokens_per_s(run, tokens, opts["seconds"])
    if isinstance(model, torch.nn.Module) and opts.get("generation_speed"):  # timed as llama.cpp is (GGUF rows)
        row.update(torch_speed(model, prompts[0].tolist(), opts.get("new_tokens", 64), opts["seconds"] / 2))
    row["peak_memory_bytes"] = max(0, peak_bytes() - base)
    if isinstance(model, torch.nn.Module) and torch.cuda.is_available():
        model.to("cuda")
        row["gpu_tokens_per_s"] = tokens_per_s(run, tokens, opts["seconds"], torch.cuda.synchronize)
    if opts.get("speed_only"):
        return row
    ds = LabelDataset(labels, split="eval", eval_fraction=opts["eval_fraction"], shuffle=False)
    if isinstance(model, torch.nn.Module):
        ds.max_id = embedding_rows(model)
    attach([ds], labels, tokenizer, spec)  # bits per byte; another tokenizer: aligned by the set's spans
    with torch.inference_mode():
        row.update(evaluate(model, ds, opts["batch_size"], opts["eval_batches"]))
    if opts.get("teacher") and isinstance(model, torch.nn.Module):
        row.update(_onpolicy(model, tokenizer, labels, opts))
    if isinstance(model, OnnxCausalLM):
        row["source"] = model.meta.get("source")
    if spec.endswith(".gguf"):
        row["source"] = model.meta.get("softlabels.source")
        model.close()
    return row


def _onpolicy(model: Any, tokenizer: Any, labels: Any, opts: dict[str, Any]) -> dict[str, Any]:
    """The on-policy metric (trainer.onpolicy) of a model with the set's tokenizer; nothing for another one."""
    from softlabels.schemas import tokenizer_fingerprint
    from softlabels.trainer.data import split_samples
    from softlabels.trainer.onpolicy import evaluate_onpolicy, load_teacher

    from softlabels.common.generate import GenerationSettings

    if tokenizer_fingerprint(tokenizer) != labels.manifest.tokenizer.fingerprint:
        return {}  # its responses would be in other ids than the teacher's
    settings = GenerationSettings(**opts["onpolicy"])
    teacher = load_teacher(opts["teacher"], next(model.parameters()).device, opts["trust_remote_code"])
    held = split_samples(labels, opts["eval_fraction"])
    m = evaluate_onpolicy(model, labels, teacher, held, settings, opts["prompts"])
    return {k: m[k] for k in ("onpolicy_reverse_kl", "onpolicy_teacher_logprob", "onpolicy_prompts")}


def _measure_in_child(spec: str, opts: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "softlabels.trainer.compare", json.dumps({"spec": spec, "opts": opts})],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode == 2:  # the child's run_main: a user error, already one line
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise UserError(f"model {spec}: {lines[-1] if lines else 'refused'}")
    if proc.returncode != 0:  # a bug or a crash (e.g. killed for memory): keep what it printed
        raise RuntimeError(f"measuring model {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_spec(spec: str) -> None:
    from softlabels.trainer.export import META_FILE, ONNX_FILE

    p = Path(spec)
    if spec.endswith(".gguf"):
        from softlabels.trainer.gguf_run import check_gguf

        check_gguf(spec)
        return
    if p.exists() and not (p / "config.json").is_file() and not (p / ONNX_FILE).is_file():
        raise UserError(f"model {spec} is neither a Hugging Face model directory (config.json) "
                         f"nor an export ({ONNX_FILE}, {META_FILE})")
    if not p.exists() and spec.startswith((".", "/", "~")):
        raise UserError(f"model {spec} does not exist")


def compare(
    labels: str, models: list[str], names: list[str] | None = None, *, storage_options: dict[str, Any] | None = None,
    eval_fraction: float | None = None, batch_size: int = 8, eval_batches: int | None = None, rows: int = 8,
    length: int = 128, seconds: float = 5.0, threads: int | None = None, trust_remote_code: bool = False,
    rounds: int = 2, teacher: str | None = None, prompts: int = 16, onpolicy: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Measure every model (see the module doc); returns one row per model, in order, with ``name`` set.

    Speed is timed in ``rounds`` passes over all the models in turn (the first also measures memory and
    quality, the others only time), and each model keeps its fastest round: on a shared machine a slow
    spell of a minute or two would otherwise land on whichever model was being timed then.

    Every model is scored on the same held-out samples: ``eval_fraction`` None takes the smallest share any of
    the students was trained with (their ``softlabels_train.json``; 0.05 when none has one), the samples
    none of them trained on; a given share larger than a student's own is refused
    (:func:`softlabels.trainer.student.held_out_fraction`).
    """
    from softlabels.schemas import open_label_set
    from softlabels.trainer.student import held_out_fraction

    if not models:
        raise UserError("--models needs at least one model")
    for name, value in (("--batch-size", batch_size), ("--prompt-rows", rows), ("--prompt-length", length)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if eval_batches is not None and eval_batches < 1:
        raise UserError(f"--eval-batches must be at least 1, got {eval_batches}")
    if rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {rounds}")
    names = list(names or [])
    if names and len(names) != len(models):
        raise UserError(f"--names gives {len(names)} names for {len(models)} models")
    for spec in models:
        _check_spec(spec)
    ls = open_label_set(labels, storage_options or {})  # a bad label set stops here, before any model loads
    # a share holding training samples stops here too
    fraction = held_out_fraction(models, eval_fraction, tokenizer_fingerprint=ls.manifest.tokenizer.fingerprint)
    opts = dict(labels=labels, storage_options=storage_options or {}, eval_fraction=fraction,
                batch_size=batch_size, eval_batches=eval_batches, rows=rows, length=length, seconds=seconds,
                threads=threads or os.cpu_count() or 1, trust_remote_code=trust_remote_code, teacher=teacher,
                prompts=prompts, onpolicy=onpolicy or {},
                # one prompt row and greedy generation, PyTorch rows timed as llama.cpp's: when a GGUF row is there
                generation_speed=any(m.endswith(".gguf") for m in models))
    out = []
    for i, spec in enumerate(models):
        name = names[i] if names else Path(spec.rstrip("/")).name or spec
        log.info("measuring %s (%d/%d): %s", name, i + 1, len(models), spec)
        t = time.time()
        row = {"name": name, **_measure_in_child(spec, opts)}
        log.info("  %s: %.0f tokens/s on CPU, held-out CE %.3f (%.0f s)", name, row["cpu_tokens_per_s"], row["ce"],
                 time.time() - t)
        out.append(row)
    for r in range(2, rounds + 1):
        log.info("speed round %d/%d", r, rounds)
        for row, spec in zip(out, models):
            again = _measure_in_child(spec, {**opts, "speed_only": True})
            for key in ("cpu_tokens_per_s", "gpu_tokens_per_s", "prompt_tokens_per_s", "gen_tokens_per_s"):
                if again.get(key):
                    row[key] = max(row[key] or 0.0, again[key])
            log.info("  %s: %.0f tokens/s on CPU (best so far %.0f)", row["name"], again["cpu_tokens_per_s"],
                     row["cpu_tokens_per_s"])
    for row in out:
        row["rounds"] = rounds
        row["eval_fraction"] = fraction
    return out


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.1f} MB"


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Lines comparing each model with the first, and each export with its source when both are in ``rows``."""
    lines = []
    first = rows[0]
    for r in rows[1:]:
        parts = [f"{first['parameters'] / r['parameters']:.1f}x fewer parameters"]
        if first["disk_bytes"] and r["disk_bytes"]:
            parts.append(f"{first['disk_bytes'] / r['disk_bytes']:.1f}x smaller on disk")
        parts.append(f"{r['cpu_tokens_per_s'] / first['cpu_tokens_per_s']:.1f}x the CPU tokens/s")
        lines.append(f"{r['name']} vs {first['name']}: " + ", ".join(parts))
    by_path = {str(Path(r["model"]).resolve()): r for r in rows if Path(r["model"]).exists()}
    for r in rows:
        src = by_path.get(r.get("source") or "")
        if src is None or src is r:
            continue
        disk = src["disk_bytes"] / r["disk_bytes"] if src["disk_bytes"] and r["disk_bytes"] else float("nan")
        lines.append(
            f"{r['name']} vs {src['name']}: {disk:.2f}x smaller on disk, held-out CE "
            f"{100 * (r['ce'] / src['ce'] - 1):+.3f}%, KL {100 * (r['kl'] / src['kl'] - 1):+.3f}%, "
            f"{r['cpu_tokens_per_s'] / src['cpu_tokens_per_s']:.2f}x the CPU tokens/s"
        )
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    gpu = any(r.get("gpu_tokens_per_s") for r in rows)
    onpolicy = any("onpolicy_reverse_kl" in r for r in rows)
    llama = any(r.get("gen_tokens_per_s") for r in rows)
    head = ["model", "format", "params", "on disk", "peak mem", "CPU tok/s"] + (["GPU tok/s"] if gpu else []) + (
        ["1-row pp/tg tok/s"] if llama else []) + [
        "held-out CE", "bits/byte", "KL to teacher", "top-1"] + (["on-policy KL", "teacher lp"] if onpolicy else [])
    body = []
    for r in rows:
        cells = [r["name"], r["format"], f"{r['parameters'] / 1e6:.1f}M", _mb(r["disk_bytes"]),
                 f"{r['peak_memory_bytes'] / 2**20:.0f} MiB", f"{r['cpu_tokens_per_s']:,.0f}"]
        if gpu:
            cells.append(f"{r['gpu_tokens_per_s']:,.0f}" if r.get("gpu_tokens_per_s") else "-")
        if llama:
            cells.append(f"{r['prompt_tokens_per_s']:,.0f} / {r['gen_tokens_per_s']:,.0f}" if r.get("gen_tokens_per_s") else "-")
        cells += [f"{r['ce']:.3f}", "-" if r.get("bpb") is None else f"{r['bpb']:.3f}", f"{r['kl']:.4f}" if r["kl"] < 0.01 else f"{r['kl']:.3f}", f"{r['top1']:.3f}"]
        if onpolicy:
            cells += [f"{r['onpolicy_reverse_kl']:.3f}", f"{r['onpolicy_teacher_logprob']:.3f}"] if "onpolicy_reverse_kl" in r \
                else ["-", "-"]
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        (c.ljust(w) if i < 2 else c.rjust(w)) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])


def plot(rows: list[dict[str, Any]], png: str) -> None:
    """One bar chart per measure, one bar per model."""
    from softlabels.common.plot import pyplot, save_png

    plt = pyplot(png)
    panels = [
        ("parameters (M)", [r["parameters"] / 1e6 for r in rows]),
        ("weights on disk (MB)", [(r["disk_bytes"] or 0) / 1e6 for r in rows]),
        ("peak memory (MiB)", [r["peak_memory_bytes"] / 2**20 for r in rows]),
        ("CPU tokens/s", [r["cpu_tokens_per_s"] for r in rows]),
        ("held-out CE (nats/token)", [r["ce"] for r in rows]),
        ("KL to teacher labels (nats)", [r["kl"] for r in rows]),
        ("top-1 agreement", [r["top1"] for r in rows]),
    ]
    if all(r.get("bpb") is not None for r in rows):
        panels.append(("held-out bits per byte", [r["bpb"] for r in rows]))
    fig, grid = plt.subplots(2, 4, figsize=(13, 7))
    axes = list(grid.flat)
    for ax in axes[len(panels):]:
        ax.axis("off")
    names = [r["name"] for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(range(len(rows)), values, color=colors)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        for b, v in zip(bars, values):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=7)
    fig.tight_layout()
    save_png(fig, png)


def _worker_main() -> int:
    """Child entry: measure one model, print its row as JSON; errors as one line on stderr."""
    from softlabels.common.cli import run_main, setup_logging

    setup_logging(False)
    job = json.loads(sys.argv[1])

    def body() -> int:
        print(json.dumps(measure(job["spec"], job["opts"])))
        return 0

    return run_main(body, False, "compare")


if __name__ == "__main__":
    sys.exit(_worker_main())
