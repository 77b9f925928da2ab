"""Reading a mesh file's YAML: PyYAML's safe loader (it never builds a Python object), made to
fail only with :class:`yaml.YAMLError` and a position, whatever the text.

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

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from .. import _core
from .tags import Tagged

# As serde_yaml (Istio's ztunnel) refuses nesting deeper than 128 levels; a mesh file needs ~10.
MAX_DEPTH = 128


def _construct_tagged(loader: Any, node: yaml.Node) -> Tagged:
    # Counted, so a document that made none needs no search for them (see load_documents).
    loader.tagged = getattr(loader, "tagged", 0) + 1
    line = node.start_mark.line + 1 + getattr(loader, "first_line", 0)
    if isinstance(node, yaml.SequenceNode):
        return Tagged(node.tag, "sequence", loader.construct_sequence(node, deep=True), False, line)
    if isinstance(node, yaml.MappingNode):
        return Tagged(node.tag, "mapping", loader.construct_mapping(node, deep=True), False, line)
    # Plain: no quotes (PyYAML says style None, libyaml an empty string).
    return Tagged(node.tag, "scalar", node.value, not node.style, line)


def _construct_object(loader: Any, node: yaml.Node, deep: bool = False) -> Any:
    try:
        return yaml.SafeLoader.construct_object(loader, node, deep)
    except yaml.YAMLError:
        raise
    except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as e:
        tag = Tagged(node.tag, "scalar", "", True, 0).name
        value = repr(node.value) if isinstance(node, yaml.ScalarNode) else "this node"
        value = value if len(value) <= 40 else value[:37] + "..."
        # A ValueError says why ("day is out of range for month"); the others are PyYAML's
        # internals tripping on the text.
        why = f" ({e})" if isinstance(e, ValueError) else ""
        raise ConstructorError(
            None, None, f"{value} is not a valid {tag} value{why}", node.start_mark
        ) from e


def _compose_node(loader: Any, parent: yaml.Node | None, index: object) -> yaml.Node:
    """The pure-Python composer, stopped at :data:`MAX_DEPTH` before it recurses further."""
    depth = loader.__dict__.get("_depth", 0)
    if depth >= MAX_DEPTH:
        raise ComposerError(
            None, None, f"nested deeper than {MAX_DEPTH} levels", loader.peek_event().start_mark
        )
    loader._depth = depth + 1
    try:
        node: yaml.Node = yaml.SafeLoader.compose_node(loader, parent, index)
        return node
    finally:
        loader._depth = depth


def _check_depth(root: yaml.Node) -> None:
    """Refuse a document nested deeper than :data:`MAX_DEPTH`, at its first node too deep
    (without recursion: the tree may be 1,000 levels deep)."""
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", node.start_mark
            )
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                stack.append((value, depth + 1))
                stack.append((key, depth + 1))


# Made with type() so that it type-checks alike with and without PyYAML's stubs installed.
PureMeshLoader: Any = type(
    "PureMeshLoader",
    (yaml.SafeLoader,),
    {"construct_object": _construct_object, "compose_node": _compose_node},
)
PureMeshLoader.add_constructor(None, _construct_tagged)
FAST = bool(getattr(yaml, "__with_libyaml__", False))
if FAST:
    # libyaml composes in C, so the depth is checked on the composed tree (load_all).
    CMeshLoader: Any = type(
        "CMeshLoader", (yaml.CSafeLoader,), {"construct_object": _construct_object}
    )
    CMeshLoader.add_constructor(None, _construct_tagged)
#: The loader :func:`load_all` uses (libyaml's when PyYAML has it).
MeshLoader: Any = CMeshLoader if FAST else PureMeshLoader
#: Read with the core's fast path first (``_core.yaml_documents``): the same values, ten times
#: sooner, for the part of YAML mesh files use; it steps aside for PyYAML on anything else.
CORE = True


def _shift_marks(error: yaml.YAMLError, lines: int) -> None:
    """Move an error's positions ``lines`` further down (the text it was read from started
    that many lines into its file)."""
    for name in ("context_mark", "problem_mark"):
        mark = getattr(error, name, None)
        if mark is not None:  # libyaml's marks are read-only: a moved copy
            moved = yaml.Mark(
                mark.name, mark.index, mark.line + lines, mark.column, mark.buffer, mark.pointer
            )
            setattr(error, name, moved)


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
    reader = (loader or MeshLoader)(text)  # a SafeLoader: no objects
    reader.first_line = first_line
    try:
        while reader.check_node():
            node = reader.get_node()
            _check_depth(node)
            before = getattr(reader, "tagged", 0)
            document = reader.construct_document(node)
            yield document, getattr(reader, "tagged", 0) != before
    except yaml.YAMLError as e:
        _shift_marks(e, first_line)
        raise
    finally:
        reader.dispose()


def load_all(text: str, loader: Any = None) -> Iterator[Any]:
    """The documents of ``text`` (see :func:`load_documents`)."""
    for document, _ in load_documents(text, loader):
        yield document
