"""The per-stream request path, run against both implementations: the compiled one the data plane
uses (ambient._fast.hbone_request) and the pure-Python reference (ambient.hbone_request)."""

from __future__ import annotations

import pytest

import ambient._fast.hbone_request as fast
import ambient.hbone_request as reference
from ambient._core import Allow, Deny


@pytest.fixture(params=[fast, reference], ids=["cython", "python"])
def impl(request):
    return request.param


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ("spiffe://cluster.local/ns/default/sa/sleep", ("cluster.local", "default", "sleep")),
        ("spiffe://td/ns/a/sa/b", ("td", "a", "b")),
        ("spiffe://cluster.local/ns/default", None),  # no service account
        ("spiffe://cluster.local/sa/x/ns/y", None),  # wrong order
        ("spiffe:///ns/a/sa/b", None),  # empty trust domain
        ("spiffe://td/ns//sa/b", None),  # empty namespace
        ("http://cluster.local/ns/a/sa/b", None),  # not SPIFFE
        ("", None),
        (None, None),  # no identity (plaintext)
    ],
)
def test_split_spiffe(impl, identity, expected):
    assert impl.split_spiffe(identity) == expected


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("[fd00::1]:15008", ("fd00::1", 15008)),
        ("svc.ns.svc.cluster.local:8080", ("svc.ns.svc.cluster.local", 8080)),
    ],
)
def test_split_host_port(impl, authority, expected):
    assert impl.split_host_port(authority) == expected


@pytest.mark.parametrize(
    "authority", ["10.0.0.1", ":80", "10.0.0.1:", "10.0.0.1:0", "h:70000", "h:x"]
)
def test_split_host_port_refuses_and_names_the_authority(impl, authority):
    with pytest.raises(ValueError, match="authority"):
        impl.split_host_port(authority)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('for="10.0.0.1:4567"', [{"for": "10.0.0.1:4567"}]),
        (
            'for="10.0.0.1:4567";host=echo.default.svc.cluster.local',
            [{"for": "10.0.0.1:4567", "host": "echo.default.svc.cluster.local"}],
        ),
        ('For="[fd00::1]:80", for=10.0.0.2', [{"for": "[fd00::1]:80"}, {"for": "10.0.0.2"}]),
        ('for="a;b,c";proto=https', [{"for": "a;b,c", "proto": "https"}]),  # quoted separators
        ('for="say \\"hi\\""', [{"for": 'say "hi"'}]),
        ("garbage;;,", []),  # malformed pairs are skipped
        ("", []),
    ],
)
def test_parse_forwarded(impl, value, expected):
    assert impl.parse_forwarded(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,service.name=echo",
            {
                "k8s.cluster.name": "Kubernetes",
                "k8s.namespace.name": "default",
                "service.name": "echo",
            },
        ),
        ("service.version=v1;ttl=10", {"service.version": "v1"}),  # properties dropped
        ("k = v , other=x%2Cy", {"k": "v", "other": "x,y"}),  # trimmed, percent-decoded
        ("novalue,=x,a=1", {"a": "1"}),
        ("", {}),
    ],
)
def test_parse_baggage(impl, value, expected):
    assert impl.parse_baggage(value) == expected


def make_request(impl, **overrides):
    fields = {
        "peer_identity": "spiffe://cluster.local/ns/default/sa/sleep",
        "authority": "10.0.0.5:8080",
        "peer_address": "10.0.0.9:51000",
        "headers": (
            ("forwarded", 'for="10.0.0.3:4000";host=echo'),
            ("baggage", "k8s.namespace.name=default"),
            ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-00"),
        ),
    }
    fields.update(overrides)
    return impl.StreamRequest(**fields)


def test_stream_request_views(impl):
    request = make_request(impl)
    assert request.destination == ("10.0.0.5", 8080)
    assert request.peer == ("cluster.local", "default", "sleep")
    assert request.peer.namespace == "default"
    assert request.forwarded_for == "10.0.0.3:4000"
    assert request.baggage == {"k8s.namespace.name": "default"}
    assert request.header("Traceparent").startswith("00-aaaa")
    assert request.header("x-missing") is None


def test_stream_request_without_identity_or_headers(impl):
    request = make_request(impl, peer_identity=None, headers=())
    assert request.peer is None
    assert request.forwarded_for is None
    assert request.baggage == {}


def test_dispatcher_passes_a_request_and_returns_the_verdict(impl):
    seen = []

    def decide(request):
        seen.append(request)
        return Allow("127.0.0.1:80") if request.peer else Deny("no identity")

    dispatch = impl.InboundDispatcher(decide)
    allowed = dispatch("spiffe://td/ns/a/sa/b", "10.0.0.1:80", "10.0.0.2:1", ())
    denied = dispatch(None, "10.0.0.1:80", "10.0.0.2:1", ())
    assert isinstance(allowed, Allow) and allowed.upstream == "127.0.0.1:80"
    assert isinstance(denied, Deny) and denied.reason == "no identity"
    assert [r.peer_identity for r in seen] == ["spiffe://td/ns/a/sa/b", None]


def test_dispatcher_refuses_a_verdict_of_the_wrong_type(impl):
    dispatch = impl.InboundDispatcher(lambda request: "127.0.0.1:80")
    with pytest.raises(TypeError, match="returned str; expected Allow or Deny"):
        dispatch(None, "10.0.0.1:80", "10.0.0.2:1", ())
