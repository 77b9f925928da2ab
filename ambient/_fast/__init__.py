"""Compiled (Cython) hot paths of ambient's Python side. Each module has a pure-Python reference
twin elsewhere in the package that passes the same tests."""

from .hbone_request import InboundDispatcher, StreamRequest

__all__ = ["InboundDispatcher", "StreamRequest"]
