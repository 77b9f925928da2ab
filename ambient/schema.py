"""Protobuf messages built at import time from field lists instead of protoc output: what
:mod:`ambient.xds.messages` and :mod:`ambient.identity.istio_ca` declare Istio's schemas with.
The classes behave as generated ones do (same full names, same wire bytes); the field numbers in
those lists are what matters on the wire."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    message_factory,
    struct_pb2,
    wrappers_pb2,
)

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS: Final = {
    "string": _FDP.TYPE_STRING,
    "bytes": _FDP.TYPE_BYTES,
    "bool": _FDP.TYPE_BOOL,
    "int32": _FDP.TYPE_INT32,
    "uint32": _FDP.TYPE_UINT32,
    "int64": _FDP.TYPE_INT64,
}

# A field: (name, number, type, flags). type: a scalar above, ".pkg.Message" / ".pkg.Enum" (a
# message or enum, fully qualified), or "map<string,TYPE>". flags: "repeated", "enum",
# "oneof:NAME", joined by spaces ("" for none).
_Field = tuple[str, int, str, str]


class Message:
    def __init__(
        self,
        name: str,
        fields: list[_Field],
        *,
        enums: dict[str, list[tuple[str, int]]] | None = None,
        nested: list[Message] | None = None,
        reserved: tuple[int, ...] = (),
    ) -> None:
        self.name, self.fields = name, fields
        self.enums, self.nested, self.reserved = enums or {}, nested or [], reserved


def _scalar_or_ref(field: descriptor_pb2.FieldDescriptorProto, kind: str, enum: bool) -> None:
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    else:
        field.type = _FDP.TYPE_ENUM if enum else _FDP.TYPE_MESSAGE
        field.type_name = kind


def _message(proto: descriptor_pb2.DescriptorProto, spec: Message, scope: str) -> None:
    proto.name = spec.name
    for number in spec.reserved:
        proto.reserved_range.add(start=number, end=number + 1)
    for enum_name, values in spec.enums.items():
        e = proto.enum_type.add(name=enum_name)
        for value_name, number in values:
            e.value.add(name=value_name, number=number)
    for inner in spec.nested:
        _message(proto.nested_type.add(), inner, f"{scope}.{spec.name}")
    oneofs: list[str] = []
    for name, number, kind, flags in spec.fields:
        words = flags.split()
        field = proto.field.add(name=name, number=number, label=_FDP.LABEL_OPTIONAL)
        if kind.startswith("map<"):
            key, value = kind[4:-1].split(",")
            entry_name = "".join(part.capitalize() for part in name.split("_")) + "Entry"
            entry = proto.nested_type.add(name=entry_name)
            entry.options.map_entry = True
            k = entry.field.add(name="key", number=1, label=_FDP.LABEL_OPTIONAL)
            _scalar_or_ref(k, key, False)
            v = entry.field.add(name="value", number=2, label=_FDP.LABEL_OPTIONAL)
            _scalar_or_ref(v, value, False)
            field.label = _FDP.LABEL_REPEATED
            field.type = _FDP.TYPE_MESSAGE
            field.type_name = f"{scope}.{spec.name}.{entry_name}"
            continue
        if "repeated" in words:
            field.label = _FDP.LABEL_REPEATED
        _scalar_or_ref(field, kind, "enum" in words)
        for w in words:
            if w.startswith("oneof:"):
                oneof = w.removeprefix("oneof:")
                if oneof not in oneofs:
                    oneofs.append(oneof)
                    proto.oneof_decl.add(name=oneof)
                field.oneof_index = oneofs.index(oneof)


def file_descriptor(
    name: str,
    package: str,
    deps: list[str],
    messages: list[Message],
    enums: dict[str, list[tuple[str, int]]],
) -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name=name, package=package, syntax="proto3", dependency=deps
    )
    for enum_name, values in enums.items():
        e = file.enum_type.add(name=enum_name)
        for value_name, number in values:
            e.value.add(name=value_name, number=number)
    for spec in messages:
        _message(file.message_type.add(), spec, f".{package}")
    return file


# Google's well-known types the schemas refer to, loaded into every pool.
_KNOWN = (any_pb2, duration_pb2, struct_pb2, wrappers_pb2, empty_pb2)


def build(
    files: Iterable[descriptor_pb2.FileDescriptorProto], known: Iterable[str] = ()
) -> dict[str, Any]:
    """The message classes of ``files`` by full name (``package.Message``), in a pool of their
    own; ``known``: well-known types wanted as classes of that pool too
    (``google.protobuf.Any``), to fill fields of theirs."""
    pool = descriptor_pool.DescriptorPool()
    for module in _KNOWN:
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    classes: dict[str, Any] = {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name)) for name in known
    }
    for file in files:
        built = pool.Add(file)
        for name, descriptor in built.message_types_by_name.items():
            classes[f"{file.package}.{name}"] = message_factory.GetMessageClass(descriptor)
    return classes
