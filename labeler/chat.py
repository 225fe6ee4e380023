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
    template = chat_template or getattr(tokenizer, "chat_template", None)
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
