"""A mesh file's YAML documents, each read once and remembered by its text.

Reloading a 5,000-pod mesh because one pod changed must not cost what the first load did: the
file is split at its document markers (a ``---`` line, which YAML forbids anywhere else at the
start of a line, even inside a block or quoted scalar), and each document whose text is unchanged
since the last load is taken from a :class:`DocumentCache` instead of being parsed again. A
document is parsed on its own and told the line it starts at, so its line numbers (in errors, in
tags) are the file's. (It once was parsed after as many blank lines: the parser scanned them all,
and a 5,000-pod mesh took twice as long to load with a cache as without.)

A file with directives (``%YAML``, ``%TAG``: they belong to the document after them) is read
whole, as before; so is a file of one chunk, and any file when no cache is given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import yamlfile

# What may follow a document start marker's `---` on its line.
_AFTER_MARKER = frozenset(" \t\r\n")


def split(text: str) -> list[tuple[int, str]] | None:
    """The file's chunks (each one document, or nothing before the first marker) with the
    0-based line each starts at; None when the file has directives."""
    # str.find rather than a multi-line regex: this runs on every reload, over the whole file.
    if text.startswith("%") or "\n%" in text:
        return None
    starts = []
    at = text.find("\n---")
    while at != -1:
        after = at + 4
        if after == len(text) or text[after] in _AFTER_MARKER:
            starts.append(at + 1)
        at = text.find("\n---", after)
    bounds = [0, *starts, len(text)]
    chunks: list[tuple[int, str]] = []
    line = 0
    for begin, end in itertools.pairwise(bounds):
        chunk = text[begin:end]
        chunks.append((line, chunk))
        line += chunk.count("\n")
    return chunks


@dataclass
class Parsed:
    """One chunk's documents (value, whether it holds a YAML tag), as parsed at ``line``; and,
    for a chunk of one document, the object the config layer validated it into (reused) and the
    name it goes by in messages."""

    line: int
    documents: list[tuple[Any, bool]]
    resource: Any = None
    name: str | None = None

    def validated(self, resource: Any, name: str | None) -> None:
        """Keep ``resource`` for the next load instead of the parsed document: the next load
        takes the resource as it is, and the document's values (a third of what a 5,000-pod
        mesh's cache held) are freed."""
        self.resource, self.name = resource, name
        self.documents = [(None, False)]


@dataclass
class DocumentCache:
    """Parsed chunks by their text, kept from one load to the next; chunks no longer in any
    file are dropped at the end of each load (:meth:`sweep`)."""

    chunks: dict[str, Parsed] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    parsed: int = 0  # chunks parsed by the last load (the rest came from the cache)

    def begin(self) -> None:
        self.used = set()
        self.parsed = 0

    def sweep(self) -> None:
        self.chunks = {k: v for k, v in self.chunks.items() if k in self.used}


def documents(text: str, cache: DocumentCache | None) -> Iterator[tuple[Any, bool, Parsed | None]]:
    """Every document of ``text`` (value, holds a tag, its cached chunk or None). YAML errors
    propagate as :func:`yamlfile.load_documents` raises them, with the file's line numbers."""
    chunks = split(text) if cache is not None else None
    # A file of one document is not kept: when it changes nothing of it can be reused, and what
    # the cache would hold is the whole file's values (11 MiB for 5,000 workloads in Istio's
    # local config format, which is one document).
    if cache is None or chunks is None or len(chunks) == 1:
        for value, tagged in yamlfile.load_documents(text):
            yield value, tagged, None
        return
    for line, chunk in chunks:
        parsed = cache.chunks.get(chunk)
        if parsed is None or (parsed.line != line and any(t for _, t in parsed.documents)):
            # Parsed anew, with the file's line numbers (a tag records its line).
            parsed = Parsed(line, list(yamlfile.load_documents(chunk, first_line=line)))
            cache.chunks[chunk] = parsed
            cache.parsed += 1
        cache.used.add(chunk)
        for value, tagged in parsed.documents:
            yield value, tagged, parsed
