# cython: language_level=3
"""The per-stream request an HBONE server's decision sees — compiled.

The data plane's per-stream path: the core calls an :class:`InboundDispatcher` for every CONNECT
stream, which builds a :class:`StreamRequest` and asks the user's decision. Same API and results as
the pure-Python reference :mod:`ambient.hbone_request`; the shared test suite holds them together.
"""

from urllib.parse import unquote

from ambient._core import Allow, Deny


cdef class SpiffeParts:
    """(trust_domain, namespace, service_account) of an Istio SPIFFE ID; compares equal to the
    reference implementation's NamedTuple."""

    def __init__(self, str trust_domain, str namespace, str service_account):
        self.trust_domain = trust_domain
        self.namespace = namespace
        self.service_account = service_account

    def _tuple(self):
        return (self.trust_domain, self.namespace, self.service_account)

    def __iter__(self):
        return iter(self._tuple())

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return self._tuple()[i]

    def __eq__(self, other):
        try:
            return self._tuple() == tuple(other)
        except TypeError:
            return NotImplemented

    def __hash__(self):
        return hash(self._tuple())

    def __repr__(self):
        return (f"SpiffeParts(trust_domain={self.trust_domain!r}, namespace={self.namespace!r}, "
                f"service_account={self.service_account!r})")


cpdef SpiffeParts split_spiffe(object identity):
    """The parts of an Istio-shaped SPIFFE ID, or None when it is not one."""
    cdef str s
    cdef list parts
    if identity is None:
        return None
    s = <str>identity
    if not s.startswith("spiffe://"):
        return None
    parts = s[9:].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        return None
    if not parts[0] or not parts[2] or not parts[4]:
        return None
    return SpiffeParts(parts[0], parts[2], parts[4])


cpdef tuple split_host_port(str authority):
    """``ip:port`` or ``[ipv6]:port`` → (host, port); ValueError naming the authority otherwise."""
    cdef Py_ssize_t i = authority.rfind(":")
    cdef str host, port
    cdef long number
    if i <= 0:
        raise ValueError(f"authority {authority!r}: expected host:port")
    host = authority[:i]
    port = authority[i + 1:]
    if not port or not port.isdigit():
        raise ValueError(f"authority {authority!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"authority {authority!r}: port out of range 1-65535")
    return (host, number)


cdef str _unquote_value(str value):
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[len(value) - 1] == '"':
        return value[1:len(value) - 1].replace('\\"', '"').replace("\\\\", "\\")
    return value


cdef list _split_outside_quotes(str text, Py_UCS4 sep):
    cdef list out = []
    cdef Py_ssize_t start = 0, i = 0, n = len(text)
    cdef bint quoted = False
    cdef Py_UCS4 c
    while i < n:
        c = text[i]
        if c == u'\\' and quoted:
            i += 2
            continue
        if c == u'"':
            quoted = not quoted
        elif c == sep and not quoted:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return [part for part in out if part.strip()]


cpdef list parse_forwarded(str value):
    """RFC 7239 ``Forwarded``: one dict per hop, parameter names lower-cased, quotes removed;
    malformed pairs are skipped."""
    cdef list hops = []
    cdef dict hop
    cdef str element, pair, name, raw
    cdef Py_ssize_t eq
    for element in _split_outside_quotes(value, u','):
        hop = {}
        for pair in _split_outside_quotes(element, u';'):
            eq = pair.find("=")
            if eq < 0:
                continue
            name = pair[:eq].strip().lower()
            if name:
                hop[name] = _unquote_value(pair[eq + 1:])
        if hop:
            hops.append(hop)
    return hops


cpdef dict parse_baggage(str value):
    """W3C ``baggage``: ``key=value`` members; properties dropped; values percent-decoded."""
    cdef dict out = {}
    cdef str member, entry, key, raw
    cdef Py_ssize_t semi, eq
    for member in value.split(","):
        semi = member.find(";")
        entry = member if semi < 0 else member[:semi]
        eq = entry.find("=")
        if eq < 0:
            continue
        key = entry[:eq].strip()
        if key:
            raw = entry[eq + 1:].strip()
            out[key] = unquote(raw) if "%" in raw else raw
    return out


cdef class StreamRequest:
    """One CONNECT stream as the decision sees it: who is asking (``peer_identity``, None for no
    identity), for what (``authority``), from where (``peer_address``), with which headers."""

    def __init__(self, peer_identity, str authority, str peer_address, tuple headers):
        self.peer_identity = peer_identity
        self.authority = authority
        self.peer_address = peer_address
        self.headers = headers
        self._baggage = None

    cpdef object header(self, str name):
        """The first value of header ``name`` (HTTP/2 header names are lower case)."""
        cdef tuple pair
        name = name.lower()
        for pair in self.headers:
            if pair[0] == name:
                return pair[1]
        return None

    @property
    def destination(self):
        return split_host_port(self.authority)

    @property
    def peer(self):
        return split_spiffe(self.peer_identity)

    @property
    def forwarded_for(self):
        """The original client address the sending proxy declared (first hop's ``for``)."""
        value = self.header("forwarded")
        if value is None:
            return None
        for hop in parse_forwarded(value):
            if "for" in hop:
                return hop["for"]
        return None

    @property
    def baggage(self):
        if self._baggage is None:
            value = self.header("baggage")
            self._baggage = parse_baggage(value) if value else {}
        return self._baggage

    def __repr__(self):
        return (f"StreamRequest(peer_identity={self.peer_identity!r}, "
                f"authority={self.authority!r}, peer_address={self.peer_address!r})")


cdef class InboundDispatcher:
    """Adapts a decision function over :class:`StreamRequest` to the core's per-stream callback
    ``(peer_identity, authority, peer_address, headers) -> Allow | Deny``."""

    def __init__(self, decide):
        self.decide = decide

    def __call__(self, peer_identity, str authority, str peer_address, tuple headers):
        verdict = self.decide(StreamRequest(peer_identity, authority, peer_address, headers))
        if type(verdict) is Allow or type(verdict) is Deny:
            return verdict
        raise TypeError(
            f"decision {self.decide!r} returned {type(verdict).__name__}; expected Allow or Deny"
        )
