"""What the compiled per-stream decision path gains over plain Python.

Two levels:
- the dispatcher alone (build the StreamRequest, run a realistic decision that reads the peer's
  namespace, the Forwarded client and the baggage, return the verdict): Cython vs pure Python;
- the whole stream in the core with the decision in Python: fixed verdict (no Python at all),
  Cython dispatcher, pure-Python dispatcher — streams per second over one pooled connection.
"""

from __future__ import annotations

import pytest

import ambient._fast.hbone_request as fast
import ambient.hbone_request as reference
from ambient._core import Allow, Deny
from ambient.hbone import HboneTarget

from .conftest import CLIENT, SERVER

IMPLEMENTATIONS = {"cython": fast, "python": reference}
ARGS = (
    "spiffe://cluster.local/ns/default/sa/sleep",
    "10.0.0.5:8080",
    "10.0.0.9:51000",
    (
        ("forwarded", 'for="10.0.0.3:4000";host=echo.default.svc.cluster.local'),
        ("baggage", "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,service.name=sleep"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
    ),
)
ALLOW = Allow("127.0.0.1:8080")
DENY = Deny("outside the allowed namespaces")


def policy(request):
    peer = request.peer
    if peer is None or peer.namespace not in ("default", "bench"):
        return DENY
    if request.forwarded_for is None or request.baggage.get("service.name") == "blocked":
        return DENY
    return ALLOW


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_dispatch_one_stream_decision(benchmark, impl):
    dispatch = IMPLEMENTATIONS[impl].InboundDispatcher(policy)
    assert dispatch(*ARGS) is ALLOW
    benchmark(dispatch, *ARGS)


STREAMS = 2000


@pytest.mark.parametrize("decision", ["fixed", "cython", "python"])
def test_streams_per_second_with_a_python_decision(benchmark, planes, echo, decision):
    server, client = planes

    def policy_to_echo(request):
        verdict = policy(request)
        return Allow(echo.address) if verdict is ALLOW else verdict

    if decision == "fixed":
        decide = Allow(echo.address)
    else:
        decide = IMPLEMENTATIONS[decision].InboundDispatcher(policy_to_echo)
    listener = server.core.serve_hbone("127.0.0.1:0", SERVER, decide)
    target = HboneTarget(
        listener.local_address,
        echo.address,
        [SERVER],
        CLIENT,
        # probe() streams have no accepted client to put in Forwarded: declare one here.
        headers=[
            ("forwarded", 'for="10.0.0.3:4000"'),
            ("baggage", "k8s.namespace.name=bench,service.name=client"),
        ],
    )
    client.probe(target, 50, concurrency=16)

    def batch():
        report = client.probe(target, STREAMS, concurrency=16)
        assert report["failed"] == 0, report["first_error"]

    benchmark.pedantic(batch, rounds=5, iterations=1)
    benchmark.extra_info["streams_per_second_median"] = STREAMS / benchmark.stats["median"]
