"""Config errors that say where: which file, which document, which object, which field."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple


class Location(NamedTuple):
    """Where in the input a thing came from: file, document number (1-based), object. (A named
    tuple: a reload of a 5,000-pod mesh makes 14,000 of them, and a tuple is made in C.)"""

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
    """``("spec", "ports", 0, "port")`` → ``spec.ports[0].port``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
