"""A root-only testbed: the nodes and pods of a mesh file as Linux network namespaces.

Each node is a netns joined to the others by a bridge in an "underlay" netns; each pod is a netns
behind a veth to its node, routed (not bridged or NATed) so source IPs survive end to end, and
in-mesh pods can get istio-cni's in-pod redirection rules (:mod:`ambient.testbed.redirect`).
:mod:`~ambient.testbed.topology` plans (pure), :mod:`~ambient.testbed.network` builds and tears
down, :mod:`~ambient.testbed.netns` holds the namespace primitives.
"""

from __future__ import annotations

from .errors import TestbedError

__all__ = ["TestbedError"]
