"""GGUF students (issue 32): `export --format gguf` run in llama.cpp, `train --qat`, eval/compare of .gguf files.

One tiny student serves every case: its fp32 weights export to f16, q8_0 and q4_0, and its forward made
quantization-aware (`--qat q4`) is what the q4_0 file holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, bpe_tokenizer, cli_in_process

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from softlabels.trainer.gguf import GGUFCausalLM, PROBE_TEXT  # noqa: E402
from softlabels.trainer.qat import apply_qat, quantize_q4_0, quantize_q8_0  # noqa: E402

U16 = 2.0 ** -11  # fp16's unit roundoff


@pytest.fixture(scope="module")
def student(label_set, tmp_path_factory) -> Path:
    """An untrained `tiny` student (tied embeddings, 688-wide MLP) saved as `train` saves one, with its record
    (held-out share 0.2)."""
    from softlabels.schemas import open_label_set
    from softlabels.trainer.config import TrainConfig
    from softlabels.trainer.student import TRAIN_RECORD, build_student

    path = tmp_path_factory.mktemp("gguf") / "student"
    model, tok = build_student("tiny", open_label_set(label_set), seed=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    config = TrainConfig(labels=label_set, output=str(path), eval_fraction=0.2).redacted()
    (path / TRAIN_RECORD).write_text(json.dumps({"config": config}, indent=2) + "\n")
    return path


@pytest.fixture(scope="module")
def files(student) -> dict[str, Path]:
    out = {}
    for quant in ("f16", "q8_0", "q4_0"):
        path = student.parent / f"student-{quant}.gguf"
        code, stdout, err = cli_in_process("export", "--format", "gguf", "--model", str(student), "--output",
                                           str(path), "--quant", quant, "--json")
        assert code == 0, err[-3000:]
        meta = json.loads(stdout.strip().splitlines()[-1])
        assert meta["quant"] == quant and Path(meta["output"]).stat().st_size == meta["bytes"]
        out[quant] = path
    return out


def _model(student: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 31:] = 0
    return ids, mask


def _against_llama_cpp(model: torch.nn.Module, path: Path) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(relative logit error, llama.cpp's logits, the model's, valid positions)`` on the fixed batch."""
    ids, mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        want = model.eval()(input_ids=ids, attention_mask=mask).logits
    runner = GGUFCausalLM(path, threads=2)
    try:
        got = runner.logits(ids, mask)
    finally:
        runner.close()
    valid = mask.bool()
    return float((got - want)[valid].norm() / want[valid].norm()), got, want, valid


def _dequantized(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors dequantized by the gguf package, back in HF names and layouts (q/k rows un-permuted)."""
    from gguf.quants import dequantize

    c = model.config
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    back = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(
            [int(n) for n in reversed(t.shape)])
        if t.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
            continue
        if t.name == "output_norm.weight":
            out["model.norm.weight"] = w
            continue
        _, i, kind, what = t.name.split(".")
        if kind in ("attn_q", "attn_k"):
            h = heads if kind == "attn_q" else kv
            w = w.reshape(h, w.shape[0] // h // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        out[f"model.layers.{i}.{back[kind]}.{what}"] = w
    return out


def test_f16_in_llama_cpp_gives_the_students_logits_within_fp16_rounding(student, files):
    # Bound: each of the 28 matmuls (4 blocks x 7) rounds its weights and its input to fp16, each a relative RMS
    # error of at most u / sqrt(3) (u = 2^-11, uniform rounding); added in quadrature: u * sqrt(28 * 2 / 3) = 4.3 u.
    rel, got, want, valid = _against_llama_cpp(_model(student), files["f16"])
    print(f"f16 in llama.cpp: relative logit error {rel:.2e} (bound {4.5 * U16:.2e})")
    assert rel < 4.5 * U16, rel
    assert (got[~valid] == 0).all()
    assert float((got.argmax(-1) == want.argmax(-1))[valid].float().mean()) > 0.97


def test_a_qwen2_student_maps_to_llama_cpps_qwen2(tiny_teacher, tmp_path):
    """Qwen2: q/k/v biases, no rotary permutation, its own pre-tokenizer (transformers loads the tokenizer as
    Qwen2's: its regex and NFC): the file's logits in llama.cpp are the model's within fp16 rounding."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from softlabels.trainer.gguf import export_gguf

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # biases that matter
    model.save_pretrained(tmp_path / "qwen2")
    tok.save_pretrained(tmp_path / "qwen2")
    meta = export_gguf(str(tmp_path / "qwen2"), str(tmp_path / "qwen2.gguf"), "f16", threads=2)
    assert meta["architecture"] == "qwen2" and meta["pre_tokenizer"] == "qwen2"
    from softlabels.trainer.gguf import metadata_string

    assert metadata_string(tmp_path / "qwen2.gguf", "general.architecture") == "qwen2"
    rel = _against_llama_cpp(model, tmp_path / "qwen2.gguf")[0]
    assert rel < 4.5 * U16, rel


def test_q8_0_weights_are_llama_cpps_rounding_and_its_logits_within_the_derived_bound(student, files):
    model = _model(student)
    sd = model.state_dict()
    deq = _dequantized(files["q8_0"], model)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(files["q8_0"])).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # 688 columns: not a multiple of 32, llama.cpp keeps fp16
    for name, w in sd.items():
        if name == "lm_head.weight":
            continue
        got = deq[name]
        kind = types[next(k for k in types if _hf(k, name))]
        if kind == "Q8_0":
            # exactly llama.cpp's reference rounding, computed here from the fp32 weights
            assert torch.equal(got, quantize_q8_0(w)), name
            # and within half a step of the weight: d = max|x| / 127 per block of 32 (d stored in fp16)
            blocks = w.reshape(*w.shape[:-1], -1, 32)
            step = (blocks.abs().amax(-1, keepdim=True) / 127)
            err = (got.reshape(blocks.shape) - blocks).abs()
            assert bool((err <= step * (0.5 + 128 * U16) + 1e-12).all()), name
        elif kind == "F16":
            assert torch.equal(got, w.half().float()), name
        else:
            assert torch.equal(got, w), name  # norms: fp32
    # llama.cpp's logits against PyTorch's with the file's own weights: only its activation rounding remains. The
    # input of each of the 16 quantized matmuls is rounded to q8_0 blocks of 32 (relative RMS error
    # amax / (127 sqrt(12) rms), about 0.5% for Gaussian-like blocks); in quadrature: 0.5% * sqrt(16) = 2%.
    model.load_state_dict(deq, strict=False)
    rel = _against_llama_cpp(model, files["q8_0"])[0]
    print(f"q8_0 in llama.cpp vs its own weights in PyTorch: relative logit error {rel:.2e} (bound 2e-2)")
    assert rel < 0.02, rel


def _hf(gguf_name: str, hf_name: str) -> bool:
    table = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if gguf_name in table:
        return table[gguf_name] == hf_name
    parts = gguf_name.split(".")
    back = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj", "ffn_gate": "gate_proj",
            "ffn_up": "up_proj", "ffn_down": "down_proj", "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}
    return len(parts) == 4 and hf_name.startswith(f"model.layers.{parts[1]}.") and f".{back[parts[2]]}.{parts[3]}" in hf_name


def test_a_qat_students_forward_is_what_the_q4_0_file_holds(student, files):
    model = _model(student)
    apply_qat(model, "q4")
    rel, _, fake, valid = _against_llama_cpp(model, files["q4_0"])
    print(f"q4_0 in llama.cpp vs the QAT forward: relative logit error {rel:.2e} (bound 2e-2)")
    assert rel < 0.02, rel  # llama.cpp's q8_0 activations, as above
    plain = _model(student)
    plain.load_state_dict(_dequantized(files["q4_0"], plain), strict=False)
    ids, mask = _batch(plain.config.vocab_size)
    with torch.no_grad():
        held = plain(input_ids=ids, attention_mask=mask).logits
    # the same weights, to the bit, through the same operations: the same logits, to the bit
    assert torch.equal(fake[valid], held[valid])


def test_block_quantizers_match_llama_cpps_reference_formulas():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 64, generator=g)
    w[0, 5] = -4.0  # a block whose largest magnitude is negative
    w[1, 40] = 5.0
    for fn in (quantize_q8_0, quantize_q4_0):
        q = fn(w)
        assert torch.equal(fn(q), q)  # idempotent: a trained weight re-quantizes to itself
    x = w[0, :32].double()
    d = float(np.float16(-4.0 / -8))
    want = (np.minimum(15, np.floor(x.numpy() / (-4.0 / -8) + 8.5)) - 8) * d
    assert np.allclose(quantize_q4_0(w)[0, :32].double().numpy(), want, atol=0)
    amax = float(w[1, 32:].abs().max())
    want8 = np.sign(w[1, 32:].numpy()) * np.floor(np.abs(w[1, 32:].numpy() * (127 / amax)) + 0.5) * float(np.float16(amax / 127))
    assert np.allclose(quantize_q8_0(w)[1, 32:].numpy(), want8, rtol=1e-6, atol=1e-7)
    # C's roundf, halves away from zero, also for the float just below 0.5 (where floor(|x| + 0.5) in fp32 gives 1)
    from softlabels.trainer.qat import _round_away

    x = torch.tensor([0.49999997, -0.49999997, 0.5, -0.5, 1.5, 2.5, -2.5, 126.49999])
    want_r = [float(np.sign(v) * np.floor(abs(float(v)) + 0.5)) for v in x.double()]  # in double: exact
    assert _round_away(x).tolist() == want_r == [0.0, -0.0, 1.0, -1.0, 2.0, 3.0, -3.0, 126.0]
    # straight-through: the gradient passes unchanged
    from softlabels.trainer.qat import fake_quant

    p = w.clone().requires_grad_()
    (fake_quant(p, quantize_q4_0) * torch.arange(64.0)).sum().backward()
    assert torch.equal(p.grad, torch.arange(64.0).expand(3, 64))


def test_eval_scores_a_gguf_file_on_the_held_out_split_as_the_student(label_set, student, files):
    code, out, err = cli_in_process("eval", "--labels", label_set, "--model", str(student))
    assert code == 0, err[-2000:]
    torch_row = json.loads(out.strip().splitlines()[-1])
    code, out, err = cli_in_process("eval", "--labels", label_set, "--model", str(files["f16"]))
    assert code == 0, err[-2000:]
    row = json.loads(out.strip().splitlines()[-1])
    assert row["eval_fraction"] == 0.2 == torch_row["eval_fraction"]  # the record inside the file
    assert row["positions"] == torch_row["positions"]
    for key in ("ce", "kl", "bpb"):
        assert abs(row[key] - torch_row[key]) < 0.01 * abs(torch_row[key]), (key, row[key], torch_row[key])
    # compare's row for it (measured here in this process, as its child would): the same scores, and llama.cpp's speeds
    from softlabels.trainer.compare import measure

    got = measure(str(files["q8_0"]), dict(labels=label_set, storage_options={}, eval_fraction=0.2, batch_size=8,
                                           eval_batches=None, rows=2, length=32, seconds=0.1, threads=2,
                                           trust_remote_code=False, new_tokens=8))
    assert got["format"] == "gguf q8_0" and got["disk_bytes"] == files["q8_0"].stat().st_size
    assert got["source"] == str(student.resolve())
    assert got["prompt_tokens_per_s"] > 0 and got["gen_tokens_per_s"] > 0 and got["threads"] == 2
    assert got["positions"] == row["positions"] and abs(got["kl"] - row["kl"]) < 0.05 * row["kl"]


def test_bad_input_is_refused_in_one_line(label_set, student, files, tmp_path):
    code, _, err = cli_in_process("export", "--format", "gguf", "--model", str(student), "--output",
                                  str(tmp_path / "x.gguf"), "--quant", "q3_k")
    assert_one_line_error(code, err, "export", "--quant must be one of", "q3_k")
    empty = tmp_path / "empty"
    empty.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (empty / f).write_bytes((student / f).read_bytes())
    code, _, err = cli_in_process("export", "--format", "gguf", "--model", str(empty), "--output", str(tmp_path / "x.gguf"))
    assert_one_line_error(code, err, "export", "has no weights")
    other = tmp_path / "gpt2"
    other.mkdir()
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300).save_pretrained(other)
    (other / "model.safetensors").write_bytes(b"")
    code, _, err = cli_in_process("export", "--format", "gguf", "--model", str(other), "--output", str(tmp_path / "y.gguf"))
    assert_one_line_error(code, err, "export", "architecture 'gpt2'", "no GGUF mapping")
    code, _, err = cli_in_process("export", "--format", "gguf", "--model", str(student), "--output", str(tmp_path / "z.bin"))
    assert_one_line_error(code, err, "export", "name it *.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    code, _, err = cli_in_process("eval", "--labels", label_set, "--model", str(fake))
    assert_one_line_error(code, err, "eval", "not a GGUF file")
    code, _, err = cli_in_process("compare", "--labels", label_set, "--models", str(student), str(fake), "--no-plot")
    assert_one_line_error(code, err, "compare", "not a GGUF file")
    code, _, err = cli_in_process("train", "--labels", label_set, "--output", str(tmp_path / "t"), "--qat", "q2")
    assert code == 2 and "--qat" in err
    assert not list(tmp_path.glob(".*.tmp*"))  # nothing half-written left beside the outputs


def test_resume_keeps_qat(label_set, tmp_path):
    out = tmp_path / "run"
    base = ("train", "--labels", label_set, "--output", str(out), "--batch-size", "2", "--eval-batches", "1",
            "--warmup-steps", "0", "--checkpoint-every", "1")
    code, _, err = cli_in_process(*base, "--steps", "1", "--qat", "q8_0")
    assert code == 0, err[-2000:]
    assert json.loads((out / "softlabels_train.json").read_text())["config"]["qat"] == "q8_0"
    runs = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("*/run.json")]
    assert runs and all(r["qat"] == "q8_0" for r in runs)  # what a resume checks against
    code, _, err = cli_in_process(*base, "--steps", "2", "--resume")
    assert_one_line_error(code, err, "train", "qat: checkpoint 'q8_0', now None")


@pytest.fixture(scope="module")
def smollm_student(builtin_teacher, tmp_path_factory) -> Path:
    """A small random Llama with the built-in teacher's tokenizer (SmolLM2's: 49,152 tokens, ChatML template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("smollm-student")
    tok = AutoTokenizer.from_pretrained(builtin_teacher)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_the_gguf_tokenizer_and_chat_template_are_the_students(smollm_student, tmp_path):
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    out = tmp_path / "s.gguf"
    code, _, err = cli_in_process("export", "--format", "gguf", "--model", str(smollm_student), "--output", str(out),
                                  "--quant", "f16")
    assert code == 0, err[-2000:]
    tok = AutoTokenizer.from_pretrained(smollm_student)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in (PROBE_TEXT, "  leading spaces, ünïcödé, 漢字かなカナ, 🙂🙃 and 12345678901234567890"):
        assert list(llm.tokenize(text.encode(), add_bos=False, special=False)) == tok(text, add_special_tokens=False)["input_ids"]
    template = llm.metadata["tokenizer.chat_template"]
    assert template == tok.chat_template
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 🙂, what is 2+2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]
    want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    rendered = Jinja2ChatFormatter(template, eos_token=tok.eos_token or "", bos_token=tok.bos_token or "")(messages=chat)
    assert rendered.prompt == want
    # llama.cpp's own (C) renderer, from the file's template
    msgs = (llama_cpp.llama_chat_message * len(chat))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in chat])
    buf = (llama_cpp.ctypes.c_char * 4096)()
    n = llama_cpp.llama_chat_apply_template(template.encode(), msgs, len(chat), True, buf, len(buf))
    assert bytes(buf[:n]).decode() == want
    llm.close()


@pytest.mark.slow
def test_compare_peak_memory_is_the_childs_own_not_its_parents():
    """ru_maxrss survives fork and exec: a compare child started by a big process (a benchmark holding trained
    students) reported its parent's peak. VmHWM is the child's own."""
    import subprocess
    import sys

    big = bytearray(600 * 2**20)  # this process: 600 MiB more resident
    big[::4096] = b"x" * len(big[::4096])
    code = "from softlabels.trainer.speed import peak_bytes; print(peak_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 400 * 2**20, child / 2**20
    del big


def test_a_gguf_student_with_its_own_tokenizer_is_scored_across_tokenizers(label_set, tmp_path):
    """A student with another tokenizer than the set's: the file's tokenizer is read back (transformers' GGUF
    reader) and the student scored at the aligned positions, as its PyTorch self is."""
    from softlabels.schemas import open_label_set
    from softlabels.trainer.config import TrainConfig
    from softlabels.trainer.student import TRAIN_RECORD, build_student

    tok = bpe_tokenizer(tmp_path / "tok", 20, 60)
    model, tokenizer = build_student("tiny", open_label_set(label_set), seed=2, student_tokenizer=tok)
    model.save_pretrained(tmp_path / "s")
    tokenizer.save_pretrained(tmp_path / "s")
    config = TrainConfig(labels=label_set, output=str(tmp_path / "s"), eval_fraction=0.2, student_tokenizer=tok)
    (tmp_path / "s" / TRAIN_RECORD).write_text(json.dumps({"config": config.redacted()}) + "\n")
    code, _, err = cli_in_process("export", "--format", "gguf", "--model", str(tmp_path / "s"), "--quant", "f16",
                                  "--output", str(tmp_path / "s.gguf"))
    assert code == 0, err[-2000:]
    rows = []
    for spec in (tmp_path / "s", tmp_path / "s.gguf"):
        code, out, err = cli_in_process("eval", "--labels", label_set, "--model", str(spec))
        assert code == 0, err[-2000:]
        rows.append(json.loads(out.strip().splitlines()[-1]))
    torch_row, gguf_row = rows
    assert 0 < gguf_row["aligned"] == torch_row["aligned"] < 1 and gguf_row["positions"] == torch_row["positions"]
    for key in ("ce", "kl", "bpb"):
        assert abs(gguf_row[key] - torch_row[key]) < 0.01 * abs(torch_row[key]), (key, gguf_row[key], torch_row[key])
