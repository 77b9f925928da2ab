"""The ZDS messages as protobuf classes, built at import time from a field list instead of protoc
output: istio-cni's side (the testbed's :class:`~ambient.zds.server.ZdsServer`) and tests. A
running ztunnel's side uses the core's codec (``rust/src/zds.rs``) and never imports protobuf;
tests/unit/test_zds_codec.py holds the two to the same bytes.

ZDS is the protocol istio-cni uses to hand pods (and their network namespaces) to ztunnel. Only a
handful of small messages cross it, so rather than vendoring a generated ``zds_pb2`` module (and
pinning it to one protobuf runtime) the schema is written down here as data, turned into a
``FileDescriptorProto`` and given to protobuf's own message factory. The classes behave exactly
like generated ones: same full names (``istio.workload.zds.*``), same wire bytes, and parsing
(``FromString``) that returns a message or raises ``google.protobuf.message.DecodeError``, nothing
else, whatever the bytes (tests/unit/test_fuzz_zds.py).

Python cannot spell ``WorkloadRequest(del=...)`` or ``request.del`` (``del`` is a keyword); use
``WorkloadRequest(**{"del": DelWorkload(uid=uid)})`` and ``getattr(request, "del")``, or, better,
:data:`PAYLOAD_DEL` with ``request.WhichOneof("payload")``.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from .protocol import (
    PAYLOAD_ADD,
    PAYLOAD_DEL,
    PAYLOAD_KEEP,
    PAYLOAD_SNAPSHOT_SENT,
    VERSION_NOT_USED,
    VERSION_V1,
)

__all__ = [
    "PAYLOAD_ADD",
    "PAYLOAD_DEL",
    "PAYLOAD_KEEP",
    "PAYLOAD_SNAPSHOT_SENT",
    "VERSION_NOT_USED",
    "VERSION_V1",
    "Ack",
    "AddWorkload",
    "DelWorkload",
    "KeepWorkload",
    "SnapshotSent",
    "WorkloadInfo",
    "WorkloadRequest",
    "WorkloadResponse",
    "ZdsHello",
]

FILE_NAME: Final = "zds.proto"
PACKAGE: Final = "istio.workload.zds"


_FDP = descriptor_pb2.FieldDescriptorProto
_STRING: Final = _FDP.TYPE_STRING
_MESSAGE: Final = _FDP.TYPE_MESSAGE
_ENUM: Final = _FDP.TYPE_ENUM

# (name, number, type, type name or "", oneof name or "") per field, message by message.
#
# The field numbers come from Istio's proto/zds.proto and matter on the wire: ztunnel and
# istio-cni exchange these messages as raw protobuf bytes, so a renumbered field is a different
# field to the peer. Note DelWorkload.uid is field 2 (not 1), KeepWorkload is WorkloadRequest's
# field 5 (4 is unused there), and WorkloadInfo's field 4 is reserved.
_Field = tuple[str, int, int, str, str]
_MESSAGES: Final[dict[str, list[_Field]]] = {
    "ZdsHello": [("version", 1, _ENUM, "Version", "")],
    "WorkloadInfo": [
        ("name", 1, _STRING, "", ""),
        ("namespace", 2, _STRING, "", ""),
        ("service_account", 3, _STRING, "", ""),
    ],
    "AddWorkload": [
        ("uid", 1, _STRING, "", ""),
        ("workload_info", 2, _MESSAGE, "WorkloadInfo", ""),
    ],
    "KeepWorkload": [("uid", 1, _STRING, "", "")],
    "DelWorkload": [("uid", 2, _STRING, "", "")],
    "SnapshotSent": [],
    "WorkloadRequest": [
        (PAYLOAD_ADD, 1, _MESSAGE, "AddWorkload", "payload"),
        (PAYLOAD_DEL, 2, _MESSAGE, "DelWorkload", "payload"),
        (PAYLOAD_SNAPSHOT_SENT, 3, _MESSAGE, "SnapshotSent", "payload"),
        (PAYLOAD_KEEP, 5, _MESSAGE, "KeepWorkload", "payload"),
    ],
    "Ack": [("error", 1, _STRING, "", "")],
    "WorkloadResponse": [("ack", 1, _MESSAGE, "Ack", "payload")],
}
_ENUMS: Final[dict[str, list[tuple[str, int]]]] = {
    "Version": [("NOT_USED", VERSION_NOT_USED), ("V1", VERSION_V1)],
}
_RESERVED: Final[dict[str, list[int]]] = {"WorkloadInfo": [4]}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The schema above as the FileDescriptorProto protoc would have produced for zds.proto."""
    file = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto3")
    for enum_name, values in _ENUMS.items():
        enum = file.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for message_name, fields in _MESSAGES.items():
        message = file.message_type.add(name=message_name)
        for number in _RESERVED.get(message_name, []):
            message.reserved_range.add(start=number, end=number + 1)  # end is exclusive
        oneofs: list[str] = []
        for name, number, field_type, type_name, oneof in fields:
            field = message.field.add(
                name=name, number=number, type=field_type, label=_FDP.LABEL_OPTIONAL
            )
            if type_name:
                field.type_name = f".{PACKAGE}.{type_name}"
            if oneof:
                if oneof not in oneofs:
                    oneofs.append(oneof)
                    message.oneof_decl.add(name=oneof)
                field.oneof_index = oneofs.index(oneof)
    return file


# A private pool, so importing this module twice (or next to a real zds_pb2) cannot clash in the
# process-wide default pool.
_POOL: Final = descriptor_pool.DescriptorPool()
_FILE: Final = _POOL.Add(_file_descriptor())


def _message_class(name: str) -> Any:
    """The message class for ``istio.workload.zds.<name>``. Typed ``Any``: the class is made at
    runtime, so its fields are unknown to a type checker."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ZdsHello: Any = _message_class("ZdsHello")
WorkloadInfo: Any = _message_class("WorkloadInfo")
AddWorkload: Any = _message_class("AddWorkload")
KeepWorkload: Any = _message_class("KeepWorkload")
DelWorkload: Any = _message_class("DelWorkload")
SnapshotSent: Any = _message_class("SnapshotSent")
WorkloadRequest: Any = _message_class("WorkloadRequest")
Ack: Any = _message_class("Ack")
WorkloadResponse: Any = _message_class("WorkloadResponse")
