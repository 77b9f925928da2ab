"""Mesh files shipped with ambient (the demo's embedded default among them)."""

from importlib.resources import files


def read(name: str) -> str:
    """The text of an example file, e.g. ``read("demo-mesh.yaml")``."""
    return (files(__package__) / name).read_text()
