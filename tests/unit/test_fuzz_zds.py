"""Fuzzing the ZDS wire: whatever bytes arrive, each message class returns a message or raises
``DecodeError`` (its documented error), ztunnel's side (``ZdsClient``) answers every request
with an ack -- an error text or ok, as the request deserves -- without raising and without
leaking the file descriptors that came with it, and istio-cni's side (``ZdsServer``) reads any
ack or hello without raising.

Inputs are arbitrary bytes and valid messages mutated (bytes flipped, inserted, removed,
truncated, appended). ``AMBIENT_FUZZ_SCALE=10`` runs ten times as many examples.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient.zds import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsClient,
    ZdsHello,
    ZdsServer,
)
from ambient.zds.server import _ack_error

SCALE = int(os.environ.get("AMBIENT_FUZZ_SCALE", "1"))
MESSAGES = [
    ZdsHello,
    WorkloadInfo,
    AddWorkload,
    KeepWorkload,
    DelWorkload,
    SnapshotSent,
    WorkloadRequest,
    Ack,
    WorkloadResponse,
]


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- inputs ----------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)  # protobuf strings: UTF-8
valid_requests = st.one_of(
    st.builds(
        lambda uid, name, ns, sa: WorkloadRequest(
            add=AddWorkload(
                uid=uid, workload_info=WorkloadInfo(name=name, namespace=ns, service_account=sa)
            )
        ),
        text,
        text,
        text,
        text,
    ),
    st.builds(lambda uid: WorkloadRequest(keep=KeepWorkload(uid=uid)), text),
    st.builds(lambda uid: WorkloadRequest(**{"del": DelWorkload(uid=uid)}), text),
    st.just(WorkloadRequest(snapshot_sent=SnapshotSent())),
).map(lambda m: m.SerializeToString())
valid_others = st.one_of(
    st.builds(lambda v: ZdsHello(version=v).SerializeToString(), st.integers(0, 3)),
    st.builds(lambda e: WorkloadResponse(ack=Ack(error=e)).SerializeToString(), text),
)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "remove", "truncate", "append"]))
        if action == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif action == "remove":
            del data[at : at + draw(st.integers(1, 4))]
        elif action == "truncate":
            del data[at:]
        else:
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


any_bytes = st.binary(max_size=200)
requests = st.one_of(any_bytes, valid_requests, mutated(valid_requests))


# --- messages --------------------------------------------------------------------------------


@fuzz_settings(500)
@given(data=st.one_of(any_bytes, mutated(valid_requests), mutated(valid_others)))
def test_every_message_parses_or_raises_decode_error(data: bytes) -> None:
    for cls in MESSAGES:
        try:
            message = cls.FromString(data)
        except DecodeError:
            continue
        assert isinstance(message, cls)
        # What parsed can be written back and read again to the same message.
        assert cls.FromString(message.SerializeToString()) == message


# --- ztunnel's side: every request gets an ack -----------------------------------------------


class Handler:
    """Accepts every pod; records what it was asked and closes the netns fds it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def add_pod(self, uid: str, name: str, namespace: str, sa: str, netns_fd: int) -> None:
        os.close(netns_fd)
        self.calls.append(("add", uid, name, namespace, sa))

    def keep_pod(self, uid: str) -> None:
        self.calls.append(("keep", uid))

    def del_pod(self, uid: str) -> None:
        self.calls.append(("del", uid))

    def snapshot_sent(self, kept: set[str]) -> None:
        self.calls.append(("snapshot_sent", frozenset(kept)))


def mistyped(message: Any) -> bool:
    """Whether ``message`` (or one inside it) had one of its own fields on the wire with the
    wrong wire type. protobuf keeps such a field as an unknown one; prost, which ztunnel's side
    decodes with (as Istio's ztunnel does), refuses the message."""
    known = message.DESCRIPTOR.fields_by_number
    if any(f.field_number in known for f in UnknownFieldSet(message)):
        return True
    return any(
        mistyped(value) for field, value in message.ListFields() if field.message_type is not None
    )


def expected_ack(data: bytes, fds: int, flags: int) -> tuple[str | None, list[tuple[Any, ...]]]:
    """What the protocol asks of ztunnel for this datagram, from its decoded form: the ack's
    error (None for ok; a prefix of the text otherwise) and the handler call, if any."""
    if flags & socket.MSG_TRUNC:
        return "request larger than", []
    try:
        request = WorkloadRequest.FromString(data)
    except DecodeError:
        return "unparseable WorkloadRequest", []
    if mistyped(request):
        return "unparseable WorkloadRequest", []
    kind = request.WhichOneof("payload")
    if kind == "add":
        if flags & socket.MSG_CTRUNC or fds != 1:
            return f"add for pod {request.add.uid}: expected one network-namespace", []
        info = request.add.workload_info
        return None, [("add", request.add.uid, info.name, info.namespace, info.service_account)]
    if kind == "keep":
        return None, [("keep", request.keep.uid)]
    if kind == "del":
        return None, [("del", getattr(request, "del").uid)]
    if kind == "snapshot_sent":
        return None, [("snapshot_sent", frozenset())]
    return "WorkloadRequest without a payload", []


@fuzz_settings(500)
@given(
    data=requests,
    fds=st.integers(0, 2),
    flags=st.sampled_from([0, socket.MSG_TRUNC, socket.MSG_CTRUNC]),
)
def test_ztunnel_acks_every_request_and_closes_every_fd(data: bytes, fds: int, flags: int) -> None:
    handler = Handler()
    client = ZdsClient("/nonexistent/zds.sock", handler)  # never started: no socket
    before = open_fds()
    received = [os.open("/dev/null", os.O_RDONLY) for _ in range(fds)]
    error = client._handle(data, received, flags, set())
    assert open_fds() == before, "every fd that came with a request is closed or handed over"
    expected_error, expected_calls = expected_ack(data, fds, flags)
    if expected_error is None:
        assert error is None
    else:
        assert error is not None and error.startswith(expected_error), (error, expected_error)
    assert handler.calls == expected_calls


# --- istio-cni's side: any ack, any hello ----------------------------------------------------


@fuzz_settings(300)
@given(data=st.one_of(any_bytes, mutated(valid_others)))
def test_istio_cni_reads_any_ack_as_ok_or_an_error_text(data: bytes) -> None:
    error = _ack_error(data)
    try:
        response = WorkloadResponse.FromString(data)
    except DecodeError:
        assert error.startswith("unparseable WorkloadResponse")
        return
    if response.WhichOneof("payload") == "ack":
        assert error == response.ack.error
    else:
        assert error == "WorkloadResponse from ztunnel without an ack"


@fuzz_settings(200)
@given(data=st.one_of(st.binary(min_size=1, max_size=100), mutated(valid_others)))
def test_istio_cni_accepts_only_a_v1_hello(tmp_path: Path, data: bytes) -> None:
    server = ZdsServer(tmp_path / "zds.sock", ack_timeout=1.0)  # never started
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        theirs.send(data)
        accepted = server._read_hello(ours)
    try:
        expected = ZdsHello.FromString(data).version == 1
    except DecodeError:
        expected = False
    assert accepted is expected
