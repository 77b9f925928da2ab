"""Read mesh files into one validated, immutable :class:`~ambient.mesh.Mesh` — or refuse them all.

A file holds YAML documents, each either a Kubernetes object (Namespace, Pod, Service) or Istio
ztunnel's local config (``workloads``/``services``/``policies``). Every problem in every file is
collected and reported together (file, document, object, field, what was expected); if there is
any, no snapshot is built, so nothing ever starts from a half-read config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..identity.spiffe import DEFAULT_TRUST_DOMAIN
from ..mesh import Mesh, Service, Waypoint, Workload
from ..policy.model import Policy
from ..waypoint import authn, authz, extauthz, plugins, routes, telemetry_api
from . import authorization, meshconfig, tags, translate, waypoints, yamlfile
from . import kubernetes as k8s
from . import ztunnel_local as local
from .documents import DocumentCache, Parsed, documents
from .errors import ConfigError, ConfigIssue, Location, _short, field_path
from .validate import validate

LOCAL_CONFIG = "ztunnel local config"  # the `resource` of locations inside that file
# Kinds that belong to later parts of ambient or to Kubernetes itself: accepted and ignored, with
# a warning, so a whole application manifest can be given as-is.
IGNORED_KINDS_NOTE = "not used by ambient's data plane; ignored"


@dataclass
class _Collected:
    namespaces: list[tuple[k8s.Namespace, Location]] = field(default_factory=list)
    pods: list[tuple[k8s.Pod, Location]] = field(default_factory=list)
    services: list[tuple[k8s.Service, Location]] = field(default_factory=list)
    authorization_policies: list[tuple[k8s.AuthorizationPolicy, Location]] = field(
        default_factory=list
    )
    request_authentications: list[tuple[k8s.RequestAuthentication, Location]] = field(
        default_factory=list
    )
    gateways: list[tuple[k8s.Gateway, Location]] = field(default_factory=list)
    wasm_plugins: list[tuple[k8s.WasmPlugin, Location]] = field(default_factory=list)
    config_maps: list[tuple[k8s.ConfigMap, Location]] = field(default_factory=list)
    telemetries: list[tuple[k8s.Telemetry, Location]] = field(default_factory=list)
    http_routes: list[tuple[k8s.HTTPRoute, Location]] = field(default_factory=list)
    local_configs: list[tuple[local.LocalConfig, Location]] = field(default_factory=list)
    issues: list[ConfigIssue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _resource_name(doc: dict[str, Any]) -> str | None:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    kind, name, ns = doc.get("kind"), meta.get("name"), meta.get("namespace")
    if not isinstance(kind, str):
        return None
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


@dataclass
class MeshCache:
    """What one load keeps for the next, so reloading the same files costs what changed: each
    document by its text (parsed and validated), and each workload, Service and policy made
    from them (kept while what it was made from is the same objects)."""

    documents: DocumentCache = field(default_factory=DocumentCache)
    made: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = field(default_factory=dict)
    used: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = field(default_factory=dict)

    def make(self, kind: str, inputs: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """``build()``, or what it returned for the same ``inputs`` (compared by identity:
        objects from unchanged documents are the same objects) in the last load."""
        # By id: an entry holds its inputs, so while it is here no other object has their ids.
        key = (kind, *map(id, inputs))
        found = self.made.get(key)
        value = found[1] if found is not None else build()
        self.used[key] = (inputs, value)
        return value

    def begin(self) -> None:
        self.documents.begin()
        self.used = {}

    def end(self) -> None:
        self.documents.sweep()
        self.made, self.used = self.used, {}


def _build(
    cache: MeshCache | None, kind: str, inputs: tuple[Any, ...], build: Callable[[], Any]
) -> Any:
    return build() if cache is None else cache.make(kind, inputs, build)


def _read_documents(
    path: Path, out: _Collected, cache: MeshCache | None = None
) -> list[tuple[Any, bool, Location, Parsed | None]]:
    """The documents of ``path``, each with whether it holds a YAML tag, where it is, and its
    cached chunk (with a ``cache``)."""
    try:
        text = path.read_bytes().decode("utf-8")  # YAML files are UTF-8, whatever the locale
    except OSError as e:
        out.issues.append(ConfigIssue(Location(str(path)), "", f"cannot read: {e.strerror}"))
        return []
    except UnicodeDecodeError as e:
        out.issues.append(
            ConfigIssue(
                Location(str(path)),
                "",
                f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start} ({e.reason})",
            )
        )
        return []
    docs: list[tuple[Any, bool, Location, Parsed | None]] = []
    if not text.strip():
        # An empty file is more likely one being written than a mesh with nothing in it.
        out.issues.append(ConfigIssue(Location(str(path)), "", "the file is empty"))
        return docs
    try:
        chunks = cache.documents if cache is not None else None
        file = str(path)
        for n, (doc, tagged, parsed) in enumerate(documents(text, chunks), start=1):
            docs.append((doc, tagged, Location(file, n), parsed))
    except yamlfile.YAMLError as e:  # evaluated only once something was raised
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        out.issues.append(
            ConfigIssue(Location(str(path), len(docs) + 1), "", f"{where}invalid YAML: {problem}")
        )
    return docs


def _classify(
    doc: Any, tagged: bool, location: Location, out: _Collected, parsed: Parsed | None = None
) -> None:
    if parsed is not None and parsed.resource is not None:
        # Unchanged since a load that validated it: only the object was kept.
        _collect(parsed.resource, Location(location.file, location.document, parsed.name), out)
        return
    if doc is None:
        return  # an empty document (e.g. a trailing ---)
    if isinstance(doc, tags.Tagged):
        out.issues.append(ConfigIssue(location, "", _stray_tag_message(doc)))
        return
    if not isinstance(doc, dict):
        out.issues.append(
            ConfigIssue(location, "", f"expected a mapping, got {type(doc).__name__}")
        )
        return
    if "kind" in doc or "apiVersion" in doc:
        location = Location(location.file, location.document, _resource_name(doc))
        if not (tagged and _refuse_stray_tags(doc, location, lambda _: False, out)):
            _kubernetes_object(doc, location, out, parsed)
    elif doc.keys() and set(doc) <= LOCAL_CONFIG_MODELS.keys():
        location = Location(location.file, location.document, LOCAL_CONFIG)
        if tagged and _refuse_stray_tags(doc, location, local.is_string_match, out):
            return
        if _local_config(doc, location, out):
            out.warnings.extend(f"{location}: {w}" for w in local.istio_differences(doc))
    else:
        out.issues.append(
            ConfigIssue(
                location,
                "",
                "expected a Kubernetes object (apiVersion, kind, metadata) or ztunnel's local "
                f"config (workloads, services, policies); got keys {sorted(map(str, doc))}",
            )
        )


def _local_config(doc: dict[str, Any], location: Location, out: _Collected) -> bool:
    """Collect ztunnel's local config in ``doc``, validating each workload, service and policy
    on its own (so each one's errors are reported); whether it was all valid."""
    valid = True
    parts: dict[str, list[Any]] = {}
    for key, model in LOCAL_CONFIG_MODELS.items():
        items = doc.get(key, [])
        if not isinstance(items, list):
            out.issues.append(ConfigIssue(location, key, f"expected a list, got {_short(items)}"))
            valid = False
            continue
        parts[key] = []
        for i, item in enumerate(items):
            value, issues = validate(item, model, location, f"{key}[{i}]")
            out.issues.extend(issues)
            valid = valid and value is not None
            parts[key].append(value)
    if valid:
        out.local_configs.append((local.LocalConfig(**parts), location))
    return valid


LOCAL_CONFIG_MODELS: dict[str, type] = {
    "workloads": local.LocalWorkload,
    "services": local.LocalService,
    "policies": local.LocalPolicy,
}


def _refuse_stray_tags(
    doc: dict[str, Any],
    location: Location,
    allowed: Callable[[tags.Path], bool],
    out: _Collected,
) -> bool:
    """Whether ``doc`` holds a YAML tag where none belongs (each one an issue); such a document
    is not read further."""
    stray = tags.stray_tags(doc, allowed)
    for path, tagged in stray:
        out.issues.append(ConfigIssue(location, field_path(path), _stray_tag_message(tagged)))
    return bool(stray)


def _stray_tag_message(tagged: tags.Tagged) -> str:
    if tagged.tag.startswith("!") and tagged.tag[1:] in tags.MATCH_KINDS:
        return (
            f"the tag {tagged.name} (line {tagged.line}) marks a string match, which only the "
            "namespaces, notNamespaces, principals and notPrincipals of a ztunnel local config "
            "policy's matches hold"
        )
    return (
        f"unknown YAML tag {tagged.name} (line {tagged.line}): mesh files are plain YAML but for "
        "the string matches of ztunnel local config policies (!Exact, !Prefix, !Suffix, !Presence)"
    )


def _kubernetes_object(
    doc: dict[str, Any], location: Location, out: _Collected, parsed: Parsed | None = None
) -> None:
    # A chunk of one document keeps the object it was validated into, for the next load.
    single = parsed if parsed is not None and len(parsed.documents) == 1 else None
    kind = doc.get("kind")
    if not isinstance(kind, str) or "apiVersion" not in doc:
        missing = "kind" if not isinstance(kind, str) else "apiVersion"
        out.issues.append(ConfigIssue(location, missing, "required field is missing"))
        return
    model = k8s.MODELS.get(kind)
    if model is None:
        out.warnings.append(f"{location}: kind {kind} is {IGNORED_KINDS_NOTE}")
        return
    resource, issues = validate(doc, model, location)
    if resource is None:
        out.issues.extend(issues)
        return
    if single is not None:
        single.validated(resource, location.resource)
    _collect(resource, location, out)


# Where each kind of object is collected (by exact type).
_GROUPS: dict[type, str] = {
    k8s.Namespace: "namespaces",
    k8s.Pod: "pods",
    k8s.Service: "services",
    k8s.AuthorizationPolicy: "authorization_policies",
    k8s.RequestAuthentication: "request_authentications",
    k8s.Gateway: "gateways",
    k8s.HTTPRoute: "http_routes",
    k8s.WasmPlugin: "wasm_plugins",
    k8s.ConfigMap: "config_maps",
    k8s.Telemetry: "telemetries",
}


def _collect(resource: Any, location: Location, out: _Collected) -> None:
    group = _GROUPS.get(type(resource))
    if group is not None:
        getattr(out, group).append((resource, location))


class _NetworkAddress(tuple[str, Any]):
    """(network, IP): a key compared without formatting the IP (12,000 of them per load of a
    5,000-pod mesh), shown as ``network/ip`` in a message."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(f"{self[0]}/{self[1]}")


def _check_unique(
    items: Iterable[tuple[Any, Location]], what: str, out: _Collected, field_name: str
) -> None:
    seen: dict[Any, Location] = {}
    for key, location in items:
        if key in seen:
            out.issues.append(
                ConfigIssue(
                    location, field_name, f"duplicate {what} {key!r} (first at {seen[key]})"
                )
            )
        else:
            seen[key] = location


def _cross_checks(
    workloads: Sequence[tuple[Workload, Location]],
    services: Sequence[tuple[Service, Location]],
    out: _Collected,
) -> None:
    _check_unique(((w.uid, loc) for w, loc in workloads), "workload uid", out, "uid")
    # Every workload IP, checked unique on the way (an IP hashes in Python: ~1 µs, once each).
    pod_ips: dict[tuple[str, Any], Location] = {}
    for w, loc in workloads:
        for ip in w.ips:
            known = len(pod_ips)
            first = pod_ips.setdefault((w.network, ip), loc)
            if len(pod_ips) == known:
                shown = _NetworkAddress((w.network, ip))
                out.issues.append(
                    ConfigIssue(loc, "IPs", f"duplicate workload IP {shown!r} (first at {first})")
                )
    _check_unique(
        ((_NetworkAddress((net, ip)), loc) for s, loc in services for net, ip in s.vips),
        "service VIP",
        out,
        "VIPs",
    )
    _check_unique(((s.key, loc) for s, loc in services), "service", out, "hostname")
    for s, loc in services:
        for net, ip in s.vips:
            if (net, ip) in pod_ips:
                out.issues.append(
                    ConfigIssue(loc, "VIPs", f"VIP {ip} is also a workload IP ({pod_ips[net, ip]})")
                )


def _bind_waypoints(
    out: _Collected,
    workloads: list[tuple[Workload, Location]],
    services: list[tuple[Service, Location]],
) -> list[Waypoint]:
    """Declare the waypoints and resolve every binding, replacing the raw reference each
    workload and service carries (a Gateway ``ns/name`` from labels, or an address or Service
    from ztunnel's file) by a valid waypoint key, or None."""
    found = waypoints.waypoints_from_gateways(
        [g for g, _ in out.gateways], [w for w, _ in workloads]
    )
    gateway_locations = {id(g): loc for g, loc in out.gateways}
    for gw, field_name, message in found.errors:
        out.issues.append(ConfigIssue(gateway_locations[id(gw)], field_name, message))
    by_key = {w.key: w for w in found.waypoints}
    all_workloads = [w for w, _ in workloads]
    all_services = [s for s, _ in services]

    def resolve(reference: str, kind: str, location: Location) -> str | None:
        if location.resource != LOCAL_CONFIG:
            return waypoints.bind(reference, kind, str(location), by_key, found)
        waypoint = waypoints.local_waypoint(reference, all_workloads, all_services)
        if waypoint is None:
            found.warnings.append(
                f"{location}: waypoint {reference} is not a known address or Service: not bound"
            )
            return None
        return by_key.setdefault(waypoint.key, waypoint).key

    for i, (w, loc) in enumerate(workloads):
        if w.waypoint is not None:
            workloads[i] = (
                dataclasses.replace(w, waypoint=resolve(w.waypoint, "workload", loc)),
                loc,
            )
    for i, (s, loc) in enumerate(services):
        if s.waypoint is not None:
            services[i] = (
                dataclasses.replace(s, waypoint=resolve(s.waypoint, "service", loc)),
                loc,
            )
    out.warnings.extend(found.warnings)
    return list(by_key.values())


def _http_routes(
    out: _Collected, services: Sequence[tuple[Service, Location]], cache: MeshCache | None
) -> list[routes.HttpRoute]:
    """Every HTTPRoute compiled for the waypoint's routing; a parent Service that is not in the
    mesh is a warning (the route waits for it), a route that cannot be compiled an issue."""
    known = {(s.namespace, s.name) for s, _ in services}
    compiled = []
    for resource, loc in out.http_routes:
        try:
            route = _build(
                cache, "http route", (resource,), functools.partial(routes.compile_route, resource)
            )
        except routes.RouteError as e:
            out.issues.append(ConfigIssue(loc, e.field, str(e)))
            continue
        out.warnings.extend(f"{loc}: {w}" for w in route.warnings)
        for p in route.parents:
            if (p.namespace, p.name) not in known:
                out.warnings.append(
                    f"{loc}: parent Service {p.namespace}/{p.name} is not in the mesh"
                )
        compiled.append(route)
    return compiled


def _waypoint_policies(out: _Collected, cache: MeshCache | None) -> list[authz.WaypointPolicy]:
    """The AuthorizationPolicies with targetRefs, compiled for waypoints; one a waypoint cannot
    enforce as written is an issue."""
    compiled = []
    for resource, loc in out.authorization_policies:
        if not (resource.spec.targetRefs or resource.spec.targetRef):
            continue
        try:
            compiled.append(
                _build(
                    cache,
                    "waypoint policy",
                    (resource,),
                    functools.partial(authz.compile_policy, resource),
                )
            )
        except authz.AuthzError as e:
            out.issues.append(ConfigIssue(loc, e.field, str(e)))
    return compiled


def _jwt_rules(out: _Collected, cache: MeshCache | None) -> list[authn.RequestAuthn]:
    """The RequestAuthentications with targetRefs, for waypoints; selector ones are for sidecars
    and ztunnel, which see no HTTP: skipped with a warning."""
    compiled = []
    for resource, loc in out.request_authentications:
        if not (resource.spec.targetRefs or resource.spec.targetRef):
            out.warnings.append(
                f"{loc}: RequestAuthentication {resource.metadata.namespace}/"
                f"{resource.metadata.name} has no targetRefs: only a waypoint sees HTTP, and a "
                "waypoint takes the ones that name it or its Services"
            )
            continue
        try:
            compiled.append(
                _build(
                    cache,
                    "jwt rules",
                    (resource,),
                    functools.partial(authn.compile_authn, resource),
                )
            )
        except authz.AuthzError as e:
            out.issues.append(ConfigIssue(loc, e.field, str(e)))
    return compiled


def _mesh_config(out: _Collected) -> tuple[meshconfig.MeshConfig | None, Location | None]:
    """Istio's mesh config (ConfigMap istio-system/istio, key ``mesh``), if given."""
    found: tuple[meshconfig.MeshConfig | None, Location | None] = (None, None)
    for cm, loc in out.config_maps:
        if (cm.metadata.namespace, cm.metadata.name) != meshconfig.MESH_CONFIGMAP:
            out.warnings.append(
                f"{loc}: ConfigMap {cm.metadata.namespace}/{cm.metadata.name} is not Istio's mesh "
                "config (istio-system/istio): ignored"
            )
            continue
        if "mesh" not in cm.data:
            out.issues.append(ConfigIssue(loc, "data.mesh", "Istio's mesh config has no key mesh"))
            continue
        config, issues = meshconfig.parse(cm.data["mesh"], loc)
        out.issues.extend(issues)
        found = (config, loc)
    return found


def _telemetry(
    out: _Collected, config: meshconfig.MeshConfig | None
) -> list[telemetry_api.TelemetryPolicy]:
    """The Telemetry resources, for waypoints; a selector one is a sidecar's (a warning)."""
    providers = telemetry_api.log_providers(config)
    compiled = []
    for resource, loc in out.telemetries:
        key = f"Telemetry {resource.metadata.namespace}/{resource.metadata.name}"
        if resource.spec.selector is not None:
            out.warnings.append(
                f"{loc}: {key} selects pods: sidecars apply it; ztunnel has no Telemetry, and "
                "a waypoint takes the ones without selector or with targetRefs"
            )
            continue
        try:
            policy, warnings = telemetry_api.compile_telemetry(resource, providers)
        except authz.AuthzError as e:
            out.issues.append(ConfigIssue(loc, e.field, str(e)))
            continue
        out.warnings.extend(f"{loc}: {w}" for w in warnings)
        compiled.append(policy)
    return compiled


def _ext_authz(
    out: _Collected,
    waypoint_policies: Sequence[authz.WaypointPolicy],
    config: meshconfig.MeshConfig | None,
    loc: Location | None,
) -> list[extauthz.ExtAuthzProvider]:
    """The HTTP ext_authz providers CUSTOM policies may name; a name no provider has is a
    warning (its policy denies what it matches)."""
    providers: list[extauthz.ExtAuthzProvider] = []
    if config is not None and loc is not None:
        providers, issues = extauthz.compile_providers(config, loc)
        out.issues.extend(issues)
    names = {p.name for p in providers}
    for p in waypoint_policies:
        if p.provider is not None and p.provider not in names:
            out.warnings.append(
                f"AuthorizationPolicy {p.key}: CUSTOM provider {p.provider!r} is not an "
                "envoyExtAuthzHttp provider of the mesh config (ConfigMap istio-system/istio): "
                "the requests it matches are denied"
            )
    return providers


def _plugins(out: _Collected) -> list[plugins.WaypointPlugin]:
    """The WasmPlugins with targetRefs, as Python filters for waypoints (their files are loaded
    by the waypoint that runs them); selector ones are a sidecar's: skipped with a warning."""
    compiled = []
    for resource, loc in out.wasm_plugins:
        if not (resource.spec.targetRefs or resource.spec.targetRef):
            out.warnings.append(
                f"{loc}: WasmPlugin {resource.metadata.namespace}/{resource.metadata.name} has "
                "no targetRefs: a waypoint takes the ones that name it or its Services"
            )
            continue
        try:
            compiled.append(plugins.compile_plugin(resource, Path(loc.file).resolve().parent))
        except authz.AuthzError as e:
            out.issues.append(ConfigIssue(loc, e.field, str(e)))
    return compiled


def load_mesh(
    paths: Sequence[str | Path],
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    cache: MeshCache | None = None,
) -> Mesh:
    """Read, validate and translate ``paths`` into one snapshot; :class:`ConfigError` lists every
    problem of every file. ``cache``: kept from the last load of the same files (a reload), so
    only what changed is parsed, validated and translated again."""
    if cache is not None:
        cache.begin()
    with _no_cyclic_gc():
        mesh = _load(paths, trust_domain, cache)
    if cache is not None:
        cache.end()  # only after a good load: a refused file leaves the last good cache
    return mesh


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Loading makes many objects and no garbage cycles; a full collection triggered on the way
    walks every object alive, the previous snapshot's too (measured: half of a one-pod reload
    of a 5,000-pod mesh). Reference counting still frees everything at once; cycles wait for
    the next collection after the load."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load(paths: Sequence[str | Path], trust_domain: str, cache: MeshCache | None) -> Mesh:
    out = _Collected()
    for path in map(Path, paths):
        for doc, tagged, location, parsed in _read_documents(path, out, cache):
            _classify(doc, tagged, location, out, parsed)

    _check_unique(
        (
            (f"{kind} {r.metadata.namespace}/{r.metadata.name}", loc)
            for kind, group in (
                ("Pod", out.pods),
                ("Service", out.services),
                ("AuthorizationPolicy", out.authorization_policies),
                ("RequestAuthentication", out.request_authentications),
                ("HTTPRoute", out.http_routes),
                ("WasmPlugin", out.wasm_plugins),
                ("Telemetry", out.telemetries),
            )
            for r, loc in group
        ),
        "object",
        out,
        "metadata.name",
    )
    _check_unique(
        ((ns.metadata.name, loc) for ns, loc in out.namespaces), "namespace", out, "metadata.name"
    )
    namespace_labels = {ns.metadata.name: dict(ns.metadata.labels) for ns, _ in out.namespaces}
    # The Namespace objects themselves: what a cached translation was made from.
    namespace_label_objects = {ns.metadata.name: ns for ns, _ in out.namespaces}

    workloads: list[tuple[Workload, Location]] = []
    for pod, loc in out.pods:
        ns = pod.metadata.namespace or "default"
        if ns not in namespace_labels and out.namespaces:
            out.warnings.append(f"{loc}: namespace {ns!r} is not declared; it has no labels")
        if not translate.pod_ips(pod):
            out.warnings.append(f"{loc}: no status.podIP yet; not a workload until it has one")
            continue
        labels = namespace_labels.get(ns, {})
        try:
            workloads.append(
                (
                    _build(
                        cache,
                        f"workload in {trust_domain}",
                        (pod, namespace_label_objects.get(ns)),
                        functools.partial(translate.workload_from_pod, pod, labels, trust_domain),
                    ),
                    loc,
                )
            )
        except ValueError as e:
            out.issues.append(
                ConfigIssue(
                    loc, f"metadata.annotations[{translate.APP_ADDRESS_ANNOTATION}]", str(e)
                )
            )
    # A Service selects pods of its own namespace only: look in that one, not the whole mesh.
    by_namespace: dict[str, list[Workload]] = {}
    for w, _ in workloads:
        by_namespace.setdefault(w.namespace, []).append(w)
    services: list[tuple[Service, Location]] = []
    for svc, loc in out.services:
        ns = svc.metadata.namespace or "default"
        members = by_namespace.get(ns, [])
        services.append(
            (
                _build(
                    cache,
                    "service",
                    (svc, namespace_label_objects.get(ns), *members),
                    functools.partial(
                        translate.service_from_k8s, svc, members, namespace_labels.get(ns, {})
                    ),
                ),
                loc,
            )
        )
    policies: list[Policy] = []
    waypoint_policies = _waypoint_policies(out, cache)
    jwt_rules = _jwt_rules(out, cache)
    waypoint_plugins = _plugins(out)
    mesh_config, mesh_config_location = _mesh_config(out)
    ext_authz = _ext_authz(out, waypoint_policies, mesh_config, mesh_config_location)
    telemetry = _telemetry(out, mesh_config)
    for resource, loc in out.authorization_policies:
        try:
            converted = _build(
                cache, "policy", (resource,), functools.partial(authorization.convert, resource)
            )
        except authorization.PolicyError as e:
            out.issues.append(ConfigIssue(loc, e.field, str(e)))
            continue
        out.warnings.extend(f"{loc}: {w}" for w in converted.warnings)
        if converted.policy is not None:
            policies.append(converted.policy)
    for config, loc in out.local_configs:
        workloads.extend((translate.workload_from_local(w), loc) for w in config.workloads)
        services.extend(
            (s, loc) for s in translate.services_from_local(config.services, config.workloads)
        )
        policies.extend(translate.policy_from_local(p) for p in config.policies)
    http_routes = _http_routes(out, services, cache)
    all_waypoints = _bind_waypoints(out, workloads, services)
    _cross_checks(workloads, services, out)

    if out.issues:
        raise ConfigError(out.issues)
    namespaces = dict(namespace_labels)
    for w, _ in workloads:
        namespaces.setdefault(w.namespace, {})
    return Mesh(
        workloads=tuple(w for w, _ in workloads),
        services=tuple(s for s, _ in services),
        policies=tuple(policies),
        waypoints=tuple(all_waypoints),
        http_routes=tuple(http_routes),
        waypoint_policies=tuple(waypoint_policies),
        request_authentications=tuple(jwt_rules),
        plugins=tuple(waypoint_plugins),
        ext_authz=tuple(ext_authz),
        telemetry=tuple(telemetry),
        namespaces=MappingProxyType(
            {k: MappingProxyType(v) for k, v in sorted(namespaces.items())}
        ),
        sources=tuple(str(p) for p in paths),
        warnings=tuple(out.warnings),
    )
