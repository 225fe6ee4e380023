"""Chat rendering and assistant-only masks (labeler/chat.py), through real templates and real tokenizers.

Masks are compared with a direct computation: render the conversation up to each assistant
turn (with the generation prompt) and through it, tokenize each, count the tokens.
"""

from __future__ import annotations

import pytest

from softlabels.labeler.chat import render_chat
from softlabels.schemas.errors import UserError

# Llama-3's shape (header tokens, a blank line, end of turn without a newline), written here.
LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "What does `len` return?"},
    {"role": "assistant", "content": "The number of items in a container.\nFor a string, its characters."},
    {"role": "user", "content": "And for a dict?"},
    {"role": "assistant", "content": "The number of keys:  len({'a': 1}) == 1 (café, 東京)."},
]


def render(tok, messages, template, upto, gen=False):
    return tok.apply_chat_template(messages[:upto], chat_template=template, tokenize=False, add_generation_prompt=gen)


def assistant_texts(tok, messages, template):
    """Each assistant turn's text as the template writes it: after the conversation so far with the
    generation prompt, through the turn's end (trailing whitespace aside)."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before, through = render(tok, messages, template, i, gen=True), render(tok, messages, template, i + 1)
            out.append(through[len(before): len(through.rstrip())])
    return out


def counted_mask(tok, messages, template):
    """The mask from token counts: tokenize the conversation up to each assistant turn (with the
    generation prompt) and through it. Exact where the tokenizer splits the same at turn boundaries."""
    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    mask = [False] * count(render(tok, messages, template, len(messages)))
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            for t in range(count(render(tok, messages, template, i, gen=True)),
                           count(render(tok, messages, template, i + 1).rstrip())):
                mask[t] = True
    return mask


def runs(ids, mask):
    """The token ids of each maximal run of trained tokens."""
    out, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


@pytest.fixture(scope="module")
def tokenizers(builtin_teacher, tiny_teacher):
    """The built-in teacher's tokenizer, and the tiny one given Llama-3's header and end-of-turn tokens."""
    from transformers import AutoTokenizer

    tiny = AutoTokenizer.from_pretrained(tiny_teacher)
    tiny.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                           "<|end_header_id|>", "<|eot_id|>"]})
    return {"builtin": AutoTokenizer.from_pretrained(builtin_teacher), "tiny": tiny}


@pytest.mark.parametrize("tok_name,template", [("builtin", None), ("tiny", LLAMA3_STYLE)])
def test_assistant_tokens_are_exactly_the_trained_ones(tokenizers, tok_name, template):
    tok = tokenizers[tok_name]
    template = template or tok.chat_template
    chat = render_chat(tok, CONVERSATION, chat_template=template)
    full = render(tok, CONVERSATION, template, len(CONVERSATION))
    assert chat.text == full and chat.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    # Each run of trained tokens decodes to one assistant turn as the template writes it, end of turn included.
    # (through the tokenizer: the tiny one has no byte for characters its training text lacked)
    expected = [tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in assistant_texts(tok, CONVERSATION, template)]
    assert [tok.decode(r) for r in runs(chat.input_ids, chat.trained)] == expected
    if tok_name == "builtin" and template == tok.chat_template:  # ChatML splits the same at its turn boundaries
        assert chat.trained == counted_mask(tok, CONVERSATION, template)
    everything = render_chat(tok, CONVERSATION, chat_template=template, train_on="all")
    assert everything.input_ids == chat.input_ids and all(everything.trained)


def test_the_builtin_template_adds_its_system_prompt_and_no_second_bos(tokenizers):
    tok = tokenizers["builtin"]
    chat = render_chat(tok, CONVERSATION)
    assert chat.text.startswith("<|im_start|>system\n") and chat.text.count("<|im_start|>") == 5
    first = tok.convert_ids_to_tokens(chat.input_ids[:1])[0]
    assert first == "<|im_start|>" and chat.input_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 5
    assert tok.decode([t for t, m in zip(chat.input_ids, chat.trained) if m]).endswith("<|im_end|>")


@pytest.mark.parametrize("messages,fragment", [
    ([{"role": "user"}], "message 0 needs a 'role' and a 'content'"),
    ([{"role": "wizard", "content": "x"}], "message 0 has role 'wizard'"),
    ([{"role": "user", "content": [{"type": "image"}]}], "message 0 (user) has list content; only text"),
    ([{"role": "user", "content": "hi"}], "no assistant turn to train on"),
    ([], "expected a non-empty list of messages"),
])
def test_unusable_conversations_are_refused_in_one_line(tokenizers, messages, fragment):
    with pytest.raises(UserError, match=None) as e:
        render_chat(tokenizers["builtin"], messages, where="chat.jsonl:3")
    assert fragment in str(e.value) and str(e.value).startswith("chat.jsonl:3")


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizers):
    tok = tokenizers["tiny"]
    assert not tok.chat_template
    with pytest.raises(UserError, match="has no chat template: give one with --chat-template FILE"):
        render_chat(tok, CONVERSATION)


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizers):
    # Shows only the last assistant turn in full (as templates that drop earlier reasoning do).
    template = ("{% for m in messages %}{{ m['role'] + ': ' + (m['content'] if loop.last or m['role'] != 'assistant'"
                " else '...') + '\\n' }}{% endfor %}")
    with pytest.raises(UserError, match="renders turn 1 differently once later turns follow"):
        render_chat(tokenizers["builtin"], CONVERSATION, chat_template=template)


@pytest.mark.parametrize("row,fmt", [
    ({"text": "plain"}, "text"),
    ({"messages": [], "text": "x"}, "chat"),
    ({"conversations": []}, "chat"),
    ({"prompt": "p", "response": "r"}, "prompt-completion"),
    ({"prompt": "p", "completion": "c", "text": "t"}, "prompt-completion"),
])
def test_the_format_is_told_from_a_rows_fields(row, fmt):
    from softlabels.labeler.chat import detect_format

    assert detect_format(row) == fmt


def test_rows_of_every_shape_become_the_same_messages():
    from softlabels.labeler.chat import detect_format, row_messages

    want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    openai = {"messages": want}
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello."}]}
    for row in (openai, sharegpt):
        assert row_messages(row, detect_format(row)) == want
    pc = {"prompt": "Hi", "response": "Hello."}
    assert row_messages(pc, detect_format(pc)) == want[1:]


@pytest.mark.parametrize("row,fmt,fragment", [
    ({"body": "x"}, None, "cannot tell the corpus format from a row with fields ['body']"),
    ({"prompt": "p"}, "prompt-completion", "needs 'prompt' and 'completion' (or 'response')"),
    ({"conversations": [{"from": "human"}]}, "chat", "conversation turn 0 needs a 'from' and a 'value'"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "chat", "conversation turn 0 is from 'bot'"),
    ({"conversations": "hi"}, "chat", "to be a list of turns"),
    ({"messages": [{"role": "user", "content": None}]}, "chat", "message 0 (user) has NoneType content"),
])
def test_rows_that_cannot_be_read_are_refused_in_one_line(row, fmt, fragment):
    from softlabels.labeler.chat import detect_format, row_messages

    with pytest.raises(UserError) as e:
        row_messages(row, fmt, where="data.jsonl:7") if fmt else detect_format(row)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    if fmt:
        assert str(e.value).startswith("data.jsonl:7: ")
