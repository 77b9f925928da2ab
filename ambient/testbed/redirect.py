"""istio-cni's in-pod traffic redirection, for a pod netns of the testbed.

In ambient mode the node's ztunnel opens its listeners *inside* each in-mesh pod's netns, and
istio-cni installs rules there that send the pod's TCP to them: what the pod's applications open
goes to the outbound listener, what arrives for them in plaintext goes to the inbound one, and
HBONE (already mTLS, to port 15008) goes straight to ztunnel. ztunnel marks its own sockets so
the rules leave its traffic alone, and a connection mark plus a policy route bring the
application's replies back to ztunnel's transparent sockets.

The rules are written here from those facts (this is not Istio's code), in chains of their own
installed atomically by ``iptables-restore --noflush``; :func:`remove` undoes them exactly, so a
benchmark can compare a captured pod with the same pod uncaptured.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import netns as _netns
from .errors import TestbedError

# ztunnel sets this mark (SO_MARK) on its own sockets: their packets must never be captured again.
PROXY_MARK = 0x539
# Connections ztunnel made to the application from a client's IP carry this connmark, so the
# application's replies (to an address not in the pod) are routed back to ztunnel.
CONNMARK = 0x111
# Only the low 12 bits are istio-cni's; other software may use the rest of the mark.
MARK_MASK = 0xFFF
# ztunnel's outbound listener in the pod: every TCP connection the pod's applications open.
OUTBOUND_PORT = 15001
# ztunnel's inbound plaintext listener: TCP arriving for the pod from outside the mesh.
INBOUND_PLAINTEXT_PORT = 15006
# ztunnel's HBONE listener: mesh traffic, mTLS already, arrives addressed to it and is left as is.
HBONE_PORT = 15008
# istio-cni makes kubelet's health probes come from this address; they must reach the app as is.
KUBELET_PROBE_IP = "169.254.7.127"
# Where the replies to ztunnel's transparent connections are routed: the whole IPv4 space is
# local in this table, so they are delivered (through lo) to ztunnel's socket.
ROUTE_TABLE = 100
# The policy rule's priority: ahead of the main table (32766), as istio-cni sets it.
RULE_PREF = 32764

PRERT_CHAIN = "ISTIO_PRERT"
OUTPUT_CHAIN = "ISTIO_OUTPUT"
_TABLES = ("mangle", "nat")
_JUMPS = (("PREROUTING", PRERT_CHAIN), ("OUTPUT", OUTPUT_CHAIN))

_PROXY = f"{PROXY_MARK:#x}/{MARK_MASK:#x}"
_CONN = f"{CONNMARK:#x}/{MARK_MASK:#x}"
_RULES = {
    "mangle": (
        # ztunnel's packets to the app (over lo, so they come back in through PREROUTING) mark
        # their connection...
        f"-A {PRERT_CHAIN} -m mark --mark {_PROXY} -j CONNMARK --set-xmark {_CONN}",
        # ...and the app's replies get the connection's mark back, so policy routing sends them
        # to ztunnel rather than out of the pod towards the client's IP.
        f"-A {OUTPUT_CHAIN} -m connmark --mark {_CONN} -j CONNMARK --restore-mark",
    ),
    "nat": (
        f"-A {PRERT_CHAIN} -s {KUBELET_PROBE_IP}/32 -j ACCEPT",
        f"-A {PRERT_CHAIN} ! -d 127.0.0.1/32 -p tcp ! --dport {HBONE_PORT} "
        f"-m mark ! --mark {_PROXY} -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}",
        f"-A {OUTPUT_CHAIN} -d {KUBELET_PROBE_IP}/32 -j ACCEPT",
        f"-A {OUTPUT_CHAIN} -m mark --mark {_CONN} -j ACCEPT",
        # To the pod's own addresses (they route over lo): the pod talking to itself, and
        # ztunnel delivering to the app.
        f"-A {OUTPUT_CHAIN} ! -d 127.0.0.1/32 -o lo -j ACCEPT",
        f"-A {OUTPUT_CHAIN} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {_PROXY} "
        f"-j REDIRECT --to-ports {OUTBOUND_PORT}",
    ),
}
_RULE_ARGS = ["fwmark", _CONN, "pref", str(RULE_PREF), "lookup", str(ROUTE_TABLE)]
_ROUTE_ARGS = ["local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)]


@dataclass(frozen=True, slots=True)
class _State:
    """Which pieces of the redirection a netns has."""

    chains: frozenset[tuple[str, str]]  # (table, chain) of ours that exist
    jumps: dict[tuple[str, str], int]  # (table, builtin chain) -> jumps to our chain in it
    rule: bool
    route: bool

    @property
    def complete(self) -> bool:
        return (
            all((t, c) in self.chains for t in _TABLES for _, c in _JUMPS)
            and all(self.jumps.get((t, b), 0) == 1 for t in _TABLES for b, _ in _JUMPS)
            and self.rule
            and self.route
        )


def install(netns: str) -> None:
    """Install the redirection in ``netns``; idempotent, and it repairs a partial install."""
    state = _state(netns)
    if state.complete:
        return
    # Routing first: once the rules capture, replies to ztunnel's transparent connections must
    # already have their way back.
    ip = [] if state.rule else [" ".join(["rule", "add", *_RULE_ARGS])]
    ip.append(" ".join(["route", "replace", *_ROUTE_ARGS]))
    _netns.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(ip) + "\n")
    lines: list[str] = []
    for table in _TABLES:
        lines.append(f"*{table}")
        # With --noflush, declaring a chain creates it, or empties it if it exists.
        lines += [f":{chain} - [0:0]" for _, chain in _JUMPS]
        for builtin, chain in _JUMPS:
            lines += [f"-D {builtin} -j {chain}"] * state.jumps.get((table, builtin), 0)
            lines.append(f"-A {builtin} -j {chain}")
        lines += _RULES[table]
        lines.append("COMMIT")
    _restore(netns, lines)


def remove(netns: str) -> None:
    """Undo :func:`install` in ``netns``: the jumps, our chains, the policy rule and the route
    go; rules other software put there stay. Removing what is not there is not an error."""
    state = _state(netns)
    lines: list[str] = []
    for table in _TABLES:
        body: list[str] = []
        for builtin, chain in _JUMPS:
            body += [f"-D {builtin} -j {chain}"] * state.jumps.get((table, builtin), 0)
        for _, chain in _JUMPS:
            if (table, chain) in state.chains:
                body += [f"-F {chain}", f"-X {chain}"]
        if body:
            lines += [f"*{table}", *body, "COMMIT"]
    if lines:
        _restore(netns, lines)  # capture off first, then the routing it relied on
    ip = []
    if state.rule:
        ip.append(" ".join(["rule", "del", *_RULE_ARGS]))
    if state.route:
        ip.append(" ".join(["route", "del", *_ROUTE_ARGS]))
    if ip:
        _netns.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(ip) + "\n")


def installed(netns: str) -> bool:
    """Whether ``netns`` has the whole redirection (chains, jumps, policy rule and route)."""
    return _state(netns).complete


def _restore(netns: str, lines: list[str]) -> None:
    # -w: the legacy iptables backend serialises all namespaces on one host-wide lock file.
    _netns.run(
        ["iptables-restore", "-w", "5", "--noflush"], netns=netns, input="\n".join(lines) + "\n"
    )


def _state(netns: str) -> _State:
    if not _netns.exists(netns):
        raise TestbedError(f"netns {netns} does not exist")
    # Plain iptables-save, not `-t nat`: with the nf_tables backend, listing a table creates it.
    saved = _netns.run(["iptables-save"], netns=netns)
    chains: set[tuple[str, str]] = set()
    jumps: dict[tuple[str, str], int] = {}
    ours = {chain for _, chain in _JUMPS}
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and line[1:].split(" ", 1)[0] in ours:
            chains.add((table, line[1:].split(" ", 1)[0]))
        else:
            for builtin, chain in _JUMPS:
                if line.strip() == f"-A {builtin} -j {chain}":
                    jumps[(table, builtin)] = jumps.get((table, builtin), 0) + 1
    rules = _netns.run(["ip", "-n", netns, "rule", "show", "pref", str(RULE_PREF)])
    routes = _netns.run(["ip", "-n", netns, "route", "show", "table", "all", "type", "local"])
    return _State(
        chains=frozenset(chains),
        jumps=jumps,
        rule=any(f"fwmark {_CONN} lookup {ROUTE_TABLE}" in r for r in rules.splitlines()),
        route=any(
            r.split()[:3] == ["local", "default", "dev"]
            and "lo" in r.split()[3:4]
            and f"table {ROUTE_TABLE}" in r
            for r in routes.splitlines()
        ),
    )
