"""Validating one object of a mesh file into its model, with every refusal naming the field.

msgspec stops at an object's first error and says where as a path (``$.spec.ports[0].port``;
a mapping's key only as ``[...]``). This module turns that into a :class:`ConfigIssue` a user can
act on: the field in the file's own names, what was expected and what was written (the value is
read back from the document); the key of a mapping found by validating its entries one by one.
Then, so that one look at an object shows more than its first mistake, the innermost part around
the error the model can do without (the unknown field itself, an optional field, an entry of a
mapping) is dropped and the object validated again; an error with nothing optional around it
(in ``metadata.name``, say) ends the search.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, TypeVar

import msgspec

from .errors import ConfigIssue, Location, _short, field_path
from .types import convert, validator

T = TypeVar("T")

# Enough for a handful of typos in one object; a document that is all wrong says so in 20 lines.
MAX_ISSUES_PER_OBJECT = 20

_AT = re.compile(r"^(?P<message>.*?)(?: - at `(?:(?P<key>key)` in `)?(?P<path>\$[^`]*)`)?$", re.S)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_FIELD_MESSAGE = re.compile(r"^Object (contains unknown|missing required) field `(?P<name>.*)`$")
_EXPECTED = re.compile(r"^Expected `(?P<type>[^`]*)`(?P<rest>.*)$", re.S)
_KINDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "null": "null",
    "array": "a list",
    "object": "a mapping",
}


def validate(
    doc: Any, model: type[T], location: Location, prefix: str = ""
) -> tuple[T | None, list[ConfigIssue]]:
    """``doc`` as a ``model``, or ``None`` and what was wrong with it (at most
    :data:`MAX_ISSUES_PER_OBJECT` issues, each naming the field under ``prefix``)."""
    issues: list[ConfigIssue] = []
    while len(issues) < MAX_ISSUES_PER_OBJECT:
        try:
            value = convert(doc, model)
        except msgspec.ValidationError as e:
            issue, drop = _describe(e, doc, model, location, prefix)
            issues.append(issue)
            if drop is None:
                break
            doc = _without(doc, drop)
        else:
            return (None, issues) if issues else (value, issues)
    return None, issues


def _describe(
    error: msgspec.ValidationError, doc: Any, model: Any, location: Location, prefix: str
) -> tuple[ConfigIssue, list[str | int] | None]:
    """The issue, and the path of the field to drop to look for more (keys and indexes into
    ``doc``: the innermost optional field around the error), if there is one."""
    m = _AT.match(str(error))
    assert m is not None  # the pattern matches any text
    message = m["message"]
    path, annotation, value, droppable = _walk(model, doc, m["path"] or "$")
    named = _FIELD_MESSAGE.match(message)
    if m["key"]:
        key = _bad_key(value, annotation)
        text = f"the key {_short(key)}: {_expected(message, key)}"
    elif named is not None:
        path = [*path, named["name"]]
        if named.group(1) == "contains unknown":
            text, droppable = "unknown field", len(path)
        else:
            text = "required field is missing"
    elif message.startswith("Invalid enum value"):
        choices = typing.get_args(_bare(annotation))
        allowed = " or ".join(", ".join(map(repr, choices)).rsplit(", ", 1))
        text = f"expected {allowed}, got {_short(value)}"
    elif message.startswith("Expected `str` ") and _description(annotation):
        text = f"expected {_description(annotation)}, got {_short(value)}"
    else:
        text = _expected(message, value)
    issue = ConfigIssue(location, field_path(path, prefix), text)
    return issue, (path[:droppable] if droppable is not None else None)


def _walk(model: Any, doc: Any, at: str) -> tuple[list[str | int], Any, Any, int | None]:
    """Follow msgspec's path ``at`` through ``doc`` and the types of ``model`` together:
    the path as keys and indexes (a ``[...]`` resolved to the first entry that is refused), the
    annotation and the value there, and how long a prefix of the path ends at the innermost key
    that may be dropped (an optional field, or an entry of a mapping), if any."""
    path: list[str | int] = []
    annotation, value, droppable = model, doc, None
    for name, index in _STEP.findall(at[1:]):
        annotation = _bare(annotation)
        if name:
            # A field of a structure (by the name the file uses).
            field = _field(annotation, name)
            annotation = field.type if field is not None else Any
            path.append(name)
            if field is not None and not field.required:
                droppable = len(path)
            value = value.get(name) if isinstance(value, dict) else None
        elif index == "...":
            key = _bad_value_key(value, _dict_args(annotation)[1])
            annotation = _dict_args(annotation)[1]
            path.append(key if isinstance(key, str | int) else str(key))
            if isinstance(key, str):  # dropping one entry leaves a valid mapping
                droppable = len(path)
            value = value.get(key) if isinstance(value, dict) else None
        else:
            i = int(index)
            annotation = _list_item(annotation)
            path.append(i)
            value = value[i] if isinstance(value, list) and i < len(value) else None
    return path, annotation, value, droppable


def _bare(annotation: Any) -> Any:
    """``Annotated[X, ...]`` → ``X``; ``X | None`` → ``X``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _description(annotation: Any) -> str | None:
    """What a constrained string must be, as its type describes it (``Meta(description=)``)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        args = typing.get_args(annotation)
        for meta in args[1:]:
            if isinstance(meta, msgspec.Meta) and meta.description and args[0] is str:
                return meta.description
    elif origin in (typing.Union, types.UnionType):
        # msgspec checks a string against the union's one string type.
        return next(filter(None, map(_description, typing.get_args(annotation))), None)
    return None


def _field(annotation: Any, name: str) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        for field in msgspec.structs.fields(annotation):
            if field.encode_name == name:
                return field
    return None


def _dict_args(annotation: Any) -> tuple[Any, Any]:
    args = typing.get_args(_bare(annotation))
    return (args[0], args[1]) if len(args) == 2 else (Any, Any)


def _list_item(annotation: Any) -> Any:
    args = typing.get_args(_bare(annotation))
    return args[0] if len(args) == 1 else Any


def _refused(check: Any, value: Any) -> bool:
    try:
        check(value)
    except (msgspec.ValidationError, ValueError, TypeError):
        return True
    return False


def _bad_value_key(mapping: Any, value_type: Any) -> Any:
    """The first key of ``mapping`` whose value ``value_type`` refuses."""
    if not isinstance(mapping, dict):
        return "..."
    check = validator(value_type)
    return next((k for k, v in mapping.items() if _refused(check, v)), "...")


def _bad_key(mapping: Any, annotation: Any) -> Any:
    """The first key of ``mapping`` that its key type refuses."""
    if not isinstance(mapping, dict):
        return "..."
    check = validator(_dict_args(annotation)[0])
    return next((k for k in mapping if _refused(check, k)), "...")


def _expected(message: str, value: Any) -> str:
    """msgspec's ``Expected `int` >= 1`` → ``expected an integer >= 1, got 0``; a message of
    our own decoders is kept, with the value written added when it does not show it."""
    m = _EXPECTED.match(message)
    if m is None:
        return message if _short(value) in message else f"{message} (got {_short(value)})"
    kinds = [_KINDS.get(k, k) for k in m["type"].split(" | ")]
    kind = " or ".join(", ".join(kinds).rsplit(", ", 1))
    rest = re.sub(r", got `[^`]*`$", "", m["rest"])
    return f"expected {kind}{rest}, got {_short(value)}"


def _without(doc: Any, path: list[str | int]) -> Any:
    """``doc`` without the key ``path`` ends with (a copy of each container on the way: the
    document itself is shared with the file cache)."""
    last = len(path) - 1

    def copy(node: Any, depth: int) -> Any:
        step = path[depth]
        if depth == last:
            return {k: v for k, v in node.items() if k != step}
        out: Any = dict(node) if isinstance(node, dict) else list(node)
        out[step] = copy(node[step], depth + 1)
        return out

    return copy(doc, 0)
