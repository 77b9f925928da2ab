"""The config layer: what Istio users already write, validated, turned into one mesh snapshot."""

from .errors import ConfigError, ConfigIssue, Location
from .loader import MeshCache, load_mesh

__all__ = ["ConfigError", "ConfigIssue", "Location", "MeshCache", "load_mesh"]
