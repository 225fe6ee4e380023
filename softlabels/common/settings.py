"""Settings files: a frozen config dataclass from its defaults, a ``--config`` YAML file and the flags given.

* :func:`resolve_settings` fills a config dataclass from its defaults, a YAML file (``--config``) and
  the flags given, in that order.
* :func:`load_yaml_settings` reads a ``--config`` file within bounds (size, depth, values with aliases
  expanded) before anything is built; :func:`check_file_value` types each value from the file against
  the field's annotation, as its flag would be.
* :func:`short_repr` and :func:`clip` keep messages that quote a user's values short.

PyYAML is imported lazily (only a ``--config`` file needs it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from softlabels.schemas.errors import UserError

C = TypeVar("C")

# A file of settings is a few hundred bytes. These bounds hold before anything walks or prints a value:
# aliases (&a / *a) may not expand a file past what a file of the size limit could hold.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000  # nodes, aliases expanded
MAX_CONFIG_DEPTH = 32  # nested lists and mappings


def short_repr(value: Any, limit: int = 40) -> str:
    """A repr of at most about ``limit`` characters, built without walking or printing the whole value."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"  # str() of a huge int is slow, past 4300 digits an error
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 2, 3, 3, 3, 3
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    return text if len(text) <= limit + 6 else text[:limit] + "..."


def clip(message: str, limit: int = 200) -> str:
    """``message`` cut to ``limit`` characters (messages built by code that quotes whole values)."""
    return message if len(message) <= limit else message[: limit - 3] + "..."


def load_yaml_settings(path: str, cls: type) -> dict[str, Any]:
    """Read a ``--config`` file into ``cls``'s field names (``top_k`` or ``top-k``), each value checked for its type.

    Raises:
        UserError: (one line naming the file) a file that cannot be read, is over 1 MiB, is not YAML, nests
            or expands (aliases) past the bounds above, is not a mapping of settings; an unknown, repeated or
            non-string key; a value of the wrong type (see :func:`check_file_value`).
    """
    where = f"config file {path}"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"{where}: cannot be read ({e.strerror or e})") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"{where}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a file of settings is a few hundred bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start})") from e
    data = _parse_yaml(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of settings (name: value), got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UserError(f"{where}: setting names must be strings, got {_describe(key)}")
        name = key.replace("-", "_")
        if name not in names:
            raise UserError(f"{where}: unknown setting {short_repr(key)} (known: {', '.join(names)})")
        if name in out:
            raise UserError(f"{where}: setting {name} is given twice")
        out[name] = check_file_value(name, value, hints[name], where)
    return out


def check_file_value(name: str, value: Any, hint: Any, where: str) -> Any:
    """``value`` from a file for the field ``name`` annotated ``hint``, checked (and converted) as its flag would be.

    Booleans only true/false; strings only strings (YAML's ``yes``, ``12`` or ``1.5`` are not text: quote
    them); integers ints (or text ``int()`` reads, as ``--flag 12`` is), within 64 bits; numbers ints,
    floats or text ``float()`` reads (``lr: 1e-3``, which YAML 1.1 leaves as text); ``tuple[str, ...]``
    a string or a list of strings; ``storage_options`` a mapping of names to JSON-like values (what
    ``--storage-option KEY=JSON`` gives). ``X | None`` also takes null.

    Raises:
        UserError: ``<where>: setting <name> must be <type>, got <kind> (<short repr>)``.
        TypeError: a field type this check does not know (a new field needs a rule here).
    """
    args = typing.get_args(hint)
    optional = type(None) in args and typing.get_origin(hint) in (typing.Union, types.UnionType)
    if optional:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    or_null = " or null" if optional else ""

    def refuse(expected: str, advice: str = "") -> UserError:
        return UserError(f"{where}: setting {name} must be {expected}, got {_describe(value)}{advice}")

    def out_of_range() -> UserError:
        return UserError(f"{where}: setting {name} is out of range, got {short_repr(value)}")

    if hint is bool:
        if not isinstance(value, bool):  # "false" or "no" in quotes is a string, and a string is true
            advice = "; write true or false without quotes" if isinstance(value, str) else ""
            raise refuse("true, false or null" if optional else "true or false", advice)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise refuse("a string" + or_null, "; quote it to mean the text" if isinstance(value, (int, float)) else "")
        return value
    if hint is int:
        number = value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = int(value)
        if not isinstance(number, int) or isinstance(number, bool):
            raise refuse("an integer" + or_null)
        if number.bit_length() > 63:
            raise out_of_range()
        return number
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise refuse("a number" + or_null)
        try:
            return float(value)
        except ValueError:
            raise refuse("a number" + or_null) from None
        except OverflowError:
            raise out_of_range() from None
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, ...):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise refuse("a string or a list of strings" + or_null)
        bad = [v for v in items if not isinstance(v, str)]
        if bad:
            raise UserError(f"{where}: setting {name} must be a string or a list of strings{or_null}, "
                            f"got a list holding {_describe(bad[0])}")
        return tuple(items)
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):  # storage options may hold secrets: the value is not shown
            raise UserError(f"{where}: setting {name} must be a mapping of names to values{or_null}, got {_kind(value)}")
        _check_json_like(value, name, where)
        return value
    raise TypeError(f"{name}: a setting of type {hint} has no file check")


def _check_json_like(value: Any, at: str, where: str) -> None:
    """Mappings (string keys), lists, text, numbers, booleans and null, as ``json.loads`` gives; values unquoted."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UserError(f"{where}: setting {clip(at, 80)} must have string keys, got {_kind(k)}")
            _check_json_like(v, f"{at}.{k}", where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json_like(v, f"{at}[{i}]", where)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        # a storage option may be a secret: its type is named, never its value
        raise UserError(f"{where}: setting {clip(at, 80)} must be text, a number, true/false, null, a list or a "
                        f"mapping, got {_kind(value)}")


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping",
          bytes: "binary data (!!binary)", set: "a set (!!set)", datetime.date: "a date",
          datetime.datetime: "a timestamp"}


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), f"a {type(value).__name__}")


def _describe(value: Any) -> str:
    """``a string ('false')``: the kind of a value and a short repr of it (YAML spelling for booleans)."""
    if value is None:
        return "null"
    shown = ("true" if value else "false") if isinstance(value, bool) else short_repr(value)
    return f"{_kind(value)} ({shown})"


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML, refused (one line) when it nests or expands past the bounds, before it is built."""
    import yaml

    loader_cls = _yaml_loader()
    try:
        _check_yaml_events(loader_cls(text), where)
        loader = loader_cls(text)
        try:
            node = loader.get_single_node()
            if isinstance(node, yaml.MappingNode):
                seen: set[str] = set()
                for key, _ in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                        if key.value in seen:
                            raise UserError(f"{where}: setting {clip(key.value, 60)} is given twice")
                        seen.add(key.value)
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except UserError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = ": ".join(filter(None, (e.context, e.problem)))
        raise UserError(f"{where}: not valid YAML ({clip(what, 120)}{at})") from e
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an int past 4300 digits, a bad !!timestamp
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where}: not valid YAML ({clip(first, 120)})") from e


def _check_yaml_events(loader: Any, where: str) -> None:
    """Walk the parse events once (no recursion, nothing built): depth, values and text with aliases expanded."""
    import yaml

    nodes = chars = 0
    sizes: dict[str, tuple[int, int] | None] = {}  # anchor -> its node's expanded (nodes, chars); None while open
    open_nodes: list[tuple[str | None, int, int]] = []  # (anchor, nodes, chars) where each open collection began
    try:
        while loader.check_event():
            ev = loader.get_event()
            if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                if len(open_nodes) >= MAX_CONFIG_DEPTH:
                    raise UserError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels")
                open_nodes.append((ev.anchor, nodes, chars))
                if ev.anchor is not None:
                    sizes[ev.anchor] = None
                nodes += 1
            elif isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, n0, c0 = open_nodes.pop()
                if anchor is not None:
                    sizes[anchor] = (nodes - n0, chars - c0)
            elif isinstance(ev, yaml.ScalarEvent):
                nodes, chars = nodes + 1, chars + len(ev.value)
                if ev.anchor is not None:
                    sizes[ev.anchor] = (1, len(ev.value))
            elif isinstance(ev, yaml.AliasEvent):
                if ev.anchor in sizes and sizes[ev.anchor] is None:
                    raise UserError(f"{where}: alias *{clip(ev.anchor, 40)} is inside the value it names (a value "
                                    "that contains itself)")
                n, c = sizes.get(ev.anchor) or (1, 0)  # an undefined alias: the YAML loader names it next
                nodes, chars = nodes + n, chars + c
            if nodes > MAX_CONFIG_VALUES or chars > MAX_CONFIG_BYTES:
                raise UserError(f"{where}: holds more than {MAX_CONFIG_VALUES:,} values or {MAX_CONFIG_BYTES >> 20} "
                                "MiB of text once its aliases (*name) are expanded")
    finally:
        loader.dispose()


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's safe loader (libyaml's when built), reading scalars closer to what a flag would be given.

    Dates stay text (``chat_date: 2024-07-26`` is the string ``--chat-date 2024-07-26`` gives), and so do
    YAML 1.1's octal and base-60 integers (``seed: 0123`` is 123, as ``--seed 0123``; ``1:30`` is no number).
    """
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    int_tag, time_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:timestamp"
    loader = type("SettingsLoader", (base,), {})
    loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, time_tag)]
        for first, resolvers in base.yaml_implicit_resolvers.items()
    }
    decimal_hex_binary = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
    loader.add_implicit_resolver(int_tag, decimal_hex_binary, list("-+0123456789"))

    def construct_int(self: Any, node: Any) -> int:
        if len(node.value) > 40:  # int() of a long text is slow, past 4300 digits an error; no setting is that long
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(node.value)} characters",
                                                    node.start_mark)
        return base.construct_yaml_int(self, node)

    loader.add_constructor(int_tag, construct_int)
    return loader


def resolve_settings(cls: type[C], yaml_path: str | None, flags: Mapping[str, Any], required: tuple[str, ...] = ()) -> C:
    """Build ``cls`` from its defaults, then the YAML file, then ``flags`` (only the flags given).

    ``storage_options`` from the file and from ``--storage-option`` are merged (flags win
    per key). ``required`` fields must come from one of the two.

    Raises:
        UserError: an unreadable file, an unknown key, a missing required setting, or a
            value the config class refuses.
    """
    values = load_yaml_settings(yaml_path, cls) if yaml_path else {}
    options = {**values.get("storage_options", {}), **flags.get("storage_options", {})}
    values.update({k: v for k, v in flags.items() if k != "storage_options"})
    values["storage_options"] = options
    for name in required:
        if not values.get(name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"no {name}: pass {flag} or set {name} in the --config file")
    try:
        return cls(**values)
    except TypeError as e:
        raise UserError(f"bad configuration: {e}") from e
