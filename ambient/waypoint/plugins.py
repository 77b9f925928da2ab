"""Python filters at a waypoint: ambient's counterpart to Istio's WasmPlugin.

A ``WasmPlugin`` (``extensions.istio.io/v1alpha1``) whose ``url`` is ``file://…py`` names a
Python file and ``pluginName`` the class in it (see :mod:`ambient.filters` for what the class
sees). ``file:///abs/path.py`` is absolute; ``file://filters/x.py`` is relative to the directory
of the mesh file that declares the plugin. Which requests: those sent to the Gateway or Service
its ``targetRefs`` name (as for AuthorizationPolicy), on ``match[].ports`` if given. Where in
the chain (Istio's phases): ``AUTHN`` before JWT authentication, ``AUTHZ`` between
authentication and authorization, ``STATS`` after authorization, then the unspecified phase,
all before routing; within a phase the higher ``priority`` first, then ``namespace/name``.

The core calls :meth:`PluginHost.on_request` (and ``on_response``) on its filter threads,
bounding each call by the plugin's budget (annotation ``ambient.dev/filter-budget``, default
100ms) and applying ``failStrategy`` when a call raises, overruns it, or has too many calls
still running: ``FAIL_CLOSE`` (default) answers 500, ``FAIL_OPEN`` skips the filter.

Files are watched: a file whose content changes is loaded again and its new instance takes the
next requests (calls already running finish on the old one), with no restart and no failed
request. A file that does not load (missing, a syntax error, a raising ``__init__``) is
reported with its path and line; the last good version keeps serving, and a plugin with no good
version fails its requests by its ``failStrategy``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import kubernetes as k8s
from ..filters import Headers, Reply, Request, Response

# The module, not its names: config imports this module while authz may still be loading.
from . import authz

log = logging.getLogger(__name__)

BUDGET_ANNOTATION = "ambient.dev/filter-budget"
DEFAULT_BUDGET = 0.1
# How often the files are looked at for a change.
DEFAULT_POLL = 0.5
# Istio's phases, in the order they run; the unspecified phase runs last, in the core's STATS
# slot (after authorization, before routing).
PHASES = ("AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE")


class FilterUnavailable(Exception):
    """A plugin with no version that loaded: its requests get its fail strategy."""


@dataclass(frozen=True)
class WaypointPlugin:
    namespace: str
    name: str
    targets: tuple[authz.Target, ...]
    path: str  # absolute
    class_name: str  # "" = the file's one Filter class
    phase: str
    priority: int
    config: dict[str, Any]
    fail_open: bool
    budget: float
    ports: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _budget(text: str) -> float:
    units = (("ms", 0.001), ("s", 1.0))
    for unit, scale in units:
        number = text[: -len(unit)]
        if text.endswith(unit) and number.replace(".", "", 1).isdigit():
            value = float(number) * scale
            if value > 0:
                return value
    raise authz.AuthzError(
        f"metadata.annotations[{BUDGET_ANNOTATION}]",
        f"expected a duration above zero such as 50ms or 1s, got {text!r}",
    )


def compile_plugin(resource: k8s.WasmPlugin, directory: Path) -> WaypointPlugin:
    """A WasmPlugin with targetRefs; :class:`AuthzError` names the field it cannot take.
    ``directory``: where a relative ``file://`` path starts (the mesh file's)."""
    spec, meta = resource.spec, resource.metadata
    if not spec.url.startswith("file://") or not spec.url.endswith(".py"):
        raise authz.AuthzError(
            "spec.url",
            f"expected a Python file, file:///abs/path.py or file://relative/path.py (from the "
            f"mesh file's directory): ambient runs Python filters, not Wasm modules; got "
            f"{spec.url!r}",
        )
    if spec.type == "NETWORK":
        raise authz.AuthzError("spec.type", "a Python filter sees HTTP requests: use HTTP")
    path = Path(spec.url.removeprefix("file://"))
    if not path.is_absolute():
        path = directory / path
    if spec.pluginName and not spec.pluginName.isidentifier():
        raise authz.AuthzError(
            "spec.pluginName", f"expected the filter's class name, got {spec.pluginName!r}"
        )
    budget = meta.annotations.get(BUDGET_ANNOTATION)
    return WaypointPlugin(
        namespace=meta.namespace,
        name=meta.name,
        targets=authz.targets_of(resource),
        path=str(path),
        class_name=spec.pluginName,
        phase=spec.phase,
        priority=spec.priority or 0,
        config=dict(spec.pluginConfig),
        fail_open=spec.failStrategy == "FAIL_OPEN",
        budget=_budget(budget) if budget is not None else DEFAULT_BUDGET,
        ports=tuple(sorted({p.number for m in spec.match for p in m.ports})),
    )


def ordered(plugins: Sequence[WaypointPlugin]) -> list[WaypointPlugin]:
    """In the order they run: by phase, higher priority first, then by name."""
    return sorted(plugins, key=lambda p: (PHASES.index(p.phase), -p.priority, p.key))


@dataclass
class _Loaded:
    plugin: WaypointPlugin
    instance: Any = None
    error: str | None = None
    digest: bytes | None = None  # of the content last tried
    stat: tuple[int, int] | None = None  # (mtime_ns, size) when last read
    loads: int = 0
    calls: int = 0

    @property
    def on_response(self) -> bool:
        return self.instance is not None and callable(getattr(self.instance, "on_response", None))

    @property
    def body_limit(self) -> int:
        limit = getattr(self.instance, "request_body_limit", 0) if self.instance else 0
        return limit if isinstance(limit, int) and limit > 0 else 0


def _load(plugin: WaypointPlugin, source: bytes) -> Any:
    """An instance of the plugin's class from ``source``; raises ValueError saying what failed."""
    path = plugin.path
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    module = types.ModuleType(f"ambient_filter_{plugin.namespace}_{plugin.name}".replace("-", "_"))
    module.__file__ = path
    # Registered while it runs: what the file defines may look itself up there (dataclasses,
    # pickle); a reload replaces it.
    previous = sys.modules.get(module.__name__)
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)  # the user's filter file, named by the mesh
    except Exception as e:
        if previous is not None:
            sys.modules[module.__name__] = previous
        raise ValueError(f"{path}: running the file raised {type(e).__name__}: {e}") from e
    if plugin.class_name:
        cls = module.__dict__.get(plugin.class_name)
        if not isinstance(cls, type):
            raise ValueError(f"{path}: no class {plugin.class_name!r} (spec.pluginName)")
    else:
        from ..filters import Filter

        found = [
            v
            for v in module.__dict__.values()
            if isinstance(v, type)
            and issubclass(v, Filter)
            and v is not Filter
            and v.__module__ == module.__name__
        ]
        if len(found) != 1:
            raise ValueError(
                f"{path}: {len(found)} Filter classes; name the one to use in spec.pluginName"
            )
        cls = found[0]
    if not callable(getattr(cls, "on_request", None)):
        raise ValueError(f"{path}: class {cls.__name__} has no on_request(request)")
    try:
        return cls(plugin.config)
    except Exception as e:
        raise ValueError(
            f"{path}: {cls.__name__}(pluginConfig) raised {type(e).__name__}: {e}"
        ) from e


class PluginHost:
    """The waypoint's Python filters: loads them, reloads a file that changed, and runs them when
    the core asks. ``changed``: called when a reload changes what the table says of a filter
    (whether it looks at responses, how much body it reads)."""

    def __init__(self, changed: Callable[[], None], poll: float = DEFAULT_POLL) -> None:
        self._changed = changed
        self._poll = poll
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- configuration -------------------------------------------------------------------

    def update(self, plugins: Sequence[WaypointPlugin]) -> None:
        """Serve these plugins from now on: a new or changed one is loaded, a gone one dropped."""
        with self._lock:
            loaded = {}
            for plugin in plugins:
                current = self._loaded.get(plugin.key)
                if current is not None and current.plugin == plugin:
                    loaded[plugin.key] = current
                    continue
                entry = _Loaded(plugin)
                self._refresh(entry)
                loaded[plugin.key] = entry
            self._loaded = loaded
        if plugins and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="filter-watch", daemon=True)
            self._thread.start()

    def capabilities(self, key: str) -> tuple[bool, int]:
        """(looks at responses, body bytes it reads) for the table."""
        entry = self._loaded.get(key)
        return (entry.on_response, entry.body_limit) if entry else (False, 0)

    def status(self) -> dict[str, dict[str, Any]]:
        """Each plugin's file, version and error, for ``config_dump``."""
        return {
            key: {
                "path": e.plugin.path,
                "loaded": e.instance is not None,
                "loads": e.loads,
                "calls": e.calls,
                "error": e.error,
            }
            for key, e in self._loaded.items()
        }

    def _refresh(self, entry: _Loaded) -> bool:
        """Load ``entry``'s file again if its content changed; True if what it serves changed."""
        path = entry.plugin.path
        try:
            st = Path(path).stat()
            stat = (st.st_mtime_ns, st.st_size)
            if stat == entry.stat:
                return False
            source = Path(path).read_bytes()
        except OSError as e:
            error = f"{path}: cannot read the filter: {e.strerror or e}"
            if error != entry.error:
                log.error("filter %s: %s", entry.plugin.key, error)
                entry.error = error
            entry.stat = None
            return False
        entry.stat = stat
        digest = hashlib.sha256(source).digest()
        if digest == entry.digest:
            return False
        entry.digest = digest
        before = (entry.on_response, entry.body_limit)
        try:
            instance = _load(entry.plugin, source)
        except ValueError as e:
            entry.error = str(e)
            kept = "the last good version keeps serving" if entry.instance else "not serving"
            log.error("filter %s: %s (%s)", entry.plugin.key, e, kept)
            return False
        entry.instance, entry.error = instance, None
        entry.loads += 1
        if entry.loads > 1:
            log.info("filter %s: reloaded %s", entry.plugin.key, path)
        return (entry.on_response, entry.body_limit) != before

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            with self._lock:
                changed = [e for e in self._loaded.values() if self._refresh(e)]
            if changed:
                self._changed()

    def stop(self) -> None:
        self._stop.set()

    # --- per request (called by the core, on its filter threads) -------------------------

    def on_request(
        self,
        name: str,
        method: str,
        path: str,
        authority: str,
        headers: list[tuple[str, str]],
        source_principal: str,
        source_ip: str,
        destination: str,
        service: str,
        request_principal: str | None,
        body: bytes | None,
    ) -> tuple[Any, ...]:
        entry = self._loaded.get(name)
        if entry is None or entry.instance is None:
            why = entry.error if entry else "not configured"
            raise FilterUnavailable(f"filter {name} is not loaded: {why}")
        instance = entry.instance
        entry.calls += 1
        request = Request(
            method=method,
            path=path,
            authority=authority,
            headers=Headers(headers),
            source_principal=source_principal,
            source_ip=source_ip,
            destination=destination,
            service=service,
            request_principal=request_principal,
            body=body,
        )
        reply = instance.on_request(request)
        if isinstance(reply, Reply):
            return ("respond", reply.status, reply.body, list(reply.headers))
        if reply is not None:
            raise TypeError(
                f"on_request returned {type(reply).__name__}: expected None (go on) or "
                "ambient.filters.respond(...)"
            )
        return (
            "continue",
            request.headers.items() if request.headers.changed else None,
            request.path if request.path != path else None,
            (instance, request) if callable(getattr(instance, "on_response", None)) else None,
        )

    def on_response(
        self, name: str, state: tuple[Any, Request], status: int, headers: list[tuple[str, str]]
    ) -> list[tuple[str, str]] | None:
        instance, request = state
        response = Response(status, Headers(headers))
        instance.on_response(request, response)
        return response.headers.items() if response.headers.changed else None


@dataclass
class PluginsJson:
    """The plugins of one table: each compiled once, referred to by index."""

    compiled: list[dict[str, Any]] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)


def plugins_of(
    mesh_plugins: Sequence[WaypointPlugin],
    waypoint: str,
    service: str | None,
    out: PluginsJson,
    host: PluginHost | None,
) -> list[int]:
    """Indices of the plugins that apply to ``service`` (None: traffic sent to pods), in the order
    they run, adding each to ``out`` once."""
    indices = []
    for p in ordered([p for p in mesh_plugins if authz.applies(p, waypoint, service)]):
        if p.key not in out.index:
            on_response, body_limit = host.capabilities(p.key) if host else (False, 0)
            out.index[p.key] = len(out.compiled)
            out.compiled.append(
                {
                    "name": p.key,
                    # The unspecified phase runs in the STATS slot, after the STATS plugins.
                    "phase": "STATS" if p.phase == "UNSPECIFIED_PHASE" else p.phase,
                    "fail_open": p.fail_open,
                    "budget": p.budget,
                    "ports": list(p.ports),
                    "on_response": on_response,
                    "body_limit": body_limit,
                }
            )
        indices.append(out.index[p.key])
    return indices
