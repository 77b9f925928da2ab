"""Reading a mesh file's YAML: PyYAML's safe loader (it never builds a Python object), made to
fail only with :class:`yaml.YAMLError` and a position, whatever the text; the core's reader first.

- The text is scanned, parsed and composed by libyaml (PyYAML's C loader, ten times faster than
  the pure-Python one on a large mesh) when PyYAML was built with it, as its wheels are; the
  Python constructor builds the values either way.

- A tag the safe loader has no constructor for (``!Exact``, ``!Foo``, ``!!python/object``) is kept
  as a :class:`~ambient.config.tags.Tagged` value for the config layer to read or refuse.
- A value its tag cannot hold (``!!int x``, the date ``2001-02-30``, a 5,000-digit integer), which
  PyYAML reports as a bare ``ValueError`` and the like, is a :class:`yaml.YAMLError` at that node.
- Most files never reach PyYAML's constructor: the core reads the part of YAML that mesh files
  use (mappings, sequences, strings, decimal numbers, booleans, null) into the same values,
  and gives anything else — tags, anchors, YAML 1.1's other scalars, every error — to PyYAML
  (``rust/src/yaml.rs``; held to PyYAML's values by tests/unit/test_yaml_fast_path.py).
- Nesting deeper than :data:`MAX_DEPTH` is refused before any value is built (libyaml refuses
  past 1,000 levels while it parses, before its recursive composer could run out of stack; the
  pure-Python composer is stopped at :data:`MAX_DEPTH`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .. import _core

# As serde_yaml (Istio's ztunnel) refuses nesting deeper than 128 levels; a mesh file needs ~10.
MAX_DEPTH = 128
#: Read with the core's fast path first (``_core.yaml_documents``): the same values, ten times
#: sooner, for the part of YAML mesh files use; it steps aside for PyYAML on anything else.
CORE = True

# PyYAML's side, from :mod:`ambient.config.yamlref` on first use: ``PureMeshLoader``,
# ``CMeshLoader`` (libyaml's, when PyYAML has it: ``FAST``), ``MeshLoader`` (the one
# :func:`load_all` uses) and ``YAMLError`` (what reading a file fails with).
_REFERENCE = frozenset({"PureMeshLoader", "CMeshLoader", "MeshLoader", "FAST", "YAMLError"})


def __getattr__(name: str) -> Any:
    if name not in _REFERENCE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import yamlref

    value = getattr(yamlref, name)
    globals()[name] = value
    return value


def load_documents(
    text: str, loader: Any = None, *, first_line: int = 0
) -> Iterator[tuple[Any, bool]]:
    """The documents of ``text``, as :func:`yaml.safe_load_all` reads them but for the above,
    each with whether it holds a :class:`Tagged` value anywhere (most documents have none, and
    need no walk to find them: on a 5,000-pod mesh that walk was a quarter of the load).
    ``loader``: :data:`MeshLoader` by default, or :data:`PureMeshLoader`. ``first_line``: the
    0-based line of its file ``text`` starts at, so errors and tags give the file's lines."""
    if loader is None and CORE:
        documents = _core.yaml_documents(text, MAX_DEPTH)
        if documents is not None:
            for document in documents:
                yield document, False
            return
    from . import yamlref

    # The module's MeshLoader as it is now (a test may have replaced it).
    default = globals()["MeshLoader"] if "MeshLoader" in globals() else __getattr__("MeshLoader")
    yield from yamlref.read(text, loader or default, first_line)


def load_all(text: str, loader: Any = None) -> Iterator[Any]:
    """The documents of ``text`` (see :func:`load_documents`)."""
    for document, _ in load_documents(text, loader):
        yield document
