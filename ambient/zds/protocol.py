"""The constants of ZDS both sides agree on: the protocol version a ztunnel says hello with, and
the names of ``WorkloadRequest``'s payloads (its oneof's member names, as protobuf's
``WhichOneof("payload")`` and the core's decoder report them)."""

from __future__ import annotations

from typing import Final

VERSION_NOT_USED: Final = 0
VERSION_V1: Final = 1

PAYLOAD_ADD: Final = "add"
PAYLOAD_DEL: Final = "del"
PAYLOAD_SNAPSHOT_SENT: Final = "snapshot_sent"
PAYLOAD_KEEP: Final = "keep"
