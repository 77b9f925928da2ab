"""Python filters (WasmPlugin) at the waypoint: what a user is told about a plugin the waypoint
cannot take, the order plugins run in, and what loading a filter file reports. The filters
themselves run end to end in ``tests/integration/test_waypoint_filters.py``."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ambient.config import load_mesh
from ambient.config.errors import ConfigError
from ambient.waypoint import plugins
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
ON_ECHO = "targetRefs: [{kind: Service, name: echo}]"


def wasm(spec: str, name: str = "f", annotations: str = "") -> str:
    return textwrap.dedent(f"""
    apiVersion: extensions.istio.io/v1alpha1
    kind: WasmPlugin
    metadata: {{name: {name}, namespace: default{annotations}}}
    spec: {{{spec}}}
    ---
    """)


def load(tmp_path: Path, *docs: str):
    path = tmp_path / "mesh.yaml"
    path.write_text(HEAD + "".join(docs))
    return load_mesh([path])


REFUSED = [
    (wasm(f"{ON_ECHO}, url: oci://ghcr.io/x/y:1"), "spec.url", "a Python file"),
    (wasm(f"{ON_ECHO}, url: file://x.wasm"), "spec.url", "a Python file"),
    (wasm(f"{ON_ECHO}, url: file://x.py, type: NETWORK"), "spec.type", "HTTP"),
    (wasm(f"{ON_ECHO}, url: file://x.py, pluginName: 'a-b'"), "spec.pluginName", "class name"),
    (wasm(f"{ON_ECHO}, url: file://x.py, phase: LATE"), "spec.phase", "AUTHN"),
    (wasm(f"{ON_ECHO}, url: file://x.py, failStrategy: MAYBE"), "spec.failStrategy", "FAIL_OPEN"),
    (
        wasm(
            f"{ON_ECHO}, url: file://x.py",
            annotations=", annotations: {ambient.dev/filter-budget: soon}",
        ),
        "ambient.dev/filter-budget",
        "50ms",
    ),
    (
        wasm("url: file://x.py, targetRefs: [{kind: Service, name: echo, namespace: x}]"),
        "namespace",
        "x",
    ),
]


@pytest.mark.parametrize(
    ("doc", "field", "said"), REFUSED, ids=[r[1] + str(i) for i, r in enumerate(REFUSED)]
)
def test_a_plugin_the_waypoint_cannot_take_is_refused_naming_the_field(
    tmp_path: Path, doc: str, field: str, said: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, doc)
    text = str(e.value)
    assert "mesh.yaml" in text and field in text and said in text, text


def test_paths_order_and_scope(tmp_path: Path) -> None:
    mesh = load(
        tmp_path,
        wasm(f"{ON_ECHO}, url: file://rel/a.py, phase: STATS, priority: 1", "low"),
        wasm(f"{ON_ECHO}, url: file:///abs/b.py, phase: STATS, priority: 5", "high"),
        wasm(f"{ON_ECHO}, url: file://c.py", "unspecified"),
        wasm(
            "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], "
            "url: file://d.py, phase: AUTHN, match: [{ports: [{number: 80}]}]",
            "on-gateway",
        ),
        wasm("selector: {matchLabels: {app: echo}}, url: file://e.py", "sidecar"),
    )
    by_name = {p.name: p for p in mesh.plugins}
    assert by_name["low"].path == str(tmp_path.resolve() / "rel" / "a.py")
    assert by_name["high"].path == "/abs/b.py"
    assert by_name["on-gateway"].ports == (80,)
    assert "sidecar" not in by_name
    assert any("WasmPlugin default/sidecar has no targetRefs" in w for w in mesh.warnings)
    table = compile_table(mesh, "default/waypoint")
    order = [table["plugins"][i]["name"] for i in table["services"][0]["plugins"]]
    assert order == [
        "default/on-gateway",
        "default/high",
        "default/low",
        "default/unspecified",
    ]
    assert [table["plugins"][i]["name"] for i in table["workload_plugins"]] == [
        "default/on-gateway"
    ]
    assert table["plugins"][0]["budget"] == plugins.DEFAULT_BUDGET
    assert not table["plugins"][0]["fail_open"]


def _plugin(path: Path, class_name: str = "", config: dict | None = None) -> plugins.WaypointPlugin:
    return plugins.WaypointPlugin(
        namespace="default",
        name="f",
        targets=(),
        path=str(path),
        class_name=class_name,
        phase="STATS",
        priority=0,
        config=config or {},
        fail_open=False,
        budget=0.1,
    )


LOAD_ERRORS = [
    ("x = (\n", "", ":1: syntax error"),
    ("raise ImportError('no such module')\n", "", "running the file raised ImportError"),
    ("class A:\n    pass\n", "", "0 Filter classes"),
    ("class A:\n    pass\n", "B", "no class 'B'"),
    ("class A:\n    pass\n", "A", "has no on_request"),
    (
        "from ambient.filters import Filter\nclass A(Filter):\n"
        "    def __init__(self, config):\n        raise ValueError('rate must be set')\n",
        "",
        "A(pluginConfig) raised ValueError: rate must be set",
    ),
]


@pytest.mark.parametrize(
    ("source", "class_name", "said"), LOAD_ERRORS, ids=[e[2] for e in LOAD_ERRORS]
)
def test_a_filter_file_that_does_not_load_says_why(
    tmp_path: Path, source: str, class_name: str, said: str
) -> None:
    path = tmp_path / "f.py"
    path.write_text(source)
    host = plugins.PluginHost(changed=lambda: None)
    host.update([_plugin(path, class_name)])
    error = host.status()["default/f"]["error"]
    assert error and str(path) in error and said in error, error
    with pytest.raises(plugins.FilterUnavailable, match="not loaded"):
        host.on_request("default/f", "GET", "/", "h", [], "", "", "", "", None, None)


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    host = plugins.PluginHost(changed=lambda: None)
    host.update([_plugin(tmp_path / "gone.py")])
    assert "cannot read the filter" in host.status()["default/f"]["error"]


def test_the_host_hands_back_what_the_filter_did(tmp_path: Path) -> None:
    path = tmp_path / "f.py"
    path.write_text(
        textwrap.dedent("""
        from ambient.filters import Filter, respond

        class F(Filter):
            def on_request(self, request):
                if request.path == "/teapot":
                    return respond(418, "short and stout", {"X-Pot": "1"})
                request.headers["x-seen"] = request.method
                request.path = "/rewritten"

            def on_response(self, request, response):
                response.headers.add("x-status", str(response.status))
        """)
    )
    host = plugins.PluginHost(changed=lambda: None)
    host.update([_plugin(path)])
    assert host.capabilities("default/f") == (True, 0)
    args = ("default/f", "GET")
    tail = ("h", [("accept", "*/*")], "", "", "", "", None, None)
    answer = host.on_request(*args, "/teapot", *tail)
    assert answer[:3] == ("respond", 418, b"short and stout")
    assert ("x-pot", "1") in answer[3] and ("content-type", "text/plain") in answer[3]
    kind, headers, path_, state = host.on_request(*args, "/", *tail)
    assert kind == "continue" and path_ == "/rewritten"
    assert headers == [("accept", "*/*"), ("x-seen", "GET")]
    assert host.on_response("default/f", state, 204, []) == [("x-status", "204")]
