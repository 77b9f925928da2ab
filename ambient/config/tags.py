"""YAML tags in mesh files, and the one place they mean something.

Istio's ztunnel reads its local config with serde_yaml, which writes an enum variant as a YAML tag
on the variant's value: a string match of a policy is ``!Exact cluster.local/ns/a/sa/b``,
``!Prefix …``, ``!Suffix …`` or ``!Presence`` (no value). Kubernetes objects carry no tags.

Reading a file (:mod:`ambient.config.yamlfile`) keeps every tag the safe loader has no
constructor for as a :class:`Tagged` value instead of failing with a constructor traceback. The
string-match fields of ztunnel's local config turn the four tags above into matches
(:func:`string_match`); :func:`stray_tags` finds a tag anywhere else so the loader can refuse it
naming the field and the line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

MATCH_KINDS = ("Exact", "Prefix", "Suffix", "Presence")
_YAML_TAG_PREFIX = "tag:yaml.org,2002:"  # what ``!!name`` expands to

NodeKind = Literal["scalar", "sequence", "mapping"]
Path = tuple[str | int, ...]


@dataclass(frozen=True, eq=False)
class Tagged:
    """A YAML node with a tag the safe loader has no constructor for, as written."""

    tag: str  # as the parser reports it: "!Exact", "tag:yaml.org,2002:python/object", ...
    kind: NodeKind
    value: Any  # the scalar's text, or the constructed list or dict
    plain: bool  # a scalar written without quotes (an empty plain scalar is "no value")
    line: int  # 1-based, where the node starts

    @property
    def name(self) -> str:
        """The tag as a user would write it: ``!Exact``, ``!!python/object``, ``!<tag:x,1:y>``."""
        if self.tag.startswith("!"):
            return self.tag
        if self.tag.startswith(_YAML_TAG_PREFIX):
            return "!!" + self.tag[len(_YAML_TAG_PREFIX) :]
        return f"!<{self.tag}>"

    def __repr__(self) -> str:
        if self.kind == "scalar":
            return f"{self.name} {self.value!r}" if self.value or not self.plain else self.name
        return f"{self.name} {self.value!r}"


# --- string matches --------------------------------------------------------------------------

_FORMS = "`!Exact value`, `!Prefix value`, `!Suffix value` or `!Presence`"


def string_match(data: object) -> tuple[str, str]:
    """``(kind, value)`` of a string match written as Istio's ztunnel reads it; ``ValueError``
    saying what to write otherwise. Values follow serde_yaml: any scalar's text is the string
    (``!Exact 80`` is "80"); ``!Presence`` takes nothing, or an empty sequence."""
    if isinstance(data, Tagged):
        kind = data.tag[1:] if data.tag.startswith("!") else ""
        if kind not in MATCH_KINDS:
            raise ValueError(f"unknown tag {data.name} (line {data.line}): expected {_FORMS}")
        if kind == "Presence":
            if (data.kind == "scalar" and data.plain and data.value == "") or (
                data.kind == "sequence" and not data.value
            ):
                return kind, ""
            raise ValueError(
                f"!Presence takes no value (line {data.line}): write `!Presence` alone"
            )
        if data.kind != "scalar":
            raise ValueError(f"!{kind} takes a string (line {data.line}), got a {data.kind}")
        return kind, data.value
    if isinstance(data, dict) and len(data) == 1:
        ((key, value),) = data.items()
        if key in MATCH_KINDS:
            written = "!Presence" if key == "Presence" else f"!{key} {value}"
            raise ValueError(
                f"write the string match as a YAML tag, `{written}`, as Istio's ztunnel reads "
                f"it (it refuses the map form {{{key}: ...}})"
            )
    if isinstance(data, str):
        raise ValueError(f"expected a tagged string match, e.g. `!Exact {data}`; one of {_FORMS}")
    raise ValueError(f"expected a string match: {_FORMS}")


# --- tags where none belong ------------------------------------------------------------------


def stray_tags(doc: object, allowed: Callable[[Path], bool]) -> list[tuple[Path, Tagged]]:
    """Every tagged value in ``doc`` whose path (keys and indexes from the top) ``allowed``
    refuses, with that path. A node shared through YAML aliases is visited once; a recursive one
    is not followed around its loop."""
    found: list[tuple[Path, Tagged]] = []
    seen: set[int] = set()
    stack: list[tuple[Path, object]] = [((), doc)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, Tagged):
            if not allowed(path):
                found.append((path, node))
            continue  # a string match's value is checked by string_match
        if not isinstance(node, dict | list) or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, list):
            stack.extend(((*path, i), item) for i, item in reversed(list(enumerate(node))))
            continue
        for key, value in reversed(list(node.items())):
            if isinstance(key, Tagged):
                found.append(((*path, key.name), key))
            stack.append(((*path, key if isinstance(key, str | int) else str(key)), value))
    return found
