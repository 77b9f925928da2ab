"""Istio's certificate API (``istio.v1.auth.IstioCertificateService/CreateCertificate``, gRPC over
TLS), both sides: :class:`IstioCaClient` gets workload certificates from istiod (or any CA
speaking it, ``ambient control-plane`` included) in place of a local CA; :class:`IstioCaServer`
signs them from a local CA for Istio's own ztunnel or ambient's.

The exchange, as Istio's ztunnel makes it: a fresh ECDSA P-256 key and a CSR whose only SAN is
the workload's SPIFFE ID; ``validity_duration`` in seconds; ``metadata`` (a Struct) naming the
identity the caller asks for (``ImpersonatedIdentity``: ztunnel asks on behalf of its pods); the
caller's Kubernetes token as ``authorization: Bearer …`` and its cluster as ``ClusterID`` gRPC
metadata. The answer is the chain as PEM strings, leaf first and root last.

The messages are built from their field list at import (as ``ambient.zds.messages``), with the
field numbers of Istio's ``security/v1alpha1/ca.proto``: ``csr`` 1, ``validity_duration`` 3,
``metadata`` 4; ``cert_chain`` 1. gRPC is grpcio's, imported only by a process that uses the API.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import istiod
from ..schema import Message, build, file_descriptor
from .ca import CLOCK_SKEW_ALLOWANCE, WORKLOAD_CERT_TTL, CertificateAuthority, WorkloadCertificate
from .spiffe import SpiffeId

log = logging.getLogger(__name__)

SERVICE: Final = "istio.v1.auth.IstioCertificateService"
METHOD: Final = f"/{SERVICE}/CreateCertificate"
IMPERSONATED_IDENTITY: Final = "ImpersonatedIdentity"
# How long a call may take (Istio's ztunnel: the gRPC default of its channel, no per-call limit).
DEFAULT_TIMEOUT = 10.0
# The DNS name istiod's serving certificate carries, which Istio's ztunnel checks by default.
ISTIOD_HOSTNAME: Final = "istiod.istio-system.svc"

_CA_PROTO = file_descriptor(
    "ambient/istio_ca.proto",
    "istio.v1.auth",
    ["google/protobuf/struct.proto"],
    [
        Message(
            "IstioCertificateRequest",
            [
                ("csr", 1, "string", ""),
                ("validity_duration", 3, "int64", ""),
                ("metadata", 4, ".google.protobuf.Struct", ""),
            ],
        ),
        Message("IstioCertificateResponse", [("cert_chain", 1, "string", "repeated")]),
    ],
    {},
)
_CLASSES = build([_CA_PROTO], known=("google.protobuf.Struct",))
IstioCertificateRequest: Any = _CLASSES["istio.v1.auth.IstioCertificateRequest"]
IstioCertificateResponse: Any = _CLASSES["istio.v1.auth.IstioCertificateResponse"]
_Struct: Any = _CLASSES["google.protobuf.Struct"]


class CaError(OSError):
    """A certificate the CA did not give, saying which CA and why (an OSError: like a socket
    that fails, what opens a listener reports it and goes on)."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _uri_sans(signed: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The URI SANs of a certificate or CSR (none without the extension)."""
    try:
        names = signed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(names.get_values_for_type(x509.UniformResourceIdentifier))


class IstioCaClient:
    """Workload certificates from a CA at ``address`` (``host:port``), verified with
    ``root_cert`` (PEM; the CA's serving certificate must chain to it and name ``hostname``,
    by default the host of ``address``). ``token``: read before each call (a Kubernetes
    projected token is rotated on disk). Used by :class:`~ambient.identity.manager.
    CertificateManager` as its CA (``issue``)."""

    def __init__(
        self,
        address: str,
        root_cert: bytes,
        *,
        token: Callable[[], str | None] = lambda: None,
        cluster_id: str = "Kubernetes",
        hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        import grpc  # only a process that calls a CA needs grpcio

        self.address = address
        self._token = token
        self._cluster_id = cluster_id
        self._timeout = timeout
        self._grpc = grpc
        self._channel = istiod.channel(address, root_cert, hostname)
        self._call = self._channel.unary_unary(
            METHOD,
            request_serializer=IstioCertificateRequest.SerializeToString,
            response_deserializer=IstioCertificateResponse.FromString,
        )

    def close(self) -> None:
        self._channel.close()

    def issue(
        self,
        identity: SpiffeId | str,
        *,
        now: dt.datetime | None = None,
        ttl: dt.timedelta = WORKLOAD_CERT_TTL,
    ) -> WorkloadCertificate:
        """A new key, and a certificate for it from the CA; :class:`CaError` says what failed."""
        text = str(identity)
        spiffe = SpiffeId.parse(text)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, spiffe.trust_domain)])
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(text)]), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        metadata = _Struct()
        metadata.update({IMPERSONATED_IDENTITY: text})
        request = IstioCertificateRequest(
            csr=csr.public_bytes(serialization.Encoding.PEM).decode(),
            validity_duration=int(ttl.total_seconds()),
            metadata=metadata,
        )
        headers = [("clusterid", self._cluster_id)]
        token = self._token()
        if token:
            headers.append(("authorization", f"Bearer {token}"))
        try:
            response = self._call(request, timeout=self._timeout, metadata=headers)
        except self._grpc.RpcError as e:
            raise CaError(
                f"CA {self.address}: CreateCertificate for {text} failed: "
                f"{e.code().name}: {e.details()}"
            ) from None
        return _workload_certificate(self.address, text, key, list(response.cert_chain))

    def __repr__(self) -> str:
        return f"IstioCaClient({self.address!r})"


def _workload_certificate(
    address: str, identity: str, key: ec.EllipticCurvePrivateKey, chain: list[str]
) -> WorkloadCertificate:
    """The CA's answer, checked: a leaf for our key and identity, and a root to trust."""
    if len(chain) < 2:
        raise CaError(f"CA {address}: expected a chain of leaf and root, got {len(chain)} PEM")
    try:
        certs = [x509.load_pem_x509_certificate(c.encode()) for c in chain]
    except ValueError as e:
        raise CaError(f"CA {address}: a certificate of the chain is not PEM X.509: {e}") from None
    leaf = certs[0]
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise CaError(f"CA {address}: the certificate is not for the key of the CSR")
    sans = _uri_sans(leaf)
    if identity not in sans:
        raise CaError(f"CA {address}: the certificate names {sans}, not {identity}")
    return WorkloadCertificate(
        identity=identity,
        chain_pem="".join(chain[:-1]).encode(),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        roots_pem=chain[-1].encode(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


class IstioCaServer:
    """Istio's certificate API over gRPC and TLS, signing from ``ca``.

    A caller is accepted when ``tokens`` is None (anyone who can reach it) or its bearer token
    is one of them (token → who it is, for the log). A CSR is signed when its signature holds, its
    one URI SAN is a SPIFFE ID of the CA's trust domain, and a ``ImpersonatedIdentity`` in the
    metadata names that same ID; the certificate lasts ``validity_duration`` (at most
    ``max_ttl``). ``serve_hostnames``: the DNS names (and IPs) of the server's own certificate,
    which the CA signs for itself; Istio's ztunnel expects ``istiod.istio-system.svc``.
    ``handlers``: other gRPC services served on the same port (xDS).
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        address: str = "127.0.0.1:0",
        *,
        tokens: Mapping[str, str] | None = None,
        max_ttl: dt.timedelta = WORKLOAD_CERT_TTL,
        serve_hostnames: tuple[str, ...] = (ISTIOD_HOSTNAME, "localhost"),
        clock: Callable[[], dt.datetime] = _utcnow,
        handlers: tuple[Any, ...] = (),
    ) -> None:
        from concurrent import futures

        import grpc

        self.ca = ca
        self._tokens = dict(tokens) if tokens is not None else None
        self._max_ttl = max_ttl
        self._clock = clock
        self._key = serialization.load_pem_private_key(ca.signing_key_pem, password=None)
        self._root = x509.load_pem_x509_certificate(ca.roots_pem)
        self.issued = 0
        self.refused = 0
        self._count = threading.Lock()
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = self._sign(
            server_key.public_key(),
            _serving_names(serve_hostnames, address),
            WORKLOAD_CERT_TTL * 30,
        )
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                    self._create_certificate,
                    request_deserializer=IstioCertificateRequest.FromString,
                    response_serializer=IstioCertificateResponse.SerializeToString,
                )
            },
        )
        # Each xDS stream holds a thread for its life: room for a few nodes' ztunnels.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        # Other services on the same port, as istiod serves xDS beside the CA on 15012.
        self._server.add_generic_rpc_handlers((handler, *handlers))
        credentials = grpc.ssl_server_credentials(
            [
                (
                    server_key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                    server_cert.public_bytes(serialization.Encoding.PEM),
                )
            ]
        )
        host = address.rpartition(":")[0]
        port = self._server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {address} for the CA API")
        self.address = f"{host}:{port}"
        self._grpc = grpc

    def start(self) -> IstioCaServer:
        self._server.start()
        log.info("Istio CA API on %s (trust domain %s)", self.address, self.ca.trust_domain)
        return self

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait()

    def _sign(
        self, public_key: Any, names: list[x509.GeneralName], ttl: dt.timedelta
    ) -> x509.Certificate:
        now = self._clock()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._root.subject)
            .public_key(public_key)
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + ttl)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=True,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        try:
            # Named by the root's own key identifier, so a verifier finds the issuer by it.
            ski = self._root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
        except x509.ExtensionNotFound:
            pass
        return builder.sign(self._key, hashes.SHA256())  # type: ignore[arg-type]

    def _refuse(self, context: Any, code: Any, why: str) -> Any:
        with self._count:
            self.refused += 1
        log.warning("CA: refused a certificate request from %s: %s", context.peer(), why)
        context.abort(code, why)

    def _create_certificate(self, request: Any, context: Any) -> Any:
        grpc = self._grpc
        headers = dict(context.invocation_metadata())
        who = "anyone"
        if self._tokens is not None:
            auth = headers.get("authorization", "")
            token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
            if token not in self._tokens:
                return self._refuse(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "expected a known bearer token in the authorization metadata",
                )
            who = self._tokens[token]
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode())
        except ValueError as e:
            return self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"csr: not a PEM CSR: {e}"
            )
        if not csr.is_signature_valid:
            return self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "csr: bad signature")
        sans = _uri_sans(csr)
        if len(sans) != 1:
            return self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"csr: expected one SPIFFE URI SAN, got {sans}",
            )
        try:
            identity = SpiffeId.parse(sans[0])
        except ValueError as e:
            return self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"csr: {e}")
        if identity.trust_domain != self.ca.trust_domain:
            return self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity} is not in this CA's trust domain {self.ca.trust_domain}",
            )
        impersonated = request.metadata.fields.get(IMPERSONATED_IDENTITY)
        if impersonated is not None and impersonated.string_value != str(identity):
            return self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"metadata {IMPERSONATED_IDENTITY} {impersonated.string_value!r} differs from the "
                f"CSR's {identity}",
            )
        ttl = (
            dt.timedelta(seconds=request.validity_duration)
            if request.validity_duration > 0
            else self._max_ttl
        )
        ttl = min(ttl, self._max_ttl)
        cert = self._sign(csr.public_key(), [x509.UniformResourceIdentifier(str(identity))], ttl)
        with self._count:
            self.issued += 1
        log.info("CA: issued %s for %s, valid %s", identity, who, ttl)
        return IstioCertificateResponse(
            cert_chain=[
                cert.public_bytes(serialization.Encoding.PEM).decode(),
                self.ca.roots_pem.decode(),
            ]
        )


def _serving_names(hostnames: tuple[str, ...], address: str) -> list[x509.GeneralName]:
    import ipaddress

    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    host = address.rpartition(":")[0].strip("[]")
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        if host and host not in hostnames:
            names.append(x509.DNSName(host))
    return names
