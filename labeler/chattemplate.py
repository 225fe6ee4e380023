"""Chat templates rendered in a bounded sandbox, with a pinned date.

A chat template is code that comes with the data (a tokenizer's, or ``--chat-template FILE``),
so it is rendered the way transformers renders it (Jinja's immutable sandbox, ``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``{% generation %}``, ``tojson``, ``raise_exception``,
``namespace``, ``tools`` and ``documents`` set to none, the tokenizer's special tokens as
variables) with these differences:

* ``strftime_now`` reads a pinned date (``--chat-date``, recorded in the manifest), not the
  clock: the Llama 3.x templates write today's date into the system prompt, and labels that
  depend on the day could neither be reproduced nor resumed.
* Rendering one conversation is bounded, in steps and in size. A *step* is counted at every
  call, attribute and item access, filter, operator and loop iteration the template makes; a
  conversation may take ``SOFTLABELS_CHAT_RENDER_STEPS`` of them in all its renders (default
  50 million, a few hundred times what a real template needs for a conversation that fills
  ``--max-length``). Steps are counted, not timed, so whether a row passes never depends on the
  machine's load and a resumed run renders exactly what the first run did; a wall-clock bound
  (``SOFTLABELS_CHAT_RENDER_SECONDS``, default 300 s) is only a backstop. Sizes: no string, list
  or number the template builds may pass a bound (64 MiB, 8 Mbit for numbers), and operations
  that multiply sizes (``*``, ``**``, ``%``/``format`` widths, ``replace``, ``join``, ``indent``,
  ``expandtabs``, ``tojson``'s indent) are checked *before* they run. A template past a bound
  raises :class:`RenderBudgetExceeded` (a bad row: skipped and counted with ``--on-error skip``,
  else one line), instead of hanging or exhausting a worker's memory.
* ``{% include %}``, ``{% import %}`` and ``{% extends %}`` are refused when the template is
  compiled: a template must be whole in itself, since the manifest records its sha256. Nothing
  is evaluated at compile time (Jinja folds constant expressions there, outside any bound).
* An error the template raises or runs into (``raise_exception``, an undefined variable, adding
  a string to a number) is the data's, not a bug: it becomes a one-line :class:`UserError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from softlabels.schemas.errors import UserError

DEFAULT_DATE = "2024-07-26"  # what the Llama 3.1 templates themselves fall back to ("26 Jul 2024")
STEPS_ENV, SECONDS_ENV = "SOFTLABELS_CHAT_RENDER_STEPS", "SOFTLABELS_CHAT_RENDER_SECONDS"
DEFAULT_STEPS, DEFAULT_SECONDS = 50_000_000, 300.0
MAX_RANGE = 100_000  # as Jinja's sandbox: range() longer than this is refused
MAX_INT_BITS = 1 << 23  # numbers a template builds
MAX_JSON_INDENT = 64
REFUSED_TAGS = ("Include", "Import", "FromImport", "Extends")
JINJA_MIN = (3, 1, 6)  # older versions have known sandbox escapes (CVE-2024-56326, CVE-2025-27516)


class RenderBudgetExceeded(UserError):
    """A conversation's rendering ran past its step, time or size bound (a bad row)."""


def _bound_from_env(name: str, default: float, kind: type) -> Any:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value > 0 or value != value or value == float("inf"):
        raise UserError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {raw[:40]!r}")
    return value


def render_bounds() -> tuple[int, float]:
    """``(steps, seconds)`` one conversation may take, from the environment (read on the driver, carried to
    the workers in the run's rendering settings); one line if a variable is not a positive number."""
    return _bound_from_env(STEPS_ENV, DEFAULT_STEPS, int), _bound_from_env(SECONDS_ENV, DEFAULT_SECONDS, float)


@dataclass
class _Budget:
    steps: int
    deadline: float
    seconds: float
    max_chars: int
    where: str
    used: int = 0


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("softlabels_chat_budget", default=None)


def _exceeded(b: _Budget, what: str) -> RenderBudgetExceeded:
    return RenderBudgetExceeded(f"{b.where}: the chat template {what} rendering it")


def _tick() -> None:
    b = _BUDGET.get()
    if b is None:
        return
    b.used += 1
    if b.used > b.steps:
        raise _exceeded(b, f"took more than {b.steps:,} steps (a template that loops without end?)")
    if not b.used & 1023 and time.monotonic() > b.deadline:
        raise _exceeded(b, f"ran for more than {b.seconds:g} s")


def _check_n(n: int) -> None:
    """A value of ``n`` items (characters, elements) is about to be built, or was."""
    b = _BUDGET.get()
    if b is not None and n > b.max_chars:
        raise _exceeded(b, f"built a value of {n:,} items, over the bound of {b.max_chars:,},")


def _check_size(value: Any) -> None:
    if isinstance(value, (str, list, tuple, bytes, dict)):
        _check_n(len(value))
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        b = _BUDGET.get()
        if b is not None:
            raise _exceeded(b, f"built a number of {value.bit_length():,} bits")


def _check_args(args: tuple, kwargs: Mapping[str, Any]) -> None:
    b = _BUDGET.get()
    if b is None:
        return
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > b.max_chars:
            raise _exceeded(b, f"passed {a:,} to a function, over the bound of {b.max_chars:,},")


_PRINTF = re.compile(r"%[#0 +\-]*(\d+)?(?:\.(\d+))?")
_FORMAT = re.compile(r"\{[^{}]*?:([^{}]*)\}")


def _check_format(spec: Any) -> None:
    """A format string (``%``, ``format``, ``strftime``): no width or precision past the size bound."""
    if not isinstance(spec, str):
        return
    widths = [g for m in _PRINTF.finditer(spec) for g in m.groups() if g]
    widths += [w for m in _FORMAT.finditer(spec) for w in re.findall(r"\d+", m.group(1))]
    for w in widths:
        _check_n(int(w) if len(w) <= 12 else 1 << 62)


def _estimate_call(obj: Any, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Sizes of the string methods that multiply them, checked before they run."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = args[2] if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0 else None
        hits = len(owner) + 1 if args[0] == "" else owner.count(args[0])
        _check_n(len(owner) + (hits if count is None else min(hits, count)) * len(args[1]))
    elif name == "join" and args and hasattr(args[0], "__len__"):
        _check_n(len(owner) * len(args[0]))
    elif name == "expandtabs":
        size = args[0] if args and isinstance(args[0], int) else kwargs.get("tabsize", 8)
        _check_n(len(owner) + owner.count("\t") * (size if isinstance(size, int) else 8))
    elif name in ("format", "format_map"):
        _check_format(owner)


class _Ticking:
    """What a ``for`` loop iterates, and ``range()``: a step counted at every item."""

    def __init__(self, items: Any) -> None:
        self._items = items

    def __iter__(self) -> Iterator[Any]:
        for i in self._items:
            _tick()
            yield i

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: Any) -> Any:
        return self._items[i]


def _range(*args: Any) -> _Ticking:
    _check_args(args, {})
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise OverflowError(f"range of {len(r):,} items is over the bound of {MAX_RANGE:,}")
    return _Ticking(r)


def _loop_items(items: Any) -> Any:
    """Wraps the iterable of every ``{% for %}`` (see :func:`_compile`)."""
    _tick()
    if isinstance(items, _Ticking) or not hasattr(items, "__iter__"):
        return items  # not iterable: Jinja's own error (or Undefined's) follows
    return _Ticking(items)


def _filter_estimate(name: str, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Sizes of the filters that multiply them, checked before they run."""
    if not args:
        return
    value = args[0]
    if name == "indent" and isinstance(value, str):
        width = args[1] if len(args) > 1 else kwargs.get("width", 4)
        pad = width if isinstance(width, int) else len(str(width))
        _check_n(len(value) + (value.count("\n") + 1) * pad)
    elif name == "join" and hasattr(value, "__len__"):
        sep = args[1] if len(args) > 1 else kwargs.get("d", "")
        _check_n(len(str(sep)) * len(value))
    elif name == "replace" and isinstance(value, str) and len(args) >= 3:
        old, new = str(args[1]), str(args[2])
        _check_n(len(value) + (len(value) + 1 if old == "" else value.count(old)) * len(new))
    elif name == "format":
        _check_format(value)
    elif name == "tojson":
        indent = args[2] if len(args) > 2 else kwargs.get("indent")
        if indent is not None and (len(str(indent)) if isinstance(indent, str) else indent) > MAX_JSON_INDENT:
            b = _BUDGET.get()
            if b is not None:
                raise _exceeded(b, f"asked tojson for an indent over {MAX_JSON_INDENT}")


def _bounded(name: str, f: Any) -> Any:
    """A filter that counts a step and checks sizes. Marked as taking the context, so that Jinja never runs it
    at compile time (it folds filters on constants there: ``'x' | indent(10**9)``)."""
    import jinja2
    from jinja2.utils import _PassArg

    wants = _PassArg.from_obj(f)

    @jinja2.pass_context
    @functools.wraps(f)
    def g(context: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_args(args[1:], kwargs)
        _filter_estimate(name, args, kwargs)
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


def _int_bits(x: Any) -> int:
    return abs(x).bit_length() if isinstance(x, int) and not isinstance(x, bool) else 64


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """The template compiled in the bounded environment (one line if it is not a self-contained Jinja template)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < JINJA_MIN:
        raise UserError(f"chat templates need jinja2>={'.'.join(map(str, JINJA_MIN))} (older versions have known "
                        f"sandbox escapes); this one is {jinja2.__version__}: pip install -U jinja2")

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
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _tick()
            seqs = (str, list, tuple)
            if operator == "*":
                seq, num = (left, right) if isinstance(left, seqs) else (right, left)
                if isinstance(seq, seqs) and isinstance(num, int):
                    _check_n(len(seq) * num)
                elif isinstance(left, int) and isinstance(right, int):
                    _check_bits(_int_bits(left) + _int_bits(right))
            elif operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
                _check_n(len(left) + len(right))
            elif operator == "**" and isinstance(right, (int, float)) and not isinstance(right, bool):
                if isinstance(left, int) and isinstance(right, int) and right > 0:
                    _check_bits(_int_bits(left) * right)
                elif abs(right) > 1 << 16:
                    _check_bits(1 << 62)
            elif operator == "%" and isinstance(left, str):
                _check_format(left)
            rv = super().call_binop(context, operator, left, right)
            _check_size(rv)
            return rv

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's)
            _tick()
            _check_args(args, kwargs)
            _estimate_call(__obj, args, kwargs)
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
        raise jinja2.exceptions.TemplateError(str(message)[:200])

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # optimized=False, and filters marked as taking the context: nothing of the template runs at compile time.
    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols], optimized=False)
    try:
        ast = env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template is not valid Jinja (line {e.lineno}: {_first_line(e.message or '')})") from None
    except (RecursionError, MemoryError):
        raise UserError("the chat template nests too deeply to be read") from None
    refused = sorted({type(n).__name__ for n in ast.find_all(tuple(getattr(jinja2.nodes, t) for t in REFUSED_TAGS))})
    if refused:
        tags = ", ".join("{% " + t.lower().replace("fromimport", "from ... import") + " %}" for t in refused)
        raise UserError(f"the chat template uses {tags}: a chat template must be whole in itself (the manifest "
                        "records its sha256, not the files it would read)")
    # Every loop counts a step per item, and every ~ concatenation is checked for size.
    def wrapped(fn: str, arg: Any) -> Any:
        call = jinja2.nodes.Call(jinja2.nodes.Name(fn, "load"), [arg], [], None, None)
        return call.set_lineno(arg.lineno or 1).set_environment(env)

    for node in list(ast.find_all(jinja2.nodes.For)):
        node.iter = wrapped("__softlabels_loop", node.iter)
    for node in list(ast.find_all(jinja2.nodes.Concat)):
        node.nodes = [wrapped("__softlabels_sized", n) for n in node.nodes]
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, range=_range, dict=_TemplateDict(),
                       namespace=_namespace_class(jinja2), __softlabels_loop=_loop_items, __softlabels_sized=_sized)
    try:
        return env.from_string(ast)
    except (RecursionError, SyntaxError, MemoryError):  # deep nesting: Python's compiler gives up
        raise UserError("the chat template nests too deeply to be compiled") from None


def _sized(value: Any) -> Any:
    """One operand of a ``~`` concatenation, as its text (the result is then at most a few bounded parts)."""
    _tick()
    text = str(value)
    _check_n(len(text))
    return text


def _check_bits(bits: int) -> None:
    b = _BUDGET.get()
    if b is not None and bits > MAX_INT_BITS:
        raise _exceeded(b, f"built a number of about {bits:,} bits")


class _TemplateDict:
    """``dict()`` for templates: builds a dict; no access to the class itself (``dict.update`` would mutate)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


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
            _check_format(fmt)
            return day.strftime(str(fmt)[:1000])

        self._variables = {"tools": None, "documents": None, **_plain(dict(variables or {})),
                           "strftime_now": strftime_now}
        self.rendered_turns = 0

    @contextlib.contextmanager
    def budget(self, where: str, steps: int = DEFAULT_STEPS, seconds: float = DEFAULT_SECONDS,
               max_chars: int = 64 << 20) -> Iterator[None]:
        """Bound every render inside the block together: ``steps`` and ``seconds`` in all, ``max_chars`` per value."""
        b = _Budget(steps, time.monotonic() + seconds, seconds, max_chars, where)
        token = _BUDGET.set(b)
        try:
            yield
        except MemoryError:
            raise _exceeded(b, "ran out of memory") from None
        finally:
            _BUDGET.reset(token)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, where: str = "conversation") -> str:
        """The template's text for ``messages`` (one line if the template fails on them)."""
        import jinja2

        self.rendered_turns += len(messages)
        out: list[str] = []
        n = 0
        try:
            for piece in self._template.generate(messages=_plain(messages), add_generation_prompt=add_generation_prompt,
                                                 **self._variables):
                n += len(piece)
                _check_n(n)
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


def _first_line(e: Any) -> str:
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
