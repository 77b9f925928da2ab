"""Workload certificates for the identities a ztunnel speaks as: issued on demand, renewed at half
of their lifetime (as Istio's ztunnel does), handed to the data plane, forgotten when no longer
needed. Renewal replaces the certificate for new connections; live ones keep theirs.

The CA is a local one (:class:`~ambient.identity.ca.CertificateAuthority`) or a remote one
speaking Istio's CA API (:class:`~ambient.identity.istio_ca.IstioCaClient`). A renewal that fails
keeps the current certificate (still valid until its ``notAfter``) and is tried again after 1 s,
then twice as long each time up to 5 minutes; the failure shows in :meth:`status`, and once a
certificate has expired with its renewal still failing, in :meth:`pending` (readiness).

Time is injected (``clock``) so tests can drive renewals; the keys never leave memory and are
never logged.
"""

from __future__ import annotations

import datetime as dt
import heapq
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .ca import WORKLOAD_CERT_TTL, WorkloadCertificate

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
# After a failed issue, try again this soon, then twice as long each time, up to MAX_RETRY_AFTER.
RETRY_AFTER = dt.timedelta(seconds=1)
MAX_RETRY_AFTER = dt.timedelta(minutes=5)


class Issuer(Protocol):
    """Where certificates come from: a local CA or a remote one (Istio's CA API)."""

    def issue(
        self, identity: str, *, now: dt.datetime | None = None, ttl: dt.timedelta = ...
    ) -> WorkloadCertificate: ...


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateManager:
    """Keeps one valid certificate per identity loaded into the data plane via ``install``."""

    def __init__(
        self,
        ca: Issuer,
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
        # identity -> (failures in a row, the last error), while its renewal fails.
        self._failing: dict[str, tuple[int, str]] = {}
        self.issued = 0
        self.failed = 0
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

    def want(self, identity: str) -> None:
        """Like :meth:`ensure`, for a caller that goes on without it: a failure is kept,
        reported (:meth:`status`, :meth:`pending`) and tried again with backoff."""
        try:
            self.ensure(identity)
        except Exception as e:
            self._retry_later(identity, e, self._clock())

    def forget(self, identity: str) -> None:
        """Stop keeping ``identity``'s certificate: it is no longer renewed, and it is removed
        from the data plane (``uninstall``)."""
        with self._installing:
            with self._lock:
                known = self._certs.pop(identity, None) is not None
                self._due_at.pop(identity, None)
                self._failing.pop(identity, None)
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
                    if identity not in self._due_at:
                        return cert  # forgotten while it was being renewed
            self._install(cert)
            with self._lock:
                self._certs[identity] = cert
                self._due_at[identity] = due
                self._failing.pop(identity, None)
                self.issued += 1
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
                if self._due_at.get(identity) == at:  # else stale, or forgotten
                    due.append(identity)
        renewed = []
        for identity in due:
            try:
                self._issue(identity, renewal=True)
                renewed.append(identity)
            except Exception as e:
                self._retry_later(identity, e, now)
        return renewed

    def _retry_later(self, identity: str, error: Exception, now: dt.datetime) -> None:
        """A failed issue: kept, and tried again after a delay doubling from RETRY_AFTER."""
        with self._lock:
            failures = self._failing.get(identity, (0, ""))[0] + 1
            self._failing[identity] = (failures, str(error))
            self.failed += 1
            retry = min(RETRY_AFTER * 2 ** (failures - 1), MAX_RETRY_AFTER)
            self._due_at[identity] = now + retry
            heapq.heappush(self._due, (now + retry, identity))
            self._lock.notify()
            cert = self._certs.get(identity)
        log.warning(
            "the certificate of %s could not be %s (%d in a row), retrying in %s%s: %s",
            identity,
            "renewed" if cert else "issued",
            failures,
            retry,
            f"; the current one is valid until {cert.not_after.isoformat()}" if cert else "",
            error,
        )

    def status(self) -> list[dict[str, Any]]:
        """Each certificate kept: its validity, when it is renewed, and a failing renewal."""
        with self._lock:
            out = []
            for identity in sorted(self._due_at):
                cert = self._certs.get(identity)
                failures, error = self._failing.get(identity, (0, None))
                out.append(
                    {
                        "identity": identity,
                        "notBefore": cert.not_before.isoformat() if cert else None,
                        "notAfter": cert.not_after.isoformat() if cert else None,
                        "renewAt": self._due_at[identity].isoformat(),
                        "failures": failures,
                        "error": error,
                    }
                )
            return out

    def pending(self) -> list[str]:
        """Identities with no valid certificate while the CA fails (readiness says so): never
        issued, or expired with their renewal failing."""
        now = self._clock()
        out = []
        with self._lock:
            for identity, (_, error) in sorted(self._failing.items()):
                cert = self._certs.get(identity)
                if cert is None:
                    out.append(f"no certificate for {identity} yet: {error}")
                elif cert.not_after <= now:
                    out.append(
                        f"certificate of {identity} expired at {cert.not_after.isoformat()} and "
                        f"the CA fails: {error}"
                    )
        return out

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
