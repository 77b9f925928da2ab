"""CUSTOM authorization at a waypoint: the HTTP external authorizers of the mesh config
(``extensionProviders[].envoyExtAuthzHttp``) that CUSTOM AuthorizationPolicies name.

Istio's order: the CUSTOM policies come first. A request that one of them matches is sent to
its provider (``rust/src/waypoint/extauthz.rs`` says what the check carries and how its answer
is used); a request no CUSTOM policy matches is not. A 2xx answer lets the request on to the
other policies, anything else is returned to the client. A provider that cannot be reached
within its ``timeout`` (Istio's default: 10 minutes) lets requests on with ``failOpen``, else
answers ``statusOnError`` (default 403). A policy that names a provider the mesh config does not
define denies what it matches (Istio's fail-closed), with a warning when the mesh is loaded.

``service`` is ``[namespace/]hostname`` as in Istio: a Service of the mesh by its hostname
(``name.namespace.svc.cluster.local``), reached like any backend, over HBONE when it is in
the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config.errors import ConfigIssue, Location
from ..config.meshconfig import MeshConfig
from ..mesh import Service
from . import authn, authz

# Istio's defaults for envoyExtAuthzHttp.
DEFAULT_TIMEOUT = 600.0
DEFAULT_STATUS_ON_ERROR = 403


@dataclass(frozen=True)
class ExtAuthzProvider:
    name: str
    service: str  # [namespace/]hostname
    port: int
    timeout: float = DEFAULT_TIMEOUT
    path_prefix: str = ""
    include_headers: tuple[str, ...] = ()
    additional_headers: tuple[tuple[str, str], ...] = ()
    upstream_on_allow: tuple[str, ...] = ()
    downstream_on_allow: tuple[str, ...] = ()
    downstream_on_deny: tuple[str, ...] = ()
    fail_open: bool = False
    status_on_error: int = DEFAULT_STATUS_ON_ERROR

    def resolve(self, services: Sequence[Service]) -> Service | None:
        """The mesh Service ``service`` names, if any."""
        namespace, _, hostname = self.service.rpartition("/")
        for s in services:
            if namespace and s.namespace != namespace:
                continue
            short = f"{s.name}.{s.namespace}"
            if hostname in (s.hostname, short, f"{short}.svc"):
                return s
        return None


def compile_providers(
    config: MeshConfig, location: Location
) -> tuple[list[ExtAuthzProvider], list[ConfigIssue]]:
    """The HTTP ext_authz providers of a mesh config, or what is wrong with each."""
    providers, issues = [], []
    for i, p in enumerate(config.extensionProviders):
        http = p.envoyExtAuthzHttp
        if http is None:
            continue
        where = f"data.mesh.extensionProviders[{i}].envoyExtAuthzHttp"
        try:
            status = int(http.statusOnError or DEFAULT_STATUS_ON_ERROR)
        except ValueError:
            status = 0
        if not 200 <= status <= 599:
            issues.append(
                ConfigIssue(
                    location,
                    f"{where}.statusOnError",
                    f'expected an HTTP status such as "403", got {http.statusOnError!r}',
                )
            )
            continue
        try:
            timeout = (
                authn.seconds(http.timeout, f"{where}.timeout") if http.timeout else DEFAULT_TIMEOUT
            )
        except authz.AuthzError as e:
            issues.append(ConfigIssue(location, e.field, str(e)))
            continue
        if http.pathPrefix and not http.pathPrefix.startswith("/"):
            issues.append(
                ConfigIssue(location, f"{where}.pathPrefix", "expected a path starting with /")
            )
            continue
        providers.append(
            ExtAuthzProvider(
                name=p.name,
                service=http.service,
                port=http.port,
                timeout=timeout,
                path_prefix=http.pathPrefix,
                include_headers=tuple(
                    h.lower()
                    for h in http.includeRequestHeadersInCheck + http.includeHeadersInCheck
                ),
                additional_headers=tuple(
                    (k.lower(), v) for k, v in http.includeAdditionalHeadersInCheck.items()
                ),
                upstream_on_allow=tuple(h.lower() for h in http.headersToUpstreamOnAllow),
                downstream_on_allow=tuple(h.lower() for h in http.headersToDownstreamOnAllow),
                downstream_on_deny=tuple(h.lower() for h in http.headersToDownstreamOnDeny),
                fail_open=http.failOpen,
                status_on_error=status,
            )
        )
    return providers, issues


def provider_json(provider: ExtAuthzProvider, backend: dict[str, Any]) -> dict[str, Any]:
    """``provider`` for the waypoint's table; ``backend``: its Service as a route backend."""
    return {
        "name": provider.name,
        "backend": backend,
        "timeout": provider.timeout,
        "path_prefix": provider.path_prefix,
        "include_headers": list(provider.include_headers),
        "additional_headers": [list(h) for h in provider.additional_headers],
        "upstream_on_allow": list(provider.upstream_on_allow),
        "downstream_on_allow": list(provider.downstream_on_allow),
        "downstream_on_deny": list(provider.downstream_on_deny),
        "fail_open": provider.fail_open,
        "status_on_error": provider.status_on_error,
    }
