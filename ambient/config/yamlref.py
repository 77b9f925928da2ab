"""The reference reader of mesh files: PyYAML's safe loader (it never builds a Python object),
made to fail only with :class:`yaml.YAMLError` and a position, whatever the text. Imported only
when the core's fast path steps aside (:mod:`ambient.config.yamlfile`), so that a proxy whose
files the core reads whole never maps PyYAML and libyaml in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from .tags import Tagged
from .yamlfile import MAX_DEPTH

YAMLError = yaml.YAMLError  # what reading a file fails with


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


def read(text: str, loader: Any, first_line: int) -> Iterator[tuple[Any, bool]]:
    """The documents of ``text`` read by ``loader`` (see :func:`yamlfile.load_documents`)."""
    reader = loader(text)  # a SafeLoader: no objects
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
