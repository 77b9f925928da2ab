"""Field types shared by the config models, each with one clear error message."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import PlainSerializer, PlainValidator

IPAddressValue = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetworkValue = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(value: object) -> IPAddressValue:
    if isinstance(value, IPAddressValue):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an IP address as a string, got {type(value).__name__}")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"expected an IPv4 or IPv6 address, got {value!r}") from None


def _network(value: object) -> IPNetworkValue:
    if not isinstance(value, str):
        raise ValueError(f"expected an address or CIDR block as a string, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"expected an IP address or CIDR block, got {value!r}") from None


IPAddress = Annotated[IPAddressValue, PlainValidator(_ip), PlainSerializer(str)]
IPNetwork = Annotated[IPNetworkValue, PlainValidator(_network), PlainSerializer(str)]
