"""The built-in corpora (``pydoc``, ``pydoc-chat``) and HF hub datasets from the local cache.

``pydoc-chat`` is a chat corpus made without any download: for each of Python's pydoc
topics (the ones ``help()`` shows, shipped with every Python), a user asks about the
topic and the assistant answers from the topic's own text; a second user turn asks for
more and the assistant goes on with the next paragraphs. A long topic gives several
conversations, one per two answers, so the whole of its prose is used. Questions are short and vary
by topic; answers are the documentation's sentences, so a student can learn them from a
teacher. Deterministic: the same Python gives the same conversations.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

from softlabels.schemas.errors import UserError

_ASK = (
    "What does the Python documentation say about {t}?",
    "Can you explain {t} in Python?",
    "I'm reading about {t} in Python. What is it?",
    "Tell me about {t} in Python.",
    "How does Python handle {t}?",
)
_MORE = ("Can you tell me more?", "Go on, please.", "What else should I know?", "And then?")
ANSWER_CHARS = 600  # about 150 tokens per answer


def _paragraphs(text: str) -> list[str]:
    """The topic's prose paragraphs, each on one line (code examples and tables left out)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if lines and set(lines[-1].strip()) <= set("*=-~^"):  # a title and its underline
            continue
        if not lines or any(ln.startswith(("   ", "\t", ">>>", "+-", "|", "=")) for ln in lines):
            continue
        para = " ".join(ln.strip() for ln in lines)
        if len(para) > 40 and not para.startswith("*"):
            out.append(para)
    return out


def _answer(paras: list[str], start: int) -> tuple[str, int]:
    """Paragraphs from ``start`` up to about ANSWER_CHARS characters (at least one), and where it stopped."""
    parts, i = [], start
    while i < len(paras) and (not parts or sum(map(len, parts)) + len(paras[i]) <= ANSWER_CHARS):
        parts.append(paras[i])
        i += 1
    return "\n\n".join(parts), i


def conversations(topic: str, text: str) -> list[list[dict[str, str]]]:
    """The built-in conversations about one pydoc topic: its prose in answers of about ANSWER_CHARS
    characters, two answers per conversation (none if the topic has no prose)."""
    paras = _paragraphs(text)
    answers, i = [], 0
    while i < len(paras):
        answer, i = _answer(paras, i)
        answers.append(answer)
    pick = int(hashlib.sha256(topic.encode()).hexdigest()[:8], 16)
    name = topic.lower().replace("-", " ") if not topic.islower() else topic
    out = []
    for j in range(0, len(answers), 2):
        ask = _ASK[(pick + j) % len(_ASK)].format(t=name)
        if j:
            ask = f"What else does the Python documentation say about {name}?"
        messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": answers[j]}]
        if j + 1 < len(answers):
            messages += [{"role": "user", "content": _MORE[(pick + j) % len(_MORE)]},
                         {"role": "assistant", "content": answers[j + 1]}]
        out.append(messages)
    return out


def builtin_documents(name: str, start: int, stop: int, prompts: bool = False) -> Iterator[Any]:
    """Documents of a built-in corpus, topics ``[start, stop)`` in sorted order. ``prompts`` (``label
    --generate-with``): each conversation of ``pydoc-chat`` as its first question alone, a prompt."""
    from pydoc_data.topics import topics

    from softlabels.labeler.corpus import Document

    for topic in sorted(topics)[start:stop]:
        if name == "pydoc":
            yield Document(f"pydoc:{topic}", topics[topic])
            continue
        for j, messages in enumerate(conversations(topic, topics[topic])):
            yield Document(f"pydoc-chat:{topic}:{j}", "", messages[:1] if prompts else messages)


def hub_dataset_files(name: str, split: str) -> list[str]:
    """The local Arrow files of HF hub dataset ``name`` (``NAME`` or ``NAME:CONFIG``), split ``split``.

    Resolved by ``datasets`` from its cache; fetched first where there is network.

    Raises:
        UserError: ``datasets`` is not installed, or the dataset is not cached and cannot be fetched.
    """
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"--corpus hf:{name} needs HF datasets: pip install 'softlabels[hf]'") from e
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    repo, _, config = name.partition(":")
    if not repo:
        raise UserError("--corpus hf:NAME: give the dataset's name, e.g. hf:HuggingFaceH4/no_robots")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # datasets raises many kinds (ConnectionError, FileNotFoundError, DatasetNotFoundError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"hub dataset {repo!r} (split {split!r}) is not in the local cache and could not be fetched "
                        f"({type(e).__name__}: {first}); fetch it where there is network, or pass a local path") from None
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise UserError(f"hub dataset {repo!r} (split {split!r}) has no cached Arrow files (an in-memory dataset)")
    return files
