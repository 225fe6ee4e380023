"""Chat templates rendered in a bounded sandbox, with a pinned date.

A chat template is code that comes with the data (a tokenizer's, or ``--chat-template FILE``),
so it is rendered the way transformers renders it (Jinja's immutable sandbox, ``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``{% generation %}``, ``tojson``, ``raise_exception``,
``namespace``, the tokenizer's special tokens as variables) with four differences:

* ``strftime_now`` reads a pinned date (``--chat-date``, recorded in the manifest), not the
  clock: the Llama 3.x templates write today's date into the system prompt, and labels that
  depend on the day could neither be reproduced nor resumed.
* Rendering one conversation is bounded: a time budget (checked at every call, attribute and
  item access, filter and loop step the template makes), a cap on the characters it writes and
  on any one string or list it builds. A template that loops without end, or one that builds a
  gigabyte string, becomes :class:`RenderBudgetExceeded` (a bad row: skipped and counted with
  ``--on-error skip``, else one line), instead of a hang or an out-of-memory kill.
* ``{% include %}``, ``{% import %}`` and ``{% extends %}`` are refused when the template is
  compiled: a template must be whole in itself, since the manifest records its sha256.
* An error the template raises or runs into (``raise_exception``, an undefined variable, adding
  a string to a number) is the data's, not a bug: it becomes a one-line :class:`UserError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from softlabels.schemas.errors import UserError

DEFAULT_DATE = "2024-07-26"  # what the Llama 3.1 templates themselves fall back to ("26 Jul 2024")
# Seconds one conversation may take to render (all the renders its mask needs, together).
RENDER_SECONDS = float(os.environ.get("SOFTLABELS_CHAT_RENDER_SECONDS", "20"))
MAX_RANGE = 100_000  # as Jinja's sandbox: range() longer than this is refused
REFUSED_TAGS = ("Include", "Import", "FromImport", "Extends")


class RenderBudgetExceeded(UserError):
    """A conversation's rendering ran past its time or size bound (a bad row)."""


@dataclass
class _Budget:
    deadline: float
    max_chars: int
    seconds: float
    where: str


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("softlabels_chat_budget", default=None)


def _tick() -> None:
    b = _BUDGET.get()
    if b is not None and time.monotonic() > b.deadline:
        raise RenderBudgetExceeded(f"{b.where}: the chat template ran for more than {b.seconds:g} s rendering it "
                                   "(a template that loops without end?)")


def _check_size(value: Any) -> None:
    b = _BUDGET.get()
    if b is not None and isinstance(value, (str, list, tuple, bytes)) and len(value) > b.max_chars:
        raise RenderBudgetExceeded(f"{b.where}: the chat template built a value of {len(value):,} items rendering it, "
                                   f"over the bound of {b.max_chars:,}")


def _check_args(args: tuple, kwargs: Mapping[str, Any]) -> None:
    b = _BUDGET.get()
    if b is None:
        return
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > b.max_chars:
            raise RenderBudgetExceeded(f"{b.where}: the chat template passed {a:,} to a function rendering it, "
                                       f"over the bound of {b.max_chars:,}")


class _Ticking:
    """``range()`` for templates: at most MAX_RANGE items, the budget checked at every step."""

    def __init__(self, r: range) -> None:
        self._r = r

    def __iter__(self) -> Iterator[int]:
        for i in self._r:
            _tick()
            yield i

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i: Any) -> Any:
        return self._r[i]


def _range(*args: Any) -> _Ticking:
    _check_args(args, {})
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise OverflowError(f"range of {len(r):,} items is over the bound of {MAX_RANGE:,}")
    return _Ticking(r)


def _bounded(f: Any) -> Any:
    """A filter that checks the budget. Marked as taking the context, so that Jinja never runs it at compile time
    (it folds filters on constants there, outside any bound: ``'x' | indent(10**9)``)."""
    import jinja2
    from jinja2.utils import _PassArg

    wants = _PassArg.from_obj(f)

    @jinja2.pass_context
    @functools.wraps(f)
    def g(context: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_args(args, kwargs)
        if wants is _PassArg.context:
            args = (context, *args)
        elif wants is _PassArg.eval_context:
            args = (context.eval_ctx, *args)
        elif wants is _PassArg.environment:
            args = (context.environment, *args)
        rv = f(*args, **kwargs)
        _check_size(rv)
        return rv

    return g


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant marker): renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _tick()
            b = _BUDGET.get()
            if b is not None:
                seq, num = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                if operator == "*" and isinstance(seq, (str, list, tuple)) and isinstance(num, int):
                    _check_size_n(len(seq) * num, b)
                elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                    _check_size_n(len(left) + len(right), b)
                elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 256:
                    raise RenderBudgetExceeded(f"{b.where}: the chat template raised a number to the power {right}")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's)
            _tick()
            _check_args(args, kwargs)
            rv = super().call(__context, __obj, *args, **kwargs)
            _check_size(rv)
            return rv

        def getattr(self, obj: Any, attribute: str) -> Any:
            _tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _tick()
            return super().getitem(obj, argument)

    def raise_exception(message: Any) -> None:
        raise jinja2.exceptions.TemplateError(str(message))

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # optimized=False: no constant folding at compile time, where a filter on constants (indent(10**9)) would run
    # outside any bound
    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols], optimized=False)
    try:
        ast = env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    refused = sorted({type(n).__name__ for n in ast.find_all(tuple(getattr(jinja2.nodes, t) for t in REFUSED_TAGS))})
    if refused:
        tags = ", ".join("{% " + t.lower().replace("fromimport", "from ... import") + " %}" for t in refused)
        raise UserError(f"the chat template uses {tags}: a chat template must be whole in itself (the manifest "
                        "records its sha256, not the files it would read)")
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = _range
    env.globals["dict"] = dict
    env.globals["namespace"] = _namespace_class(jinja2)
    return env.from_string(template)


def _namespace_class(jinja2: Any) -> type:
    class Namespace(jinja2.utils.Namespace):
        """``namespace()``: no underscore names (they lead to Python's internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: namespace(self=...) works
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name[:40]!r} starts with an underscore")

    return Namespace


def _check_size_n(n: int, b: _Budget) -> None:
    if n > b.max_chars:
        raise RenderBudgetExceeded(f"{b.where}: the chat template built a value of {n:,} items rendering it, "
                                   f"over the bound of {b.max_chars:,}")


def check_template(template: str) -> None:
    """Compile ``template`` now (one line if it is not valid Jinja or reads other files)."""
    _compile(template)


class ChatTemplate:
    """A chat template compiled once, rendered within a budget (see the module doc).

    ``variables``: what the template sees besides ``messages`` and ``add_generation_prompt``
    (the tokenizer's special tokens: ``bos_token``, ``eos_token``, ...).
    ``rendered_turns`` counts the messages passed to every render, for tests and bounds.
    """

    def __init__(self, template: str, date: str = DEFAULT_DATE, variables: Mapping[str, Any] | None = None) -> None:
        self._template = _compile(template)
        day = datetime.fromisoformat(date)

        def strftime_now(fmt: Any) -> str:
            return day.strftime(str(fmt))

        self._variables = {**_plain(dict(variables or {})), "strftime_now": strftime_now}
        self.rendered_turns = 0

    @contextlib.contextmanager
    def budget(self, where: str, seconds: float = RENDER_SECONDS, max_chars: int = 64 << 20) -> Iterator[None]:
        """Bound every render inside the block together: ``seconds`` in all, ``max_chars`` per value."""
        token = _BUDGET.set(_Budget(time.monotonic() + seconds, max_chars, seconds, where))
        try:
            yield
        finally:
            _BUDGET.reset(token)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, where: str = "conversation") -> str:
        """The template's text for ``messages`` (one line if the template fails on them)."""
        import jinja2

        self.rendered_turns += len(messages)
        b = _BUDGET.get()
        out: list[str] = []
        n = 0
        try:
            for piece in self._template.generate(messages=_plain(messages), add_generation_prompt=add_generation_prompt,
                                                 **self._variables):
                n += len(piece)
                if b is not None and n > b.max_chars:
                    _check_size_n(n, b)
                out.append(piece)
        except UserError:
            raise
        except jinja2.TemplateError as e:
            raise UserError(f"{where}: the chat template refused it ({_first_line(e)})") from None
        except RecursionError:
            raise UserError(f"{where}: the chat template recursed too deep rendering it") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
            raise UserError(f"{where}: the chat template failed on it ({type(e).__name__}: {_first_line(e)})") from None
        return "".join(out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _plain(value: Any) -> Any:
    """JSON-like data only (the sandbox sees no objects with methods of their own)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):  # subclasses (enums, numpy strings) may carry methods of their own
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return f"<{type(value).__name__}>"
