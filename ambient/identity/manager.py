"""Workload certificates for the identities a ztunnel speaks as: issued on demand, renewed at half
of their lifetime (as Istio's ztunnel does), handed to the data plane, forgotten when no longer
needed. Renewal replaces the certificate for new connections; live ones keep theirs.

Time is injected (``clock``) so tests can drive renewals; the keys never leave memory and are
never logged.
"""

from __future__ import annotations

import datetime as dt
import heapq
import logging
import threading
from collections.abc import Callable

from .ca import WORKLOAD_CERT_TTL, CertificateAuthority, WorkloadCertificate

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
# After a failed issue or load, try again this soon (Istio backs off exponentially from here).
RETRY_AFTER = dt.timedelta(seconds=1)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateManager:
    """Keeps one valid certificate per identity loaded into the data plane via ``install``."""

    def __init__(
        self,
        ca: CertificateAuthority,
        install: Callable[[WorkloadCertificate], object],
        *,
        uninstall: Callable[[str], object] | None = None,
        ttl: dt.timedelta = WORKLOAD_CERT_TTL,
        clock: Clock = utcnow,
    ) -> None:
        self._ca = ca
        self._install = install
        self._uninstall = uninstall
        # Serialises installing and forgetting, so a renewal racing a forget cannot put back an
        # identity that was just removed from the data plane.
        self._installing = threading.Lock()
        self._ttl = ttl
        self._clock = clock
        self._certs: dict[str, WorkloadCertificate] = {}
        self._due: list[tuple[dt.datetime, str]] = []  # heap of (renewal time, identity)
        # The renewal time in force per identity: heap entries that differ are stale.
        self._due_at: dict[str, dt.datetime] = {}
        self._lock = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._renew_loop, name="cert-renewal", daemon=True)
        self._thread.start()

    def ensure(self, identity: str) -> WorkloadCertificate:
        """The current certificate of ``identity``, issued and installed if there is none."""
        with self._lock:
            cert = self._certs.get(identity)
            if cert is not None:
                return cert
        return self._issue(identity)

    def forget(self, identity: str) -> None:
        """Stop keeping ``identity``'s certificate: it is no longer renewed, and it is removed
        from the data plane (``uninstall``)."""
        with self._installing:
            with self._lock:
                known = self._certs.pop(identity, None) is not None
                self._due_at.pop(identity, None)
            if known and self._uninstall is not None:
                self._uninstall(identity)

    def certificates(self) -> list[WorkloadCertificate]:
        with self._lock:
            return sorted(self._certs.values(), key=lambda c: c.identity)

    def _issue(self, identity: str, *, renewal: bool = False) -> WorkloadCertificate:
        now = self._clock()
        cert = self._ca.issue(identity, now=now, ttl=self._ttl)
        # Istio's half-life counts from the backdated notBefore; a lifetime shorter than twice
        # the backdating (a test's) would put that in the past: then half of it from now.
        due = cert.renew_at() if cert.renew_at() > now else now + self._ttl / 2
        with self._installing:
            if renewal:
                with self._lock:
                    if identity not in self._certs:
                        return cert  # forgotten while it was being renewed
            self._install(cert)
            with self._lock:
                self._certs[identity] = cert
                self._due_at[identity] = due
                heapq.heappush(self._due, (due, identity))
                self._lock.notify()
        log.info("certificate for %s issued, valid until %s", identity, cert.not_after)
        return cert

    def renew_due(self) -> list[str]:
        """Renew every certificate past its renewal time; returns the identities renewed."""
        now = self._clock()
        due: list[str] = []
        with self._lock:
            while self._due and self._due[0][0] <= now:
                at, identity = heapq.heappop(self._due)
                if identity in self._certs and self._due_at.get(identity) == at:
                    due.append(identity)
        renewed = []
        for identity in due:
            try:
                self._issue(identity, renewal=True)
                renewed.append(identity)
            except Exception:
                log.exception("renewing the certificate of %s failed; retrying", identity)
                with self._lock:
                    self._due_at[identity] = now + RETRY_AFTER
                    heapq.heappush(self._due, (now + RETRY_AFTER, identity))
        return renewed

    def _renew_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                wait = 60.0
                if self._due:
                    wait = max(0.0, (self._due[0][0] - self._clock()).total_seconds())
                self._lock.wait(timeout=min(wait, 60.0))
                if self._stopped:
                    return
            self.renew_due()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=5)
