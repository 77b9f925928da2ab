"""Istio's xDS for ztunnel: the messages (``messages``) and the mesh in them (``translate``)."""
