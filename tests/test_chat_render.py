"""Chat rendering under hostile conversations and templates (labeler/chat.py, labeler/chattemplate.py).

Masks are compared with a direct computation: each template's text is built here by hand, piece by
piece, each piece marked trained or not, and tokenized piece by piece. No Ray, no teacher: a small
real tokenizer given each template's special tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import _tiny_tokenizer, assert_one_line_error, cli_in_process
from softlabels.labeler.chat import render_chat
from softlabels.labeler.chattemplate import ChatTemplate, RenderBudgetExceeded
from softlabels.schemas.errors import UserError

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# The built-in teacher's own template (SmolLM2-Instruct): a default system prompt when the first turn is not one.
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
        + SYSTEM + "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Mistral's shape: no assistant header at all, the reply follows [/INST] and ends with EOS.
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def smol_pieces(msgs):
    out = [] if msgs[0]["role"] == "system" else [(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", False)]
    for m in msgs:
        if m["role"] == "assistant" and m.get("weight", 1):
            out += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return out


def llama3_pieces(msgs):
    out = [("<|begin_of_text|>", False)]
    for m in msgs:
        out.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
        out.append((m["content"].strip() + "<|eot_id|>", m["role"] == "assistant" and bool(m.get("weight", 1))))
    return out


def mistral_pieces(msgs):
    out = [("<s>", False)]
    for m in msgs:
        if m["role"] == "user":
            out.append((f"[INST] {m['content']} [/INST]", False))
        elif m["role"] == "assistant":
            out.append((m["content"] + "</s>", bool(m.get("weight", 1))))
    return out


TEMPLATES = {"smol": (SMOL, smol_pieces), "llama3": (LLAMA3, llama3_pieces), "mistral": (MISTRAL, mistral_pieces)}


def A(content, **kw):  # noqa: N802
    return {"role": "assistant", "content": content, **kw}


def U(content):  # noqa: N802
    return {"role": "user", "content": content}


CONVERSATIONS = {
    # the probe's case: the assistant speaks first under a template that writes a default system prompt
    "assistant-first": [A("Hi"), U("x")],
    "assistant-first-in-system-prompt": [A("You"), U("Why?"), A("")],
    "empty-replies": [U("Say nothing."), A(""), U("Again."), A("")],
    "replies-in-the-markup": [{"role": "system", "content": "You are terse."}, U("assistant"), A("assistant"), U("system"),
                              A("You are terse.")],
    "reply-is-the-system-prompt": [U("Hi"), A("a helpful AI assistant named SmolLM")],
    "weight-0": [U("Hi"), A("Hello there", weight=0), U("Bye"), A("Goodbye")],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = _tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                                                        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return t


def direct(tok, pieces):
    ids, mask = [], []
    for text, trained in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        mask += [trained] * len(part)
    return ids, mask


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_assistant_turns_are_located_after_what_the_template_wrote_before_them(tok, name, conv):
    template, pieces = TEMPLATES[name]
    msgs = CONVERSATIONS[conv]
    r = render_chat(tok, msgs, chat_template=template)
    ids, mask = direct(tok, pieces(msgs))
    assert r.text == "".join(p for p, _ in pieces(msgs))
    assert r.input_ids == ids  # the pieces tokenize as the whole does (special tokens split them)
    assert r.trained == mask, [tok.decode([i]) for i, m in zip(r.input_ids, r.trained) if m]


def test_the_probes_conversation_trains_two_positions_not_the_system_prompt(tok):
    r = render_chat(tok, [A("Hi"), U("x")], chat_template=SMOL)
    trained = [tok.decode([i]) for i, m in zip(r.input_ids, r.trained) if m]
    assert "".join(trained) == "Hi<|im_end|>" and sum(r.trained) == len(tok("Hi<|im_end|>")["input_ids"])


def test_weights_other_than_0_or_1_and_all_weight_0_are_refused(tok):
    with pytest.raises(UserError, match="message 1 has weight 0.5; supported: 0"):
        render_chat(tok, [U("a"), A("b", weight=0.5)], chat_template=SMOL, where="c.jsonl:3")
    with pytest.raises(UserError, match="c.jsonl:3: no assistant turn to train on .*every one has weight 0"):
        render_chat(tok, [U("a"), A("b", weight=0)], chat_template=SMOL, where="c.jsonl:3")


def test_tool_calls_reach_the_template_and_are_trained_with_their_turn(tok):
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
                "{% for c in m.get('tool_calls', []) %}{{ '<call>' + c['function']['name'] + '</call>' }}{% endfor %}"
                "{% if m.get('tool_call_id') %}{{ '[' + m['tool_call_id'] + ']' }}{% endif %}{{ '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    msgs = [U("Weather?"), {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "weather"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"}, A("Sunny.")]
    r = render_chat(tok, msgs, chat_template=template)
    assert "<call>weather</call>" in r.text and "sunny[c1]" in r.text
    trained = tok.decode([i for i, m in zip(r.input_ids, r.trained) if m])
    assert trained == "<call>weather</call><|im_end|>Sunny.<|im_end|>"
    with pytest.raises(UserError, match="message 0 .user. has tool_calls; expected a list, on an assistant turn"):
        render_chat(tok, [{"role": "user", "content": "x", "tool_calls": [{}]}, A("y")], chat_template=template)


def test_a_long_conversation_renders_only_the_turns_that_can_fit(tok):
    """Bounded by construction: the turns rendered do not grow with the conversation, and the tokens
    that fit are those of the whole conversation rendered."""
    def conversation(turns):
        return [m for i in range(turns // 2) for m in (U(f"Question {i}?"), A(f"Answer {i}."))]

    short = render_chat(tok, conversation(40), chat_template=SMOL)
    cost = {}
    for turns in (10_000, 100_000):
        r = render_chat(tok, conversation(turns), chat_template=SMOL, max_tokens=64)
        assert not r.complete and len(r.input_ids) > 64
        assert r.input_ids[:64] == short.input_ids[:64] and r.trained[:64] == short.trained[:64]
        cost[turns] = r.rendered_turns
    assert cost[10_000] == cost[100_000] < 200, cost
    whole = render_chat(tok, conversation(6), chat_template=SMOL, max_tokens=10_000)
    assert whole.complete and whole.input_ids == render_chat(tok, conversation(6), chat_template=SMOL).input_ids


def test_one_huge_message_is_never_rendered_whole(tok):
    from softlabels.labeler.plan import PlanCounts, fit_conversation

    big = "word " * 400_000  # 2 MB: far past what 128 tokens can hold
    r = render_chat(tok, [U("Hi"), A("Short."), U(big), A("Late.")], chat_template=SMOL, max_tokens=128)
    assert not r.complete and len(r.text) < 200_000
    counts = PlanCounts()
    keep = fit_conversation(np.asarray(r.input_ids), np.asarray(r.trained), 128, counts)
    assert tok.decode(r.input_ids[:keep]).endswith("Short.<|im_end|>") and counts.truncated == 1


BIG = "{% set s = 'x' * 4000000 %}"  # 4 MB: within the size bound (64 MiB) alone
UNBOUNDED = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than 100,000 steps"),
    ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "took more than 100,000 steps"),
    ("{% for m in messages %}{% for c in m['content'] * 100000 %}{{ '' }}{% endfor %}{% endfor %}", "100,000 steps"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed too deep"),
    ("{{ 7 ** (10 ** 8) }}", "built a number of about 300,000,000 bits"),
    ("{{ (((3 ** 256) ** 256) ** 256) ** 256 }}", "built a number of about"),
    ("{{ 'x' * 1000000000 }}", "built a value of 1,000,000,000 items"),
    ("{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "built a value of"),
    ("{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "built a value of"),
    ("{{ 'x'.center(1000000000) }}", "passed 1,000,000,000 to a function"),
    ("{{ 'x' | indent(1000000000, true) }}", "passed 1,000,000,000 to a function"),
    ("{{ '%0200000000d' % 1 }}", "built a value of 200,000,000 items"),
    ("{{ '{:>200000000}'.format(1) }}", "built a value of 200,000,000 items"),
    (BIG + "{{ s.replace('', s) }}", "built a value of 16,000,00"),
    (BIG + "{{ s | replace('', s) }}", "built a value of 16,000,00"),
    (BIG + "{{ ([s] * 100) | join }}", "built a value of"),
    (BIG + "{{ s.join([s] * 100) }}", "built a value of 400,000,000 items"),
    (BIG + "{{ ('\t' * 1000000).expandtabs(1000) }}", "built a value of 1,001,000,000 items"),
    ("{{ messages | tojson(indent=1000) }}", "asked tojson for an indent over 64"),
    ("{{ strftime_now('%0900000000d') }}", "built a value of 900,000,000 items"),
]


@pytest.mark.parametrize("template,fragment", UNBOUNDED)
def test_templates_that_run_without_bound_are_stopped(tok, template, fragment):
    """Each would hang or exhaust memory unbounded; the steps are counted, so this never depends on timing."""
    with pytest.raises(RenderBudgetExceeded if "recursed" not in fragment else UserError, match=fragment) as e:
        render_chat(tok, [U("a"), A("b")], chat_template=template, steps=100_000, where="c.jsonl:9")
    assert str(e.value).startswith("c.jsonl:9: ") and "\n" not in str(e.value) and len(str(e.value)) < 300


def test_the_sandbox_keeps_transformers_guards(tok):
    """dict is a builder, not the class (dict.update would change the data); tools and documents are none."""
    with pytest.raises(UserError, match="c.jsonl:1: the chat template"):
        render_chat(tok, [U("a"), A("b")], where="c.jsonl:1",
                    chat_template="{% set x = dict.update(messages[0], {'role': 'x'}) %}{{ messages[0]['role'] }}")
    r = render_chat(tok, [U("a"), A("b")], chat_template="{{ dict(a=1)['a'] }}{{ tools is none }}{{ documents is none }}"
                    "{% for m in messages %}{{ m['content'] }}{% endfor %}", train_on="all")
    assert r.text == "1TrueTrueab"


def test_a_bound_that_is_not_a_number_is_one_line(monkeypatch):
    from softlabels.labeler.chattemplate import SECONDS_ENV, STEPS_ENV, render_bounds

    assert render_bounds() == (50_000_000, 300.0)
    for name, value in ((STEPS_ENV, "20s"), (SECONDS_ENV, "nan"), (STEPS_ENV, "-1"), (SECONDS_ENV, "inf")):
        monkeypatch.setenv(name, value)
        with pytest.raises(UserError, match=f"{name} must be a positive"):
            render_bounds()
        monkeypatch.delenv(name)


@pytest.mark.parametrize("template,fragment", [
    ("{% include 'other.jinja' %}", "{% include %}"),
    ("{% import 'macros.jinja' as m %}{{ m.x() }}", "{% import %}"),
    ("{% from 'macros.jinja' import x %}", "{% from ... import %}"),
    ("{% extends 'base.jinja' %}", "{% extends %}"),
    ("{% for m in messages %}", "not valid Jinja"),
    ("{{ " + "(" * 400 + "1" + ")" * 400 + " }}", "nests too deeply"),
    ("{% if 1 %}" * 3000 + "{% endif %}" * 3000, "nests too deeply"),
    ("{% for a in b %}" * 200 + "{% endfor %}" * 200, "nests too deeply"),
])
def test_templates_that_read_other_files_or_do_not_parse_are_refused_before_any_work(tmp_path, template, fragment):
    path = tmp_path / "t.jinja"
    path.write_text(template)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    code, _, err = cli_in_process("label", "--teacher", str(tmp_path / "no-teacher"), "--corpus", str(corpus),
                                  "--output", str(tmp_path / "out"), "--chat-template", str(path))
    assert_one_line_error(code, err, "label", f"--chat-template {path}", fragment)
    assert not (tmp_path / "out").exists()


def test_errors_inside_a_template_are_one_line_naming_the_row(tok):
    for template, fragment in (("{{ messages[0]['content'] + 1 }}", "TypeError"),
                               ("{{ raise_exception('no tools here') }}", r"refused it \(no tools here\)")):
        with pytest.raises(UserError, match=fragment) as e:
            render_chat(tok, [U("a"), A("b")], chat_template=template, where="c.jsonl:2")
        assert str(e.value).startswith("c.jsonl:2: ") and "\n" not in str(e.value)


def test_the_clock_is_pinned_and_the_date_can_be_set(tok):
    template = ("{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\\n' }}{% for m in messages %}{{ m['role'] + ': ' + "
                "m['content'] + '\\n' }}{% endfor %}")
    assert ChatTemplate(template).render([U("a")]).startswith("Today Date: 26 Jul 2024\n")
    assert ChatTemplate(template, "2025-01-31").render([U("a")]).startswith("Today Date: 31 Jan 2025\n")
    r = render_chat(tok, [U("a"), A("b")], chat_template=template, date="2025-01-31")
    assert r.text.startswith("Today Date: 31 Jan 2025\n")


def test_chat_date_is_checked_and_recorded_in_the_rendering(tmp_path):
    from softlabels.labeler.job import _rendering_record
    from softlabels.labeler.plan import Rendering

    code, _, err = cli_in_process("label", "--output", str(tmp_path / "o"), "--chat-date", "2025-02-30")
    assert_one_line_error(code, err, "label", "chat_date must be a date written YYYY-MM-DD, got '2025-02-30'")
    record = _rendering_record(Rendering("chat", "assistant", SMOL, date="2025-01-31"), True)
    assert record["date"] == "2025-01-31"
    assert "date" not in _rendering_record(Rendering("text", "all"), False)


def test_a_conversation_cut_before_its_first_trained_turn_counts_as_too_long(tok):
    from softlabels.labeler.corpus import Document
    from softlabels.labeler.plan import PlanCounts, Rendering, build_sequences, render
    from softlabels.schemas import SequenceConfig

    docs = [Document("c.jsonl:1", "", [U("word " * 40_000), A("ok")])]
    tokenized = render(docs, tok, Rendering("chat", "assistant", SMOL, max_tokens=32))
    counts = PlanCounts()
    assert not list(build_sequences(tokenized, tok.eos_token_id, SequenceConfig(max_length=32), counts))
    assert (counts.too_long, counts.untrained) == (1, 0)
