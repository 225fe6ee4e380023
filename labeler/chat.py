"""Rendering a conversation with a chat template, and which of its tokens are trained.

A building block of chat distillation (issue 20): ``render_chat`` renders a list of
``{"role", "content"}`` messages with the tokenizer's own chat template (or one given),
tokenizes the text once (the template writes the special tokens it wants, BOS included,
so none are added: no missing or doubled BOS) and marks the tokens of each assistant
turn, its end-of-turn token included, as trained.

It needs no ``{% generation %}`` markers in the template. The span of assistant turn
``i`` in the rendered text starts where the conversation up to turn ``i`` rendered with
the generation prompt ends (so the assistant header is not trained) and ends where the
conversation up to and including turn ``i`` ends, less trailing whitespace (the newline
many templates write after the end-of-turn token). A token is trained when it starts
inside such a span. Templates that render an earlier turn differently once later turns
follow (some drop earlier reasoning) cannot be masked this way and are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from softlabels.schemas.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "all")


@dataclass(frozen=True)
class RenderedChat:
    text: str  # the conversation as the template renders it
    input_ids: list[int]
    trained: list[bool]  # per token: is the student trained to predict it


def check_messages(messages: Any, where: str = "conversation") -> list[dict[str, str]]:
    """The messages as plain ``{"role", "content"}`` dicts; one line naming the message when one is not usable."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise UserError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} needs a 'role' and a 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise UserError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i} ({role}) has {type(content).__name__} content; only text is supported")
        out.append({"role": role, "content": content})
    return out


def tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's default chat template (of several named ones, the default), or None."""
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, AttributeError):
        template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else None


def render_chat(
    tokenizer: Any, messages: Any, chat_template: str | None = None, train_on: str = "assistant",
    where: str = "conversation",
) -> RenderedChat:
    """Render, tokenize and mask one conversation (see the module doc).

    Raises:
        UserError: no chat template, a message that is not usable, no assistant turn under
            ``train_on="assistant"``, or a template whose turns cannot be told apart.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, not {train_on!r}")
    template = chat_template or tokenizer_template(tokenizer)
    if not template:
        raise UserError("the tokenizer has no chat template: give one with --chat-template FILE")
    msgs = check_messages(messages, where)
    if train_on == "assistant" and not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: no assistant turn to train on (--train-on assistant)")

    def render(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs[:upto], chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(len(msgs))
    spans = []
    if train_on == "assistant":
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            through = render(i + 1)
            eos = getattr(tokenizer, "eos_token", None)
            if not text.startswith(through) and eos and through.rstrip().endswith(eos):
                # Templates that end a conversation with EOS (Phi-3's) write it after the last turn only.
                through = through.rstrip()[: -len(eos)]
            if not text.startswith(through):
                raise UserError(f"{where}: the chat template renders turn {i} differently once later turns follow; "
                                "its assistant tokens cannot be masked (give another with --chat-template FILE)")
            start = -1
            if i > 0:
                before = render(i, generation_prompt=True)
                start = len(before) if through.startswith(before) else -1
            if start < 0:  # no prefix to go by (a first turn, or an unusual prompt): find the content
                start = through.find(m["content"], len(render(i)) if i > 0 else 0)
            if start < 0:
                raise UserError(f"{where}: cannot find assistant turn {i} in the rendered conversation")
            spans.append((start, len(through.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on == "all":
        trained = [True] * len(ids)
    else:
        trained = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return RenderedChat(text, ids, trained)


# -- rows as users keep them -------------------------------------------------------------------
FORMATS = ("text", "chat", "prompt-completion")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "function": "tool"}
COMPLETION_FIELDS = ("completion", "response")


def detect_format(row: Any, text_field: str = "text") -> str:
    """``text``, ``chat`` or ``prompt-completion``, from the fields of a corpus row (what ``--format auto`` chooses).

    Raises:
        UserError: the row has none of the fields any format reads.
    """
    if isinstance(row, Mapping):
        if "messages" in row or "conversations" in row:
            return "chat"
        if "prompt" in row and any(f in row for f in COMPLETION_FIELDS):
            return "prompt-completion"
        if text_field in row:
            return "text"
    fields = sorted(row) if isinstance(row, Mapping) else type(row).__name__
    raise UserError(f"cannot tell the corpus format from a row with fields {fields}: expected '{text_field}', "
                    f"'messages' (or ShareGPT 'conversations'), or 'prompt' with 'completion' or 'response'")


def row_messages(row: Mapping[str, Any], fmt: str, where: str = "row") -> list[dict[str, str]]:
    """A chat or prompt-completion row as ``{"role", "content"}`` messages (checked, one line naming ``where``).

    Chat rows: OpenAI/HF ``messages`` (``role``/``content``), or ShareGPT ``conversations``
    (``from``/``value``, with ``human``/``gpt`` for user/assistant). Prompt-completion rows:
    ``prompt`` and ``completion`` (or ``response``) become one user and one assistant turn.
    """
    if fmt == "prompt-completion":
        key = next((f for f in COMPLETION_FIELDS if f in row), None)
        if "prompt" not in row or key is None:
            raise UserError(f"{where}: a prompt-completion row needs 'prompt' and 'completion' (or 'response')")
        return check_messages([{"role": "user", "content": row["prompt"]},
                               {"role": "assistant", "content": row[key]}], where)
    if fmt != "chat":
        raise ValueError(f"row_messages reads chat and prompt-completion rows, not {fmt!r}")
    if "messages" in row:
        return check_messages(row["messages"], where)
    turns = row.get("conversations")
    if not isinstance(turns, Sequence) or isinstance(turns, (str, bytes)):
        raise UserError(f"{where}: expected 'messages' or 'conversations' to be a list of turns")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping) or "from" not in t or "value" not in t:
            raise UserError(f"{where}: conversation turn {i} needs a 'from' and a 'value'")
        if t["from"] not in SHAREGPT_ROLES:
            raise UserError(f"{where}: conversation turn {i} is from {t['from']!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return check_messages(messages, where)
