"""What a Python filter is written against: ambient's counterpart to Istio's WasmPlugin.

A filter is a class in a ``.py`` file that a ``WasmPlugin`` names (``url: file://…py``,
``pluginName``: the class). The waypoint makes one instance per file version with the plugin's
``pluginConfig`` and calls it for every request sent to the Gateway or Service its
``targetRefs`` name::

    from ambient.filters import Filter, respond

    class Canary(Filter):
        def on_request(self, request):
            if request.headers.get("x-user", "").endswith("@example.com"):
                request.headers["x-canary"] = "true"    # an HTTPRoute matches on it
            return None                                # go on

``on_request(request)`` sees the request head (:class:`Request`): it may change
``request.headers`` and ``request.path`` (the request goes on with them) or return
:func:`respond` to answer the request itself. It sees the body only if the class sets
``request_body_limit`` (bytes; a larger body is refused with 413 before the filter runs).
A class that defines ``on_response(request, response)`` also sees the response head
(:class:`Response`) and may change its headers.

Calls run on the core's filter threads, several at a time: state shared between requests (a
counter, a token bucket) needs a lock. A call that raises or takes longer than the filter's
budget (annotation ``ambient.dev/filter-budget``, default 100ms) gets the plugin's
``failStrategy``: ``FAIL_CLOSE`` (the default) answers 500, ``FAIL_OPEN`` goes on without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


class Headers:
    """HTTP headers: names compared without case, a name may repeat. ``headers[name]`` is the
    first value; assignment replaces every value of the name; :meth:`add` appends one."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items = [(n.lower(), v) for n, v in items]
        self.changed = False

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((v for n, v in self._items if n == name), default)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self._items if n == name]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __setitem__(self, name: str, value: str) -> None:
        self.remove(name)
        self.add(name, value)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.remove(name)

    def add(self, name: str, value: str) -> None:
        self._items.append((name.lower(), str(value)))
        self.changed = True

    def remove(self, name: str) -> None:
        name = name.lower()
        kept = [(n, v) for n, v in self._items if n != name]
        if len(kept) != len(self._items):
            self._items = kept
            self.changed = True

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(n for n, _ in self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass
class Request:
    """A request at the waypoint, as a filter sees it (the path already normalized)."""

    method: str
    path: str  # with its query
    authority: str
    headers: Headers
    source_principal: str  # the client's SPIFFE identity ("" without one)
    source_ip: str
    destination: str  # the Service VIP (or pod IP) and port the client asked for
    service: str  # namespace/name of that Service ("" for a pod)
    request_principal: str | None = None  # iss/sub of a verified JWT (after the AUTHN phase)
    body: bytes | None = None  # only for a filter with request_body_limit
    # Room for the filter's own notes between on_request and on_response.
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Response:
    """A response head on its way back to the client."""

    status: int
    headers: Headers


@dataclass(frozen=True)
class Reply:
    """A filter's own answer to a request (made by :func:`respond`)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


def respond(
    status: int, body: str | bytes = b"", headers: Mapping[str, str] | None = None
) -> Reply:
    """Answer the request with ``status`` (200 to 599) and a small ``body``: it goes no further."""
    if not 200 <= status <= 599:
        raise ValueError(f"a filter answers with a status from 200 to 599, not {status}")
    data = body.encode() if isinstance(body, str) else bytes(body)
    pairs = [(k.lower(), str(v)) for k, v in (headers or {}).items()]
    if not any(k == "content-type" for k, _ in pairs):
        pairs.append(("content-type", "text/plain"))
    return Reply(status, data, tuple(pairs))


class Filter:
    """A base for filters (not required: any class with ``on_request`` will do)."""

    # Bytes of request body the filter reads (0: it never sees the body).
    request_body_limit: int = 0

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def on_request(self, request: Request) -> Reply | None:
        return None
