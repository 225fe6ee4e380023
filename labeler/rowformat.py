"""What a corpus row is (``--format``), which of its fields hold it, and which tokens are trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from softlabels.labeler import chat
from softlabels.schemas.errors import UserError

ROW_FORMATS = ("auto", *chat.FORMATS, "prompt")  # prompt: plain-text prompts (label --generate-with)


class BadRow(UserError):
    """One row cannot be decoded; ``--on-error skip`` skips it, ``fail`` stops the job."""


@dataclass(frozen=True)
class RowFormat:
    """What a corpus row is (``--format``) and which fields hold it (the field-name flags)."""

    format: str = "auto"  # auto, text, chat, prompt-completion
    text_field: str = "text"
    messages_field: str | None = None  # chat: default 'messages', else 'conversations' (ShareGPT)
    prompt_field: str = "prompt"
    completion_field: str | None = None  # default 'completion', else 'response'
    train_on: str | None = None  # all, assistant (chat), completion (prompt-completion); None: the format's default
    prompts: bool = False  # --generate-with: rows are prompts (chat rows end with a user turn, no completion needed)

    def __post_init__(self) -> None:
        if self.format not in ROW_FORMATS:
            raise UserError(f"--format {self.format!r}: choose one of {', '.join(ROW_FORMATS)}")

    def messages(self, obj: Any, where: str) -> list[dict[str, Any]]:
        """A chat or prompt-completion row as checked messages (UserError naming ``where`` if not usable)."""
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if self.format == "prompt-completion" and self.prompts:  # the prompt only: the generator writes the rest
            if self.prompt_field not in obj:
                raise UserError(f"{where}: no field {self.prompt_field!r} (found {sorted(obj)[:12]}); use --prompt-field")
            return chat.check_messages([{"role": "user", "content": obj[self.prompt_field]}], where)
        if self.format == "prompt-completion":
            key = self.completion_field or next((f for f in chat.COMPLETION_FIELDS if f in obj), "completion")
            view = {k: obj[f] for k, f in (("prompt", self.prompt_field), ("completion", key)) if f in obj}
            return chat.row_messages(view, "prompt-completion", where)
        key = self.messages_field or next((f for f in ("messages", "conversations") if f in obj), None)
        if key is None or key not in obj:
            raise UserError(f"{where}: no field {key or 'messages'!r} (found {sorted(obj)}); use --messages-field")
        turns = obj[key]
        sharegpt = isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]
        msgs = chat.row_messages({"conversations" if sharegpt else "messages": turns}, "chat", where)
        if self.train_on == "assistant" and not self.prompts and not any(chat.trained_turn(m) for m in msgs):
            weighted = any(m["role"] == "assistant" for m in msgs)
            raise UserError(f"{where}: no assistant turn to train on (--train-on assistant)"
                            + (" (every one has weight 0)" if weighted else ""))
        return msgs


def default_train_on(fmt: str, train_on: str | None) -> str:
    """``--train-on`` for a format: its default when not given; one line when it does not fit."""
    default = {"text": "all", "chat": "assistant", "prompt-completion": "completion", "prompt": "completion"}[fmt]
    if train_on in (None, "auto"):
        return default
    if train_on != "all" and train_on != default:
        raise UserError(f"--train-on {train_on} does not fit {fmt} rows (choose all or {default})")
    return train_on


def text_field(obj: Any, name: str, where: str) -> str:
    """The text in field ``name`` of a row (``BadRow`` naming ``where`` if the row has none)."""
    if not isinstance(obj, dict) or name not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise BadRow(f"{where}: no field {name!r} (found {keys}); use --text-field")
    text = obj[name]
    if text is not None and not isinstance(text, str):
        raise BadRow(f"{where}: field {name!r} is {type(text).__name__}, not text")
    return text or ""
