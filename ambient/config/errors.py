"""Config errors that say where: which file, which document, which object, which field."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError


@dataclass(frozen=True)
class Location:
    """Where in the input a thing came from: file, document number (1-based), object."""

    file: str
    document: int | None = None
    resource: str | None = None  # e.g. "Pod default/c1", "workloads[2]"

    def __str__(self) -> str:
        text = self.file
        if self.document is not None:
            text += f", document {self.document}"
        if self.resource:
            text += f" ({self.resource})"
        return text


@dataclass(frozen=True)
class ConfigIssue:
    location: Location
    field: str  # dotted path, e.g. "spec.ports[0].targetPort"; "" for the whole object
    message: str  # what was wrong, and what was expected

    def __str__(self) -> str:
        where = f"{self.location}: {self.field}" if self.field else str(self.location)
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration was refused; ``issues`` lists every problem found, not only the first."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


def field_path(loc: Iterable[int | str], prefix: str = "") -> str:
    """pydantic's ``("spec", "ports", 0, "port")`` → ``spec.ports[0].port``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def issues_from_validation(
    error: ValidationError, location: Location, prefix: str = ""
) -> list[ConfigIssue]:
    out = []
    for e in error.errors(include_url=False):
        loc = [p for p in e["loc"] if not _is_union_branch(p)]
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = "unknown field"
        elif e["type"] == "missing":
            message = "required field is missing"
        elif e["type"] == "value_error":
            # Our own validators' messages say what was expected; pydantic's prefix adds nothing.
            message = message.removeprefix("Value error, ")
            if "input" in e and _short(e["input"]) not in message:
                message = f"{message} (got {_short(e['input'])})"
        elif "input" in e and e["type"] not in ("missing",):
            message = f"{message} (got {_short(e['input'])})"
        out.append(ConfigIssue(location, field_path(loc, prefix), message))
    return out


def _is_union_branch(part: int | str) -> bool:
    # pydantic names union branches in the location ("int", "str", "function-after[...]");
    # they are not fields a user wrote.
    return isinstance(part, str) and (
        part in ("int", "str", "float", "bool", "list", "dict") or "[" in part
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
