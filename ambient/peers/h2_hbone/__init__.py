"""HBONE in pure Python: HTTP/2 CONNECT over mutual TLS 1.3 with asyncio, ``h2`` and ``ssl``.

This is an independent implementation of the tunnel Istio's ztunnel speaks on port 15008, written
the way a Python developer would write it without our Rust core: plain asyncio streams, the
python-hyper ``h2`` state machine and the standard ``ssl`` module. It serves two purposes:

* a wire check for the Rust core (its client against the Rust server and the other way round);
* a benchmark baseline.

Wire facts (see the ztunnel reference, "HBONE on the wire"):

* TLS 1.3 only, ALPN ``h2`` on both sides, the client sends no SNI and does not resume sessions.
* The server requires a client certificate chained to the roots whose URI SAN is a SPIFFE ID in the
  server's own trust domain; the client requires one of the server's URI SANs to be one of the
  identities it expects.
* One ``CONNECT`` stream per proxied TCP connection, with only ``:method`` and ``:authority`` as
  pseudo-headers (RFC 7540 section 8.3, no ``:protocol``); ``200`` only once the upstream TCP
  connect succeeded; ``400`` for a non-CONNECT request or a bad authority; ``401`` when denied;
  ``503`` when the upstream is unreachable.
* HTTP/2 stream window 4 MiB, connection window 16 MiB, max frame size 1 MiB.
* Half-close is forwarded in both directions (END_STREAM <-> TCP FIN).

Run as a process (for benchmarks)::

    python -m ambient.peers.h2_hbone server --listen 127.0.0.1:15008 --upstream 127.0.0.1:5201 \\
        --ca-dir DIR --identity spiffe://cluster.local/ns/default/sa/server
    python -m ambient.peers.h2_hbone client --listen 127.0.0.1:9000 --server 127.0.0.1:15008 \\
        --authority 127.0.0.1:5201 --ca-dir DIR \\
        --identity spiffe://cluster.local/ns/default/sa/client \\
        --expect spiffe://cluster.local/ns/default/sa/server

Each prints ``ready <host>:<port>`` once listening and exits cleanly on SIGTERM or SIGINT.
"""

from .client import HboneClient, forward
from .common import HboneError, ReceivedConnect, format_hostport, parse_authority
from .connection import HboneStream
from .server import HboneServer

__all__ = [
    "HboneClient",
    "HboneError",
    "HboneServer",
    "HboneStream",
    "ReceivedConnect",
    "format_hostport",
    "forward",
    "parse_authority",
]
