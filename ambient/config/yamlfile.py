"""Reading a mesh file's YAML: PyYAML's safe loader (it never builds a Python object), made to
fail only with :class:`yaml.YAMLError` and a position, whatever the text.

- A tag the safe loader has no constructor for (``!Exact``, ``!Foo``, ``!!python/object``) is kept
  as a :class:`~ambient.config.tags.Tagged` value for the config layer to read or refuse.
- A value its tag cannot hold (``!!int x``, the date ``2001-02-30``, a 5,000-digit integer), which
  PyYAML reports as a bare ``ValueError`` and the like, is a :class:`yaml.YAMLError` at that node.
- Nesting deeper than :data:`MAX_DEPTH` is refused before PyYAML's recursive composer runs out of
  stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from .tags import Tagged

# As serde_yaml (Istio's ztunnel) refuses nesting deeper than 128 levels; a mesh file needs ~10.
MAX_DEPTH = 128


def _construct_tagged(loader: Any, node: yaml.Node) -> Tagged:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.SequenceNode):
        return Tagged(node.tag, "sequence", loader.construct_sequence(node, deep=True), False, line)
    if isinstance(node, yaml.MappingNode):
        return Tagged(node.tag, "mapping", loader.construct_mapping(node, deep=True), False, line)
    return Tagged(node.tag, "scalar", node.value, node.style is None, line)


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


# Made with type() so that it type-checks alike with and without PyYAML's stubs installed.
MeshLoader: Any = type(
    "MeshLoader",
    (yaml.SafeLoader,),
    {"construct_object": _construct_object, "compose_node": _compose_node},
)
MeshLoader.add_constructor(None, _construct_tagged)


def load_all(text: str) -> Iterator[Any]:
    """The documents of ``text``, as :func:`yaml.safe_load_all` reads them but for the above."""
    documents: Iterator[Any] = yaml.load_all(text, Loader=MeshLoader)  # a SafeLoader: no objects
    return documents
