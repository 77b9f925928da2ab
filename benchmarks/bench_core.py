"""HBONE stream and handshake rates of the compiled core, client and server on loopback.

Each round opens a batch of CONNECT streams from inside the client core (no Python per stream);
every stream gets its 200, sends END_STREAM and reads the upstream's END_STREAM. The upstream is a
threaded Python echo app, so an upstream TCP connect per stream is included.
"""

from __future__ import annotations

import pytest

from ambient.hbone import Allow, HboneTarget

from .conftest import CLIENT, SERVER

STREAMS = 2000
HANDSHAKES = 300


def _target(listener, echo) -> HboneTarget:
    return HboneTarget(listener.local_address, echo.address, [SERVER], CLIENT)


@pytest.mark.parametrize("concurrency", [1, 16, 64])
def test_streams_per_second_over_a_pooled_connection(benchmark, planes, echo, concurrency):
    server, client = planes
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    target = _target(listener, echo)
    client.probe(target, 50, concurrency=concurrency)  # warm the pool

    def batch():
        report = client.probe(target, STREAMS, concurrency=concurrency)
        assert report["failed"] == 0, report["first_error"]
        return report

    benchmark.extra_info["streams_per_round"] = STREAMS
    benchmark.pedantic(batch, rounds=5, iterations=1)
    benchmark.extra_info["streams_per_second_median"] = STREAMS / benchmark.stats["median"]
    assert client.stats()["hbone_connections_dialed"] == max(1, -(-concurrency // 100))


@pytest.mark.parametrize("concurrency", [1, 4])
def test_mutual_tls_handshakes_per_second(benchmark, planes, echo, concurrency):
    server, client = planes
    listener = server.serve("127.0.0.1:0", SERVER, Allow(echo.address))
    target = _target(listener, echo)

    def batch():
        report = client.probe(target, HANDSHAKES, concurrency=concurrency, fresh_connections=True)
        assert report["failed"] == 0, report["first_error"]

    benchmark.extra_info["handshakes_per_round"] = HANDSHAKES
    benchmark.pedantic(batch, rounds=5, iterations=1)
    benchmark.extra_info["handshakes_per_second_median"] = HANDSHAKES / benchmark.stats["median"]
