"""Typed configuration: dataclass sections, strict YAML, dotted `key=value` overrides.

Precedence is defaults < YAML < command line. Every field is documented by the string
literal that follows it in its dataclass (litgpt's `args.py` style); `describe()` turns
those into the `--help` text and the config reference. Unknown keys are errors that name
the key and the closest known one.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from collections.abc import Collection
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says what to fix."""


class _CommandLineText(str):
    """An override's value as typed: read as YAML only where the field is not text, so
    `tokenizer=0123` stays "0123" and `data.train=on` stays "on"."""


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_NULLS = ("", "~", "null", "Null", "NULL", "None")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for statement, following in zip(body, body[1:]):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(sorted(known))})"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a type annotation, converting where it is unambiguous."""
    origin = typing.get_origin(annotation)
    if isinstance(value, _CommandLineText) and annotation not in (str, Path, Any):
        if origin in (typing.Union, types.UnionType) and str in typing.get_args(annotation):
            return None if value in _NULLS and type(None) in typing.get_args(annotation) else str(value)
        try:
            value = yaml.load(value, Loader=_StrictLoader) if value.strip() else None
        except yaml.YAMLError:
            value = str(value)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return _build(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(item, arg, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        items = [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation is Path and isinstance(value, str):
        return Path(value)
    raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _build(cls: type[T], values: dict, prefix: str) -> T:
    """Make a `cls` from a (possibly partial) mapping, recursing into nested sections."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            removed = getattr(cls, "REMOVED_KEYS", {}).get(key)
            if removed:
                raise ConfigError(f"config key {where} is no longer read: {removed}")
            known = [f"{prefix}.{name}" if prefix else name for name in names]
            raise ConfigError(f"config key {where} is unknown{_suggest(where, known)}")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config section {prefix or cls.__name__}: {error}") from None


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """Turn `a.b.c=value` into `{"a": {"b": {"c": value}}}`; the value is read by the field's type."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (for example data.workers=4)")
    dotted, raw = text.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    value = _CommandLineText(raw)
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def merge_overrides(*overrides: str) -> list[str]:
    """`key=value` overrides with each key once, the last one given kept (in its place at the end): for a
    program that adds its caller's overrides to its own defaults, as load_config refuses a key given twice."""
    merged: dict[str, str] = {}
    for override in overrides:
        key = override.split("=", 1)[0]
        merged.pop(key, None)
        merged[key] = override
    return list(merged.values())


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults < YAML file < dotted overrides, checked strictly against `cls`."""
    values: dict = {}
    if path is not None:
        try:
            loaded = yaml.load(Path(path).read_text(), Loader=_StrictLoader)
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: no such file") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path}: not valid YAML ({error})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top")
        values = loaded or {}
    from_command_line: dict[str, str] = {}  # dotted key -> the override that set it
    for override in overrides:
        parsed = parse_override(override)
        for dotted in _leaf_keys(parsed):
            if dotted in from_command_line:
                # Typically an unquoted brace spec the shell expanded into one argument per shard: never keep
                # only the last one silently.
                raise ConfigError(f"config key {dotted} is given twice on the command line "
                                  f"({from_command_line[dotted]!r}, then {override!r}); give it once (quote a "
                                  f"shard spec with braces, or the shell expands it into one argument per shard)")
            _drop_alternative(cls, values, dotted, keep=from_command_line.keys())
            from_command_line[dotted] = override
        values = _deep_merge(values, parsed)
    config = _build(cls, values, "")
    _check_alternatives(config, "")
    return config


def _leaf_keys(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        keys += _leaf_keys(value, f"{dotted}.") if isinstance(value, dict) else [dotted]
    return keys


def _section_class(cls: type, path: list[str]) -> type | None:
    """The dataclass of the section at `path` (None where the path leaves the tree)."""
    for name in path:
        annotation = _hints(cls).get(name) if dataclasses.is_dataclass(cls) else None
        if annotation is None or not dataclasses.is_dataclass(annotation):
            return None
        cls = annotation
    return cls


def _drop_alternative(cls: type, values: dict, dotted: str, *, keep: Collection[str]) -> None:
    """A command-line key replaces its section's alternative to it (train.steps replaces a YAML's train.samples):
    defaults < YAML < command line, for a pair of keys of which only one can be in force."""
    *path, leaf = dotted.split(".")
    section = _section_class(cls, path)
    for pair in getattr(section, "ALTERNATIVES", ()):
        if leaf not in pair:
            continue
        other = pair[1] if pair[0] == leaf else pair[0]
        node = values
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and ".".join([*path, other]) not in keep:
            node.pop(other, None)


def _check_alternatives(config, prefix: str) -> None:
    """Two keys of a pair both set at the same level (both in the YAML, or both on the command line) is an error
    that names them, never one silently winning."""
    for first, second in getattr(type(config), "ALTERNATIVES", ()):
        if getattr(config, first) and getattr(config, second):
            raise ConfigError(f"{prefix}{first}={getattr(config, first)} and {prefix}{second}={getattr(config, second)} "
                              f"are both set, and only one of them can apply: set {prefix}{first}=0 or "
                              f"{prefix}{second}=0")
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            _check_alternatives(value, f"{prefix}{field.name}.")


def to_dict(config) -> dict:
    """A plain, YAML-safe dict of a config (tuples become lists, paths strings)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


def dump_yaml(config) -> str:
    """The fully resolved config as YAML, for the run directory."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, docstring) for every leaf field, sections in order."""
    rows = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            rows.extend(describe(annotation, prefix=f"{key}."))
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = "(required)"
        type_name = _type_name(annotation)
        rows.append((key, type_name, repr(to_dict(default) if dataclasses.is_dataclass(default) else default),
                     docs.get(field.name, "")))
    return rows


def _type_name(annotation: Any) -> str:
    """`int`, `int | None`, `tuple[float, float]`, or a Literal's choices as `a | b`."""
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(choice) for choice in typing.get_args(annotation))
    if typing.get_args(annotation):
        return str(annotation).replace("typing.", "").replace("NoneType", "None")
    return getattr(annotation, "__name__", str(annotation))


def help_text(cls: type) -> str:
    """Every config key with its type, default and docstring, for `--help`."""
    lines = ["config keys (set in YAML or as key=value; defaults < YAML < command line):"]
    for key, type_name, default, doc in describe(cls):
        lines.append(f"  {key} ({type_name}, default {default})")
        if doc:
            lines.extend("      " + line for line in textwrap.wrap(doc, 86))
    return "\n".join(lines)


def markdown_reference(cls: type) -> str:
    """Markdown tables of every config key (type, default, docstring), one per top-level section,
    each headed by its section's docstring: the README's config reference."""
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    for row in describe(cls):
        sections.setdefault(row[0].split(".")[0] if "." in row[0] else "", []).append(row)
    hints = _hints(cls)
    lines = []
    for section, rows in sections.items():
        summary = (inspect.getdoc(hints[section]) or "").split("\n\n")[0].replace("\n", " ") if section else \
            "Top-level keys."
        lines += [f"**{section or '(top level)'}**: {summary}", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for key, type_name, default, doc in rows:
            cell = " ".join(doc.split()).replace("|", "\\|")
            lines.append(f"| `{key}` | {type_name.replace('|', chr(92) + '|')} | `{default}` | {cell} |")
        lines.append("")
    return "\n".join(lines)
