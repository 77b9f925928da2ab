"""ztunnel's ZDS codec (the core's, ``rust/src/zds.rs``) against the protobuf classes istio-cni's
side uses (``ambient.zds.messages``): the same bytes for what ztunnel sends, the same fields for
what it receives. (tests/unit/test_fuzz_zds.py feeds both arbitrary and mutated bytes.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ambient import _core
from ambient.zds import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    WorkloadResponse,
    ZdsHello,
)
from ambient.zds.protocol import VERSION_NOT_USED, VERSION_V1

text = st.text(max_size=40)


@settings(max_examples=300)
@given(error=text)
def test_an_ack_is_the_bytes_protobuf_writes(error: str) -> None:
    assert _core.zds_ack(error) == WorkloadResponse(ack=Ack(error=error)).SerializeToString()


@pytest.mark.parametrize("version", [VERSION_NOT_USED, VERSION_V1])
def test_the_hello_is_the_bytes_protobuf_writes(version: int) -> None:
    assert _core.zds_hello(version) == ZdsHello(version=version).SerializeToString()


requests = st.one_of(
    st.builds(
        lambda uid, name, ns, sa: (
            WorkloadRequest(
                add=AddWorkload(
                    uid=uid, workload_info=WorkloadInfo(name=name, namespace=ns, service_account=sa)
                )
            ),
            ("add", uid, name, ns, sa),
        ),
        text,
        text,
        text,
        text,
    ),
    st.builds(
        lambda uid: (WorkloadRequest(add=AddWorkload(uid=uid)), ("add", uid, "", "", "")), text
    ),
    st.builds(
        lambda uid: (WorkloadRequest(keep=KeepWorkload(uid=uid)), ("keep", uid, "", "", "")), text
    ),
    st.builds(
        lambda uid: (
            WorkloadRequest(**{"del": DelWorkload(uid=uid)}),
            ("del", uid, "", "", ""),
        ),
        text,
    ),
    st.just((WorkloadRequest(snapshot_sent=SnapshotSent()), ("snapshot_sent", "", "", "", ""))),
    st.just((WorkloadRequest(), (None, "", "", "", ""))),
)


@settings(max_examples=500)
@given(request=requests)
def test_every_request_istio_cni_writes_is_read_field_for_field(request) -> None:
    message, fields = request
    assert _core.zds_request(message.SerializeToString()) == fields


def test_a_field_with_the_wrong_wire_type_is_refused_as_istios_ztunnel_refuses_it() -> None:
    # Field 1 (`add`) as a varint: protobuf keeps it as an unknown field and sees no payload;
    # prost (Istio's ztunnel's decoder, and ours) refuses the message. Either way ztunnel acks
    # with an error; the message says which.
    assert WorkloadRequest.FromString(b"\x08\x00").WhichOneof("payload") is None
    with pytest.raises(ValueError, match="invalid wire type"):
        _core.zds_request(b"\x08\x00")


@pytest.mark.parametrize("data", [b"\x0a\x05ab", b"\xff", b"\x0a\x02\x0a\x80"])
def test_truncated_or_garbled_bytes_are_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(ValueError, match="failed to decode"):
        _core.zds_request(data)
