"""Validating a document into a config model (msgspec), and the field types the models share,
each with one clear error message.

msgspec, rather than pydantic, because a running ztunnel keeps its config layer imported (it
reloads): msgspec costs it ~1.5 MiB resident where pydantic's schemas cost ~14, and a validated
struct is a fraction of a validated pydantic object (holding the 5,000-pod mesh: 80.6 -> 54.0
MiB, benchmarks/README.md). A type msgspec has no validator for is a *custom* type,
decoded by the function registered for it in :data:`DECODERS`; msgspec allows one custom type in
a union (besides ``None``), so a field that is "an IP or a keyword" has a type of its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

if TYPE_CHECKING:
    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
    IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
else:
    # To msgspec, the common base classes of the v4 and v6 types: one custom type for "any IP"
    # (the union would be two, and a union may hold one). Every value is of the union.
    IPAddress = ipaddress._BaseAddress
    IPNetwork = ipaddress._BaseNetwork

DECODERS: dict[type, Callable[[Any], Any]] = {}

T = TypeVar("T")


def decoder(cls: Any) -> Callable[[Callable[[Any], T]], Callable[[Any], T]]:
    """Register the function that turns a document's value into a ``cls`` (or raises
    ``ValueError`` saying what was expected)."""

    def register(fn: Callable[[Any], T]) -> Callable[[Any], T]:
        DECODERS[cls] = fn
        return fn

    return register


def _decode(cls: type, value: Any) -> Any:
    fn = DECODERS.get(cls)
    if fn is None:
        # msgspec's dec_hook protocol: NotImplementedError means "not a type this hook
        # decodes", and msgspec reports the value as of an unsupported type. Only reachable
        # if a model names a custom type no @decoder registered: a bug here, not user input.
        raise NotImplementedError(f"no decoder for {cls.__name__}")
    return fn(value)


def convert(doc: Any, model: type[T]) -> T:
    """``doc`` (plain YAML values) as a ``model``; ``msgspec.ValidationError`` otherwise, which
    :func:`ambient.config.errors.issues_from_validation` turns into issues naming the field."""
    return msgspec.convert(doc, model, dec_hook=_decode)


def validator(model: Any) -> Callable[[Any], Any]:
    """``convert`` for one type (a model, or any annotation such as ``dict[str, Port]``)."""
    return lambda value: msgspec.convert(value, model, dec_hook=_decode)


@decoder(IPAddress)
def ip_address(value: object) -> IPAddress:
    if not isinstance(value, str):
        raise ValueError(f"expected an IP address as a string, got {type(value).__name__}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"expected an IPv4 or IPv6 address, got {value!r}") from None


@decoder(IPNetwork)
def ip_network(value: object) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f"expected an address or CIDR block as a string, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"expected an IP address or CIDR block, got {value!r}") from None
