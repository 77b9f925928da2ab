"""ztunnel, the node proxy of the ambient mesh."""

from .proxy import Ztunnel

__all__ = ["Ztunnel"]
