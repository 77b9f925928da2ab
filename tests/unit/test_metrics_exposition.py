"""The metrics text the core writes (ambient.telemetry.metrics.Exposition over
``_core.encode_metrics``): strict OpenMetrics, Istio's TCP families from each label set's
counters, label values escaped whatever a workload's labels hold."""

from __future__ import annotations

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from ambient import _core
from ambient.telemetry.metrics import FLAG_INDEX, LABELS, ConnectionMetrics, Exposition, Labels


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def labels(**given: str) -> Labels:
    values = [given.get(name, "unknown") for name in LABELS if name != "response_flags"]
    return Labels(tuple(values))


def test_a_label_set_with_no_connection_yet_is_opened_zero_closed_zero_and_not_failed():
    metrics = ConnectionMetrics()
    metrics.counters(labels(reporter="source", source_workload="a"))
    got = families(Exposition(metrics).text())
    (opened,) = got["istio_tcp_connections_opened"].samples
    assert opened.name == "istio_tcp_connections_opened_total" and opened.value == 0
    assert opened.labels["reporter"] == "source" and opened.labels["response_flags"] == "-"
    assert [s.value for s in got["istio_tcp_connections_closed"].samples] == [0]
    assert got["istio_tcp_connections_failed"].samples == []
    assert list(opened.labels) == list(LABELS)  # Istio's label order


@pytest.mark.parametrize("value", ['a"b', "back\\slash", "new\nline", "ünïcode", '{x="y"}'])
def test_label_values_are_escaped_whatever_a_workload_is_labelled(value):
    metrics = ConnectionMetrics()
    metrics.counters(labels(reporter="destination", source_app=value))
    (opened,) = families(Exposition(metrics).text())["istio_tcp_connections_opened"].samples
    assert opened.labels["source_app"] == value


def test_core_statistics_are_counters_or_gauges_and_istio_build_names_the_component():
    stats = {"handshake_failures": 3, "live_connections": 2}
    got = families(Exposition(ConnectionMetrics("waypoint"), lambda: stats).text())
    assert got["ambient_core_handshake_failures"].type == "counter"
    assert got["ambient_core_handshake_failures"].samples[0].value == 3
    assert got["ambient_core_live_connections"].type == "gauge"
    assert got["istio_build"].samples[0].labels["component"] == "waypoint"
    assert got["process_cpu_seconds"].samples[0].value > 0


def test_a_label_set_of_the_wrong_length_is_refused_naming_what_was_expected():
    from ambient._core import Counters

    with pytest.raises(ValueError, match="expected 22"):
        _core.encode_metrics(list(LABELS), FLAG_INDEX, [(("source",), Counters())], [])


def test_a_histogram_family_is_cumulative_with_an_inf_bucket():
    # As a waypoint's request metrics are handed over: per-bucket counts, +Inf (f64::MAX) last.
    buckets = [(1.0, 1), (10.0, 0), (1.7976931348623157e308, 2)]
    text = _core.encode_metrics(
        list(LABELS),
        FLAG_INDEX,
        [],
        [],
        [("h_ms", "a histogram", [([("a", 'q"x')], 42.5, 3, buckets)])],
    )
    (h,) = [f for f in text_string_to_metric_families(text) if f.name == "h_ms"]
    assert h.type == "histogram"
    by_le = {s.labels["le"]: s.value for s in h.samples if s.name == "h_ms_bucket"}
    assert by_le == {"1.0": 1, "10.0": 1, "+Inf": 3}
    (count,) = [s for s in h.samples if s.name == "h_ms_count"]
    (total,) = [s for s in h.samples if s.name == "h_ms_sum"]
    assert count.value == 3 and total.value == 42.5 and count.labels["a"] == 'q"x'
