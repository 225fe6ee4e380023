"""Responses written by models (label --generate-with, common.generate, eval --teacher, rounds).

Fast tier: the tiny teacher writes and labels on the shared local Ray. Slow: a kill -9 mid-generation and its
resume, and two on-policy rounds with the built-in teacher and the tiny student.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softlabels.common.generate import GenerationSettings, nucleus, row_seed, sample_responses
from softlabels.schemas import open_label_set

from conftest import REPO, assert_one_line_error, cli_in_process

PROMPTS = ["The module", "def f(x):", "Return the", "A class is", "import os", "The value of", "In Python,",
           "for i in range(", "An exception", "with open(", "The keyword", "lambda x:"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prompts")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return d / "prompts.jsonl"


def gen_config(teacher: str, corpus: Path, output: str, **kw):
    from softlabels.labeler.config import LabelConfig

    base = dict(teacher=teacher, corpus=str(corpus), output=output, top_k=8, max_length=40, generate_with="teacher",
                max_new_tokens=12, sampling_temperature=0.8, top_p=0.9, samples_per_prompt=2, shard_tokens=80,
                batch_tokens=512, encoding="fp16")
    return LabelConfig(**{**base, **kw})


def samples_by_source(url: str) -> dict:
    return {s.source: s for s in open_label_set(url).iter_samples()}


@pytest.fixture(scope="module")
def written(ray_local, tiny_teacher, prompts, tmp_path_factory) -> str:
    from softlabels.labeler.job import run

    out = str(tmp_path_factory.mktemp("gen") / "set")
    summary = run(gen_config(tiny_teacher, prompts, out))
    assert summary.sequences == 2 * len(PROMPTS) and summary.shards >= 4 and summary.generated_tokens > 0
    return out


def test_teacher_written_responses_are_labeled_as_a_direct_softmax_and_sampled_as_stored(written, tiny_teacher):
    from transformers import AutoModelForCausalLM

    ls = open_label_set(written)
    m = ls.manifest
    assert m.schema_version == 7 and m.sampler_logprobs and m.target_logprobs
    assert m.generation["generator"]["id"] == "teacher" and m.generation["samples_per_prompt"] == 2
    assert m.generation["temperature"] == 0.8 and m.generation["stop_ids"] == "2"
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    responses = set()
    for s in ls.iter_samples():
        prompt_len = int(np.flatnonzero(s.trained)[0]) + 1  # the prompt is untrained, every response token trained
        assert s.trained[prompt_len - 1:-1].all() and not s.trained[-1] and not s.trained[:prompt_len - 1].any()
        response = s.input_ids[prompt_len:]
        assert 1 <= len(response) <= 12 and (len(response) == 12 or response[-1] == 2)  # budget or EOS
        responses.add(tuple(s.input_ids))
        with torch.no_grad():
            logits = model(torch.as_tensor(s.input_ids[None].astype(np.int64))).logits[0].float()
        lp = torch.log_softmax(logits, -1)[s.trained]
        direct = lp.topk(8, -1)
        np.testing.assert_array_equal(s.topk_ids, direct.indices.numpy())
        np.testing.assert_allclose(s.topk_logprobs, direct.values.numpy(), atol=1e-3, rtol=5e-4)  # fp16
        nxt = torch.as_tensor(response.astype(np.int64))[:, None]
        np.testing.assert_allclose(s.target_logprob, lp.gather(-1, nxt).squeeze(-1).numpy(), atol=1e-4)
        # the generator's log-prob of what it sampled: at its temperature, within its nucleus
        sampler = nucleus(torch.log_softmax(logits[s.trained] / 0.8, -1), 0.9).gather(-1, nxt).squeeze(-1)
        np.testing.assert_allclose(s.sampler_logprob, sampler.numpy(), atol=1e-4)
    assert len(responses) > len(PROMPTS)  # the two samples of a prompt differ (mostly)


def test_responses_depend_on_seed_prompt_and_index_only_not_on_batching(written, ray_local, tiny_teacher,
                                                                                   prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softlabels.labeler.job import run

    # the same run in other batches and other units: the same responses (other replicas: the kill -9 test below)
    other = str(tmp_path / "other")
    run(gen_config(tiny_teacher, prompts, other, batch_tokens=64, shard_tokens=200))
    a, b = samples_by_source(written), samples_by_source(other)
    assert a.keys() == b.keys()
    for src in a:
        np.testing.assert_array_equal(a[src].input_ids, b[src].input_ids)
        np.testing.assert_allclose(a[src].sampler_logprob, b[src].sampler_logprob, atol=1e-5)
    # directly: one batch for all, or one prompt per batch; another seed or index gives other responses
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    ids = [np.asarray(tok(p)["input_ids"], np.int32) for p in PROMPTS]
    settings = GenerationSettings(10, 1.0, 1.0, 1, 0)
    keys = [row_seed(0, f"p{i}", 0) for i in range(len(ids))]
    one = sample_responses(model, ids, keys, [10] * len(ids), settings, [2], len(tok), 2, batch_tokens=4096)
    each = sample_responses(model, ids, keys, [10] * len(ids), settings, [2], len(tok), 2, batch_tokens=1)
    assert [r.ids.tolist() for r in one] == [r.ids.tolist() for r in each]
    again = sample_responses(model, ids, [row_seed(1, f"p{i}", 0) for i in range(len(ids))], [10] * len(ids), settings,
                             [2], len(tok), 2)
    assert sum(x.ids.tolist() != y.ids.tolist() for x, y in zip(one, again)) >= len(ids) // 2
    greedy = sample_responses(model, ids[:2], keys[:2], [5, 5], GenerationSettings(5, 0.0), [2], len(tok), 2)
    for p, r in zip(ids[:2], greedy):  # temperature 0: the argmax, log-prob 0
        with torch.no_grad():
            full = torch.as_tensor(np.concatenate([p, r.ids])[None].astype(np.int64))
            want = model(full).logits[0, len(p) - 1:-1].argmax(-1)
        assert r.ids.tolist() == want[:len(r.ids)].tolist() and not r.logprobs.any()


def test_a_set_a_model_wrote_is_split_by_prompt(written):
    """Every response to a held-out prompt is held out (and across sets written from the same prompts: rounds)."""
    from softlabels.trainer.data import LabelDataset, held_out

    from softlabels.hf import split_key

    ls = open_label_set(written)
    # The prompts' ids hold the corpus's (temporary) path: a share that puts half the prompts on each side whatever
    # they hash to (a fixed 0.3 left all 12 on one side in about 1.4% of runs)
    keys = sorted({int(split_key(s, ls.manifest)[:8], 16) / 2**32 for s in ls.iter_samples()})
    share = (keys[len(keys) // 2 - 1] + keys[len(keys) // 2]) / 2
    by_prompt: dict[str, set[bool]] = {}
    for s in ls.iter_samples():
        by_prompt.setdefault(s.source.rpartition("#")[0], set()).add(held_out(s, ls.manifest, share))
    assert all(len(v) == 1 for v in by_prompt.values()) and {True, False} <= set().union(*by_prompt.values())
    held = {s.sample_id for s in LabelDataset(written, split="eval", eval_fraction=share, shuffle=False).labels.iter_samples()
            if held_out(s, ls.manifest, share)}
    assert held == {s.sample_id for s in ls.iter_samples()
                    if int(split_key(s, ls.manifest)[:8], 16) / 2**32 < share}


def test_training_says_whose_responses_a_set_holds(tmp_path):
    from softlabels.trainer.initfrom import policy_note

    student = tmp_path / "student"
    assert policy_note({"generator": {"id": "teacher"}}, None) == \
        "off-policy: the responses were generated by the teacher (sequence-level KD)"
    assert policy_note({"generator": {"id": str(student)}}, str(tmp_path / "other")).startswith(
        f"off-policy: the responses were generated by {student}")
    assert policy_note({"generator": {"id": str(student)}}, str(student)).startswith("on-policy")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_teacher) -> Path:
    """Prompt corpora and generators that are wrong in one way each."""
    import shutil

    d = tmp_path_factory.mktemp("bad-gen")
    (d / "long.jsonl").write_text(json.dumps({"prompt": "word " * 200}) + "\n")
    (d / "empty.jsonl").write_text(json.dumps({"prompt": "  "}) + "\n")
    (d / "answered.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    (d / "asked.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (d / "template.jinja").write_text("{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>\n{% endfor %}"
                                      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    (d / "no-weights").mkdir()
    (d / "no-weights" / "config.json").write_text("{}")
    other = d / "other-vocab"
    shutil.copytree(tiny_teacher, other)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    return d


GEN_CASES = [
    ("prompt-too-long", ["--corpus", "{d}/long.jsonl"], "leaves no room for a response"),
    ("empty-prompt", ["--corpus", "{d}/empty.jsonl"], "an empty prompt"),
    ("chat-ends-with-assistant", ["--corpus", "{d}/answered.jsonl", "--chat-template", "{d}/template.jinja"],
     "ends with an assistant turn"),
    ("generator-without-chat-template", ["--corpus", "{d}/asked.jsonl", "--chat-template", "{d}/template.jinja",
                                         "--generate-with", "{t}"], "has no chat template"),
    ("samples-per-prompt-zero", ["--samples-per-prompt", "0"], "--samples-per-prompt must be an integer >= 1"),
    ("negative-temperature", ["--sampling-temperature", "-1"], "--sampling-temperature must be a finite number >= 0"),
    ("generator-other-vocabulary", ["--generate-with", "{d}/other-vocab"], "differs from the teacher's"),
    ("generator-without-weights", ["--generate-with", "{d}/no-weights"], "holds no weights"),
    ("generator-not-a-model", ["--generate-with", "{d}/missing"], "not a model directory"),
    ("text-rows-as-prompts", ["--corpus", "pydoc"], "is plain text"),
]


@pytest.mark.parametrize("case,flags,fragment", GEN_CASES, ids=[c[0] for c in GEN_CASES])
def test_bad_generation_input_is_one_line(case, flags, fragment, bad, tiny_teacher, prompts, ray_local, tmp_path):
    args = ["label", "--teacher", tiny_teacher, "--corpus", str(prompts), "--output", str(tmp_path / "out"),
            "--generate-with", "teacher", "--max-length", "40", "--top-k", "8",
            *[f.format(d=bad, t=tiny_teacher) for f in flags]]
    code, _, err = cli_in_process(*args)
    assert_one_line_error(code, err, "label", fragment)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_format_prompt_without_a_generator_is_one_line(prompts, tiny_teacher, tmp_path):
    code, _, err = cli_in_process("label", "--teacher", tiny_teacher, "--corpus", str(prompts), "--format", "prompt",
                                  "--output", str(tmp_path / "out"))
    assert_one_line_error(code, err, "label", "--format prompt reads prompts", "--generate-with")


# -- slow: processes of their own, the built-in teacher --------------------------------------------------------

def _label_args(teacher: str, corpus: Path, url: str) -> list[str]:
    """The flags of the `written` fixture's run (gen_config), as a user types them."""
    return ["--teacher", teacher, "--corpus", str(corpus), "--output", url, "--top-k", "8", "--max-length", "40",
            "--generate-with", "teacher", "--max-new-tokens", "12", "--sampling-temperature", "0.8", "--top-p", "0.9",
            "--samples-per-prompt", "2", "--shard-tokens", "80", "--batch-tokens", "512", "--encoding", "fp16"]


@pytest.mark.slow
def test_generation_killed_mid_run_resumes_byte_identically(written, ray_local, tiny_teacher, prompts, tmp_path):
    """A driver SIGKILLed while its replica generates, then the same command again: the committed units are kept,
    the rest generated and labeled once, and the set is byte for byte the uninterrupted run's (`written`: the same
    flags, in this process, on the kept replica; the killed run is another driver with a replica of its own, on as
    many torch threads: labels computed on other thread counts may differ in the last bit, as any run's)."""
    import os

    from test_labeler_faults import markers, ray_address, set_bytes, settle

    url = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "softlabels", "label", *_label_args(tiny_teacher, prompts, url),
                             "--ray-address", ray_address()], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SOFTLABELS_CRASH_AT": "labeler.generated@4",
                                            "SOFTLABELS_CRASH_ONCE": str(tmp_path / "fired")})
    settle(proc)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    before = markers(url)
    # generation runs ahead of the shard writers: how many units were committed when it died varies, never all
    assert (tmp_path / "fired").exists() and len(before) < len(open_label_set(written).manifest.shards)
    code, _, err = cli_in_process("label", *_label_args(tiny_teacher, prompts, url))
    assert code == 0, err[-2000:]
    after = markers(url)
    assert {k: after[k] for k in before} == before, "a committed unit was generated again"
    assert set_bytes(url) == set_bytes(written)


@pytest.mark.slow
def test_two_on_policy_rounds_with_the_builtin_teacher(builtin_teacher, ray_local, tmp_path):
    """`softlabels rounds` on the built-in teacher's chat prompts from a tiny student: each round's set is written by
    the student of the round before (a generator of its own beside the teacher), the student trains on it with the
    sampled reverse-KL estimate, and a rerun of the same command resumes to the same table (nothing redone)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = tmp_path / "start"  # a tiny untrained student with the teacher's tokenizer (chat template included)
    tok = AutoTokenizer.from_pretrained(builtin_teacher)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                 eos_token_id=tok.eos_token_id, tie_word_embeddings=True)).save_pretrained(start)
    tok.save_pretrained(start)
    args = ["rounds", "--output", str(tmp_path / "rounds"), "--corpus", "pydoc-chat", "--student", str(start),
            "--rounds", "2", "--steps", "2", "--batch-size", "4", "--limit", "16", "--max-new-tokens", "6",
            "--max-length", "64", "--eval-prompts", "1", "--eval-fraction", "0.3", "--loss", "reverse-kl-sampled",
            "--json"]
    code, out, err = cli_in_process(*args)
    assert code == 0, err[-3000:]
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["generator"] == str(start.resolve()) and rows[2]["generator"] == rows[1]["student"]
    for r in rows[1:]:
        m = open_label_set(str(tmp_path / "rounds" / f"round-{r['round']:02d}" / "labels")).manifest
        assert m.generation["generator"]["id"] == r["generator"] and m.sampler_logprobs
        assert len(m.generation["generator"]["weights_sha256"]) == 64 and m.generation["seed"] == r["round"]
        assert r["steps"] == 2 and r["generated_tokens"] > 0 and np.isfinite(r["onpolicy_reverse_kl"])
    code, again, err = cli_in_process(*args)  # everything is done: resumed to the same figures
    assert code == 0, err[-3000:]
    assert [{k: v for k, v in r.items() if not k.endswith("_s")} for r in json.loads(again.strip().splitlines()[-1])] == \
        [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]
