"""Rendering a conversation with a chat template, and which of its tokens are trained.

A building block of chat distillation: ``render_chat`` renders a list of ``{"role", "content"}``
messages with the tokenizer's own chat template (or one given) in a bounded sandbox
(:mod:`labeler.chattemplate`: pinned date, time and size bounds), tokenizes the text once (the
template writes the special tokens it wants, BOS included, so none are added) and marks the
tokens of each assistant turn, its end-of-turn token included, as trained.

It needs no ``{% generation %}`` markers in the template. Assistant turn ``i`` is located after
what the template rendered before it, never by searching for its text: its span starts where
the conversation up to turn ``i`` rendered with the generation prompt ends, when that is a
prefix of the conversation through turn ``i`` (the assistant header is not trained); otherwise
(a first turn, a template that writes a default system prompt only when a turn follows) where
the turn's content begins, found by rendering the turn with a marker in place of its content.
It ends where the conversation through turn ``i`` ends, less trailing whitespace (the newline
many templates write after the end-of-turn token). A token is trained when it starts inside
such a span. Templates that render an earlier turn differently once later turns follow (some
drop earlier reasoning) cannot be masked this way and are refused.

With ``max_tokens`` only as many turns are rendered as can matter: the rendered prefix doubles
until it holds more than ``max_tokens`` tokens, so a conversation of 10,000 turns costs what the
turns that fit cost (the plan then cuts it after its last trained turn that fits).

Messages may carry ``weight`` (0: the turn is context, not trained; 1: trained, the default) and,
for the template to render, ``tool_calls`` (assistant), ``tool_call_id`` and ``name`` (tool).
Text inside a message that spells a special token (``<|im_end|>``) is rendered and tokenized as
the template would have it, i.e. as that special token, as transformers does by default: it can
only appear in what a row's author wrote, never in untrained positions' labels of another row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from softlabels.labeler.chattemplate import DEFAULT_DATE, DEFAULT_SECONDS, DEFAULT_STEPS, ChatTemplate
from softlabels.schemas.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "all")
# A turn's content is replaced by this marker to find where the template writes it (private-use characters,
# no whitespace, so templates that trim or test the content leave it whole).
MARKER = "\ue000softlabels-turn\ue001"
# No token of a real vocabulary covers more bytes than this: content past max_tokens x this can never fit.
MAX_TOKEN_BYTES = 1024
MAX_TOOL_DEPTH = 16


@dataclass(frozen=True)
class RenderedChat:
    text: str  # the conversation (the turns rendered) as the template renders it
    input_ids: list[int]
    trained: list[bool]  # per token: is the student trained to predict it
    complete: bool = True  # every turn rendered (False: later turns could not fit max_tokens and were left out)
    rendered_turns: int = 0  # messages passed to the template in all (the cost of rendering it)


def _plain_tool_data(value: Any, where: str, depth: int = 0) -> Any:
    if depth > MAX_TOOL_DEPTH:
        raise UserError(f"{where}: tool_calls nest deeper than {MAX_TOOL_DEPTH} levels")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain_tool_data(v, where, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_tool_data(v, where, depth + 1) for v in value]
    raise UserError(f"{where}: tool_calls hold a {type(value).__name__}; expected JSON data")


def check_messages(messages: Any, where: str = "conversation") -> list[dict[str, Any]]:
    """The messages as plain dicts (``role``, ``content``, and ``weight``, ``tool_calls``, ``tool_call_id``,
    ``name`` where given); one line naming the message when one is not usable."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise UserError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise UserError(f"{where}: message {i} needs a 'role' and a 'content'")
        role, content = m["role"], m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role)[:40] if isinstance(role, (str, int, float)) else f"a {type(role).__name__}"
            raise UserError(f"{where}: message {i} has role {shown}; expected one of {', '.join(ROLES)}")
        if content is None and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise UserError(f"{where}: message {i} ({role}) has {type(content).__name__} content; only text is supported")
        msg: dict[str, Any] = {"role": role, "content": content}
        if "weight" in m and m["weight"] is not None:
            w = m["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
                shown = repr(w) if isinstance(w, (int, float)) else f"a {type(w).__name__}"
                raise UserError(f"{where}: message {i} has weight {shown[:20]}; supported: 0 (context, not trained) "
                                "or 1 (trained)")
            if w == 0:
                msg["weight"] = 0
        if m.get("tool_calls") is not None:
            if role != "assistant" or not isinstance(m["tool_calls"], Sequence) or isinstance(m["tool_calls"], (str, bytes)):
                raise UserError(f"{where}: message {i} ({role}) has tool_calls; expected a list, on an assistant turn")
            msg["tool_calls"] = _plain_tool_data(m["tool_calls"], f"{where}: message {i}")
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise UserError(f"{where}: message {i} has a {type(m[key]).__name__} {key}; expected text")
                msg[key] = m[key]
        out.append(msg)
    return out


def trained_turn(m: Mapping[str, Any]) -> bool:
    """An assistant turn that is trained (not given weight 0)."""
    return m["role"] == "assistant" and m.get("weight", 1) != 0


def tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's default chat template (of several named ones, the default), or None."""
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, AttributeError):
        template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else None


def template_variables(tokenizer: Any) -> dict[str, Any]:
    """What transformers passes a chat template besides the messages: the special tokens' text."""
    return {k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
            if isinstance(v, (str, list))}


_TEMPLATES: dict[tuple[str, str, str], ChatTemplate] = {}


def compiled_template(tokenizer: Any, template: str, date: str) -> ChatTemplate:
    """The compiled template for this tokenizer, template and date (kept per process)."""
    variables = template_variables(tokenizer)
    key = (template, date, repr(sorted(variables.items())))
    if key not in _TEMPLATES:
        if len(_TEMPLATES) > 16:
            _TEMPLATES.clear()
        _TEMPLATES[key] = ChatTemplate(template, date, variables)
    return _TEMPLATES[key]


def render_chat(
    tokenizer: Any, messages: Any, chat_template: str | None = None, train_on: str = "assistant",
    where: str = "conversation", max_tokens: int | None = None, date: str = DEFAULT_DATE,
    steps: int = DEFAULT_STEPS, seconds: float = DEFAULT_SECONDS,
) -> RenderedChat:
    """Render, tokenize and mask one conversation (see the module doc).

    ``max_tokens``: render only the turns that can matter to a sequence of that many tokens.
    ``steps``, ``seconds``: what all its renders may take together (:mod:`labeler.chattemplate`).

    Raises:
        UserError: no chat template, a message that is not usable, no assistant turn under
            ``train_on="assistant"``, a template that fails on it or runs past its bounds
            (:class:`~labeler.chattemplate.RenderBudgetExceeded`), or one whose turns cannot be
            told apart.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, not {train_on!r}")
    text_template = chat_template or tokenizer_template(tokenizer)
    if not text_template:
        raise UserError("the tokenizer has no chat template: give one with --chat-template FILE")
    msgs = check_messages(messages, where)
    if train_on == "assistant" and not any(trained_turn(m) for m in msgs):
        raise UserError(f"{where}: no assistant turn to train on (--train-on assistant)"
                        + (" (every one has weight 0)" if any(m["role"] == "assistant" for m in msgs) else ""))
    template = compiled_template(tokenizer, text_template, date)
    turns_before = template.rendered_turns
    shown = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    complete = True
    if max_tokens is not None:
        # Content past what max_tokens tokens can hold never fits: the turns from there are not rendered.
        # Message j's content is cut just past that bound (its tokens still overflow max_tokens, so the plan
        # cuts the conversation before it or skips it as too long, as it would whole).
        bound, total = max_tokens * MAX_TOKEN_BYTES, 0
        for j, m in enumerate(shown):
            total += len(m["content"].encode("utf-8"))
            if total > bound:
                shown = [*shown[:j], {**m, "content": m["content"][:bound + 1]}]
                msgs, complete = msgs[:j + 1], False
                break
    cache: dict[tuple[int, bool], str] = {}

    def render(upto: int, generation_prompt: bool = False) -> str:
        key = (upto, generation_prompt)
        if key not in cache:
            cache[key] = template.render(shown[:upto], generation_prompt, where)
        return cache[key]

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    with template.budget(where, steps, seconds, max_chars=max(1 << 20, 4 * MAX_TOKEN_BYTES * (max_tokens or 1 << 14))):
        n = len(shown)
        if max_tokens is not None:
            # The fewest turns whose rendering holds more than max_tokens tokens (or all of them): doubling, then
            # halving the gap, so masking (which renders every turn's prefix) costs what the turns that fit cost.
            lo, n = 0, min(len(shown), 4)
            while n < len(shown) and count(render(n)) <= max_tokens:
                lo, n = n, min(len(shown), 2 * n)
            if n < len(shown) or count(render(n)) > max_tokens:
                while n - lo > 1:
                    mid = (lo + n) // 2
                    lo, n = (mid, n) if count(render(mid)) <= max_tokens else (lo, mid)
            complete = complete and n == len(shown)
        text = render(n)
        spans = []
        if train_on == "assistant":
            for i in range(n):
                if trained_turn(msgs[i]):
                    spans.append(_turn_span(render, template, shown, i, text, tokenizer, where))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on == "all":
        trained = [True] * len(ids)
    else:
        trained = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return RenderedChat(text, ids, trained, complete, template.rendered_turns - turns_before)


def _turn_span(render: Any, template: ChatTemplate, shown: list[dict[str, Any]], i: int, text: str, tokenizer: Any,
               where: str) -> tuple[int, int]:
    """Where assistant turn ``i``'s trained text starts and ends in ``text`` (see the module doc)."""
    through = render(i + 1)
    eos = getattr(tokenizer, "eos_token", None)
    if not text.startswith(through) and eos and through.rstrip().endswith(eos):
        # Templates that end a conversation with EOS (Phi-3's) write it after the last turn only.
        through = through.rstrip()[: -len(eos)]
    if not text.startswith(through):
        raise UserError(f"{where}: the chat template renders turn {i} differently once later turns follow; "
                        "its assistant tokens cannot be masked (give another with --chat-template FILE)")
    end = len(through.rstrip())
    start = -1
    if i > 0:
        before = render(i, generation_prompt=True)
        if through.startswith(before):
            start = len(before)
    if start < 0:
        # No generation prompt to go by (a first turn; a template that writes a default system prompt only
        # before a turn): render the turn with a marker for its content, after what came before it.
        prev = render(i) if i > 0 else ""
        probe = template.render([*shown[:i], {**shown[i], "content": MARKER}], False, where)
        at = probe.find(MARKER, len(prev) if probe.startswith(prev) else 0)
        if at >= len(prev) and through[:at] == probe[:at] and at <= end:
            start = at
    if start < 0:
        raise UserError(f"{where}: cannot tell where assistant turn {i} starts in what the chat template renders "
                        "(give another with --chat-template FILE)")
    return start, end


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
