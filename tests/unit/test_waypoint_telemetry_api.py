"""Istio's Telemetry API at the waypoint: which resource wins, what a filter expression
logs, and what a user is told about what the waypoint cannot take. End to end (the access log
and the metrics endpoint): ``tests/integration/test_waypoint_telemetry.py``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ambient.config import load_mesh
from ambient.config.errors import ConfigError
from ambient.waypoint import telemetry_api
from ambient.waypoint.table import compile_table

HEAD = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{name: http, port: 80}]}
---
"""
GATEWAY = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], "
ON_ECHO = "targetRefs: [{kind: Service, name: echo}], "


def telemetry(spec: str, name: str = "t", namespace: str = "default") -> str:
    return textwrap.dedent(f"""
    apiVersion: telemetry.istio.io/v1
    kind: Telemetry
    metadata: {{name: {name}, namespace: {namespace}}}
    spec: {{{spec}}}
    ---
    """)


def load(tmp_path: Path, *docs: str):
    path = tmp_path / "mesh.yaml"
    path.write_text(HEAD + "".join(docs))
    return load_mesh([path])


def test_the_most_specific_access_logging_wins(tmp_path: Path) -> None:
    mesh = load(
        tmp_path,
        telemetry("accessLogging: [{disabled: true}]", "root", "istio-system"),
        telemetry("accessLogging: [{disabled: false}]", "namespace"),
        telemetry(
            GATEWAY + "accessLogging: [{filter: {expression: 'response.code >= 500'}}]", "gw"
        ),
        telemetry(
            ON_ECHO + "accessLogging: [{filter: {expression: 'response.code == 418'}}]", "svc"
        ),
    )
    table = compile_table(mesh, "default/waypoint")
    assert table["services"][0]["access_log"] == {"disabled": False, "codes": [[418, 418]]}
    assert table["workload_access_log"] == {"disabled": False, "codes": [[500, 599]]}


def test_without_telemetry_every_request_is_logged(tmp_path: Path) -> None:
    table = compile_table(load(tmp_path), "default/waypoint")
    assert table["services"][0]["access_log"] is None


def test_a_filter_becomes_ranges_of_codes() -> None:
    where = "spec.accessLogging[0].filter.expression"
    codes = telemetry_api.codes_logged
    assert codes("response.code >= 400 && response.code != 404", where) == (
        (400, 403),
        (405, 599),
    )
    assert codes("response.code in [200, 201, 503]", where) == ((200, 201), (503, 503))
    assert codes("false", where) == ()


def test_metric_overrides_merge_from_root_to_gateway(tmp_path: Path) -> None:
    mesh = load(
        tmp_path,
        telemetry(
            "metrics: [{overrides: [{match: {metric: ALL_METRICS}, tagOverrides: "
            "{source_version: {operation: REMOVE}}}, {match: {metric: REQUEST_SIZE}, "
            "disabled: true}]}]",
            "root",
            "istio-system",
        ),
        telemetry(
            GATEWAY + "metrics: [{overrides: [{match: {metric: REQUEST_SIZE}, disabled: false}, "
            "{match: {customMetric: istio_requests_total}, tagOverrides: "
            "{request_protocol: {operation: REMOVE}}}]}]",
            "gw",
        ),
        telemetry(
            "metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]}]",
            "elsewhere",
            "other",
        ),
    )
    out = telemetry_api.metric_overrides(mesh.telemetry, "default/waypoint")
    assert out["istio_request_bytes"] == (False, ("source_version",))
    assert out["istio_requests"] == (False, ("request_protocol", "source_version"))
    assert out["istio_tcp_sent_bytes"] == (False, ("source_version",))


REFUSED = [
    ("accessLogging: [{filter: {expression: 'response.code >='}}]", "filter.expression", "CEL"),
    (
        'accessLogging: [{filter: {expression: \'request.headers["x"] == "y"\'}}]',
        "filter.expression",
        "response.code only",
    ),
    ("accessLogging: [{filter: {expression: 'response.code'}}]", "filter.expression", "true/false"),
    (
        "metrics: [{overrides: [{tagOverrides: {x: {operation: UPSERT, value: y}}}]}]",
        "tagOverrides.x.operation",
        "only REMOVE",
    ),
    ("metrics: [{overrides: [{match: {metric: LATENCY}}]}]", "match.metric", "REQUEST_COUNT"),
]


@pytest.mark.parametrize(("spec", "field", "said"), REFUSED, ids=[r[2] for r in REFUSED])
def test_what_the_waypoint_cannot_take_is_refused_naming_the_field(
    tmp_path: Path, spec: str, field: str, said: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, telemetry(GATEWAY + spec))
    text = str(e.value)
    assert "Telemetry default/t" in text and field in text and said in text, text


def test_what_the_waypoint_ignores_is_a_warning(tmp_path: Path) -> None:
    mesh = load(
        tmp_path,
        telemetry("selector: {matchLabels: {app: echo}}, accessLogging: [{disabled: true}]", "s"),
        telemetry(GATEWAY + "accessLogging: [{providers: [{name: otel}], disabled: true}]", "o"),
    )
    assert any("Telemetry default/s selects pods" in w for w in mesh.warnings)
    assert any("providers ['otel'] are not the waypoint's access log" in w for w in mesh.warnings)
    assert compile_table(mesh, "default/waypoint")["services"][0]["access_log"] is None
