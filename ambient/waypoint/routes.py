"""HTTP routing at a waypoint, as Gateway API's GAMMA profile defines it: which rule of which
HTTPRoute attached to a Service a request takes. The readable reference the waypoint's per-request
decision is held to; pure functions over compiled routes and a request head.

- A route is attached to a Service by a ``parentRefs`` entry of kind Service (core group). Routes
  in the Service's namespace apply to every client; routes in another namespace only to clients
  in that namespace. Once a route applies, a request no rule matches is a 404; with none, the
  Service routes to itself (:func:`applies` tells the two apart).
- Inside one match every condition must hold; the matches of a rule are alternatives; a rule with
  no matches matches every path (``PathPrefix /``).
- Paths: ``Exact`` (case-sensitive), ``PathPrefix`` element by element (``/abc`` matches ``/abc``
  and ``/abc/def``, not ``/abcd``; a trailing ``/`` in the prefix is ignored),
  ``RegularExpression`` (the whole path). Header names are case-insensitive; header and query
  values match exactly or by a regular expression on the whole value.
- Precedence across every rule of every applicable route (:func:`precedence`): an Exact path
  first, then the PathPrefix with the most characters, then a method match, then the most header
  matches, then the most query-parameter matches; ties go to the oldest route (creationTimestamp;
  none counts as oldest), then ``namespace/name`` alphabetically, then the rule and match order
  within the route. A RegularExpression path ranks after Exact and before every prefix (Gateway
  API leaves it to the implementation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import kubernetes as k8s

CORE_GROUPS = ("", "core")


class RouteError(ValueError):
    """An HTTPRoute refused: ``field`` is where (``spec.rules[0].filters[1]``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class PathMatch:
    kind: str  # Exact | PathPrefix | RegularExpression
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.kind == "Exact":
            return path == self.value
        if self.kind == "PathPrefix":
            prefix = self.value.rstrip("/")
            return not prefix or path == prefix or path.startswith(prefix + "/")
        assert self.pattern is not None
        return self.pattern.fullmatch(path) is not None


@dataclass(frozen=True)
class ValueMatch:
    """A header (name lower-cased) or query parameter condition."""

    name: str
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, actual: str | None) -> bool:
        if actual is None:
            return False
        if self.pattern is not None:
            return self.pattern.fullmatch(actual) is not None
        return actual == self.value


@dataclass(frozen=True)
class Match:
    path: PathMatch
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True)
class Backend:
    name: str
    namespace: str
    port: int | None
    weight: int


@dataclass(frozen=True)
class Rule:
    matches: tuple[Match, ...]
    backends: tuple[Backend, ...]
    filters: tuple[k8s.HTTPRouteFilter, ...] = ()
    timeouts: k8s.HTTPRouteTimeouts | None = None
    retry: k8s.HTTPRouteRetry | None = None


@dataclass(frozen=True)
class Parent:
    """A Service the route is attached to (``port`` None: every port)."""

    name: str
    namespace: str
    port: int | None


@dataclass(frozen=True)
class HttpRoute:
    namespace: str
    name: str
    created: str  # creationTimestamp as written ("" when absent: counts as oldest)
    parents: tuple[Parent, ...]
    rules: tuple[Rule, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestHead:
    """What routing reads of a request: header names lower-case (a repeated header's values
    joined by ``,``), query parameters by name (the first value counts)."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Selected:
    route: HttpRoute
    rule_index: int
    match_index: int

    @property
    def rule(self) -> Rule:
        return self.route.rules[self.rule_index]


# --- compiling an HTTPRoute ---------------------------------------------------------------------


def _regex(text: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as e:
        raise RouteError(where, f"not a valid regular expression ({e}): {text!r}") from None


def _path(m: k8s.HTTPPathMatch | None, where: str) -> PathMatch:
    if m is None:
        return PathMatch("PathPrefix", "/")
    if m.type == "RegularExpression":
        return PathMatch(m.type, m.value, _regex(m.value, f"{where}.value"))
    if not m.value.startswith("/"):
        raise RouteError(f"{where}.value", f"a {m.type} path starts with '/', got {m.value!r}")
    return PathMatch(m.type, m.value)


def _values(
    items: Iterable[k8s.HTTPHeaderMatch | k8s.HTTPQueryParamMatch], where: str, lower: bool
) -> tuple[ValueMatch, ...]:
    out = []
    seen: set[str] = set()
    for i, m in enumerate(items):
        name = m.name.lower() if lower else m.name
        if name in seen:
            # Gateway API: only the first condition on a name counts; say so rather than ignore.
            raise RouteError(f"{where}[{i}].name", f"{m.name!r} is matched twice in one match")
        seen.add(name)
        pattern = _regex(m.value, f"{where}[{i}].value") if m.type == "RegularExpression" else None
        out.append(ValueMatch(name, m.value, pattern))
    return tuple(out)


def _filters(rule: k8s.HTTPRouteRule, where: str) -> None:
    kinds: list[str] = []
    for i, f in enumerate(rule.filters):
        at = f"{where}.filters[{i}]"
        wanted = k8s.FILTER_FIELDS[f.type]
        present = [name for name in k8s.FILTER_FIELDS.values() if getattr(f, name) is not None]
        if present != [wanted]:
            raise RouteError(
                at, f"a {f.type} filter holds `{wanted}` and no other configuration, got {present}"
            )
        if f.type != "RequestMirror" and f.type in kinds:
            raise RouteError(at, f"{f.type} appears twice in one rule (only RequestMirror may)")
        kinds.append(f.type)
        rewrite = f.requestRedirect or f.urlRewrite
        modifier = rewrite.path if rewrite is not None else None
        if modifier is not None:
            _path_modifier(modifier, rule, f"{at}.{wanted}.path")
    if "RequestRedirect" in kinds and "URLRewrite" in kinds:
        raise RouteError(f"{where}.filters", "RequestRedirect and URLRewrite exclude each other")
    if "RequestRedirect" in kinds and rule.backendRefs:
        raise RouteError(
            f"{where}.backendRefs", "a rule that redirects has no backends (the redirect answers)"
        )


def _path_modifier(m: k8s.HTTPPathModifier, rule: k8s.HTTPRouteRule, where: str) -> None:
    full, prefix = m.replaceFullPath, m.replacePrefixMatch
    if m.type == "ReplaceFullPath" and (full is None or prefix is not None):
        raise RouteError(where, "ReplaceFullPath takes replaceFullPath (only)")
    if m.type == "ReplacePrefixMatch":
        if prefix is None or full is not None:
            raise RouteError(where, "ReplacePrefixMatch takes replacePrefixMatch (only)")
        if any(x.path is not None and x.path.type != "PathPrefix" for x in rule.matches):
            raise RouteError(where, "ReplacePrefixMatch needs the rule's paths to be PathPrefix")


def compile_route(route: k8s.HTTPRoute) -> HttpRoute:
    """The route as routing reads it; :class:`RouteError` naming the field when it cannot be."""
    namespace = route.metadata.namespace
    parents, warnings = [], []
    for i, ref in enumerate(route.spec.parentRefs):
        if ref.kind == "Service" and ref.group in CORE_GROUPS:
            parents.append(Parent(ref.name, ref.namespace or namespace, ref.port))
        else:
            warnings.append(
                f"spec.parentRefs[{i}]: {ref.kind} {ref.name}: a waypoint takes routes attached "
                'to a Service (kind Service, group ""); this parent is not used'
            )
    rules = []
    for r, rule in enumerate(route.spec.rules):
        where = f"spec.rules[{r}]"
        _filters(rule, where)
        matches = tuple(
            Match(
                _path(m.path, f"{where}.matches[{i}].path"),
                _values(m.headers, f"{where}.matches[{i}].headers", lower=True),
                _values(m.queryParams, f"{where}.matches[{i}].queryParams", lower=False),
                m.method,
            )
            for i, m in enumerate(rule.matches)
        ) or (Match(PathMatch("PathPrefix", "/")),)
        backends = []
        for b, backend in enumerate(rule.backendRefs):
            if backend.kind != "Service" or backend.group not in CORE_GROUPS:
                got = f"{backend.kind} {backend.name}"
                raise RouteError(f"{where}.backendRefs[{b}]", f"a backend is a Service, got {got}")
            backends.append(
                Backend(backend.name, backend.namespace or namespace, backend.port, backend.weight)
            )
        rules.append(Rule(matches, tuple(backends), tuple(rule.filters), rule.timeouts, rule.retry))
    return HttpRoute(
        namespace,
        route.metadata.name,
        route.metadata.creationTimestamp or "",
        tuple(parents),
        tuple(rules),
        tuple(warnings),
    )


# --- choosing a rule ----------------------------------------------------------------------------


def applies(route: HttpRoute, service: tuple[str, str], port: int, client_namespace: str) -> bool:
    """Whether ``route`` routes a request to Service ``(namespace, name)`` on ``port`` from a
    client in ``client_namespace``."""
    namespace, name = service
    attached = any(
        p.name == name and p.namespace == namespace and p.port in (None, port)
        for p in route.parents
    )
    return attached and route.namespace in (namespace, client_namespace)


def _matches(m: Match, head: RequestHead) -> bool:
    if m.method is not None and head.method != m.method:
        return False
    if not m.path.matches(head.path):
        return False
    if not all(h.matches(head.headers.get(h.name)) for h in m.headers):
        return False
    return all(q.matches(next(iter(head.query.get(q.name, ())), None)) for q in m.query)


def precedence(route: HttpRoute, rule_index: int, match_index: int) -> tuple[Any, ...]:
    """Sort key: the first candidate after sorting is the one taken (see the module's text)."""
    m = route.rules[rule_index].matches[match_index]
    kind = m.path.kind
    return (
        {"Exact": 0, "RegularExpression": 1, "PathPrefix": 2}[kind],
        -len(m.path.value.rstrip("/") or "/") if kind == "PathPrefix" else 0,
        m.method is None,
        -len(m.headers),
        -len(m.query),
        route.created,
        f"{route.namespace}/{route.name}",
        rule_index,
        match_index,
    )


def select(routes: Iterable[HttpRoute], head: RequestHead) -> Selected | None:
    """The rule ``head`` takes among ``routes`` (those that apply: :func:`applies`), or None
    when none matches (a 404 when any route applies)."""
    best: tuple[tuple[Any, ...], Selected] | None = None
    for route in routes:
        for r, rule in enumerate(route.rules):
            for i, m in enumerate(rule.matches):
                if _matches(m, head):
                    key = precedence(route, r, i)
                    if best is None or key < best[0]:
                        best = (key, Selected(route, r, i))
    return best[1] if best is not None else None
