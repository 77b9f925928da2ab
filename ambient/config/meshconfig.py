"""Istio's mesh config, the part a waypoint uses: the ``mesh`` key of the ConfigMap
``istio-system/istio`` (what ``istioctl install`` writes and istiod reads), given in a mesh file
like any other object.

Read: ``extensionProviders`` — ``envoyExtAuthzHttp`` (the external authorizer a CUSTOM
AuthorizationPolicy names) and ``envoyFileAccessLog`` (an access log a Telemetry resource may
name). Other fields and provider kinds are accepted and ignored: the rest of a real mesh config
belongs to istiod.
"""

# mypy reads a msgspec struct that inherits `frozen=True` without restating it as not frozen
# (see kubernetes.py); at runtime it is frozen.
# mypy: disable-error-code="misc"

from __future__ import annotations

from typing import Any

from msgspec import field

from .errors import ConfigIssue, Location
from .kubernetes import Closed, Open, PortNumber
from .validate import validate

MESH_CONFIGMAP = ("istio-system", "istio")


class EnvoyExtAuthzHttp(Closed):
    service: str
    port: PortNumber
    timeout: str | None = None
    pathPrefix: str = ""
    failOpen: bool = False
    statusOnError: str | None = None
    includeRequestHeadersInCheck: list[str] = field(default_factory=list)
    includeHeadersInCheck: list[str] = field(default_factory=list)  # deprecated spelling
    includeAdditionalHeadersInCheck: dict[str, str] = field(default_factory=dict)
    includeRequestBodyInCheck: dict[str, Any] | None = None
    headersToUpstreamOnAllow: list[str] = field(default_factory=list)
    headersToDownstreamOnAllow: list[str] = field(default_factory=list)
    headersToDownstreamOnDeny: list[str] = field(default_factory=list)


class EnvoyFileAccessLog(Open):
    path: str = "/dev/stdout"


class ExtensionProvider(Open):
    name: str
    envoyExtAuthzHttp: EnvoyExtAuthzHttp | None = None
    envoyExtAuthzGrpc: dict[str, Any] | None = None
    envoyFileAccessLog: EnvoyFileAccessLog | None = None


class DefaultProviders(Open):
    accessLogging: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)


class MeshConfig(Open):
    extensionProviders: list[ExtensionProvider] = field(default_factory=list)
    defaultProviders: DefaultProviders = field(default_factory=DefaultProviders)


def parse(text: str, location: Location) -> tuple[MeshConfig | None, list[ConfigIssue]]:
    """The ConfigMap's ``data.mesh`` text as a mesh config, or what is wrong with it."""
    import yaml  # only when a mesh config is given: loading a mesh without one needs no PyYAML

    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1} of the text)" if mark is not None else ""
        return None, [ConfigIssue(location, "data.mesh", f"not YAML{where}: {e}")]
    if not isinstance(doc, dict):
        return None, [ConfigIssue(location, "data.mesh", "expected a mapping of mesh settings")]
    config, issues = validate(doc, MeshConfig, location, "data.mesh")
    if config is None:
        return None, issues
    names: set[str] = set()
    for i, p in enumerate(config.extensionProviders):
        if p.name in names:
            issues.append(
                ConfigIssue(
                    location,
                    f"data.mesh.extensionProviders[{i}].name",
                    f"duplicate provider {p.name!r}",
                )
            )
        names.add(p.name)
    return (None if issues else config), issues
