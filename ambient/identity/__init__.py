"""Workload identity: SPIFFE IDs and the certificates that carry them."""

from .ca import CertificateAuthority, WorkloadCertificate
from .spiffe import InvalidSpiffeId, SpiffeId

__all__ = ["CertificateAuthority", "InvalidSpiffeId", "SpiffeId", "WorkloadCertificate"]
