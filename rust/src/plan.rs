//! The small, typed answers Python decisions give the core: where an outbound connection goes
//! (`HboneTarget`, `TcpTarget`, or `Deny`) and whether an inbound HBONE stream is let through
//! (`Allow` or `Deny`). They are frozen Python classes so the core reads them without copying or
//! re-validating; all validation happens once, in their constructors, with errors naming the field.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::accesslog::LogTemplate;
use crate::metrics::Counters;

fn parse_address(class: &str, field: &str, text: &str) -> PyResult<SocketAddr> {
    text.parse().map_err(|_| {
        PyValueError::new_err(format!(
            "{class}.{field}: expected 'ip:port' (IPv6 as '[ip]:port'), got {text:?}"
        ))
    })
}

fn parse_ip(class: &str, field: &str, text: Option<&str>) -> PyResult<Option<IpAddr>> {
    text.map(|t| {
        t.parse().map_err(|_| {
            PyValueError::new_err(format!(
                "{class}.{field}: expected an IP address, got {t:?}"
            ))
        })
    })
    .transpose()
}

fn check_spiffe(class: &str, field: &str, id: &str) -> PyResult<()> {
    if crate::tls::trust_domain(id).is_none() {
        return Err(PyValueError::new_err(format!(
            "{class}.{field}: expected a SPIFFE ID (spiffe://<trust domain>/...), got {id:?}"
        )));
    }
    Ok(())
}

/// Send the connection through an HBONE tunnel.
#[pyclass(frozen, module = "ambient._core")]
#[derive(Debug)]
pub struct HboneTarget {
    /// The peer's HBONE listener, normally `podIP:15008`.
    pub address: SocketAddr,
    /// `:authority` of the CONNECT: the final destination `ip:port`.
    pub authority: String,
    /// The server must hold one of these (sorted, so equal sets share a pooled connection).
    pub identities: Vec<Arc<str>>,
    /// Which of the core's identities the client presents.
    pub source_identity: Arc<str>,
    /// Source IP of the outer connection (the pod's IP).
    pub source_ip: Option<IpAddr>,
    /// Extra CONNECT headers (baggage...).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The Service the client dialed, sent as `Forwarded: for="<client>";host=<this>` (the core
    /// adds the client, which differs per connection) so the destination labels its telemetry.
    pub forwarded_host: Option<String>,
    /// Anything the decision wants back in the connection's report (telemetry, access log).
    #[pyo3(get)]
    pub tag: Option<Py<PyAny>>,
    /// Where the core counts this connection for metrics (shared by every connection with the
    /// same labels).
    #[pyo3(get)]
    pub counters: Option<Py<Counters>>,
    /// The connection's access-log line, written by the core when it ends.
    #[pyo3(get)]
    pub log: Option<Py<LogTemplate>>,
}

#[pymethods]
impl HboneTarget {
    #[new]
    #[pyo3(signature = (address, authority, identities, source_identity, *, source_ip=None, headers=None, forwarded_host=None, tag=None, counters=None, log=None))]
    // Python keyword arguments, mirrored one to one: a struct would only move the list.
    #[allow(clippy::too_many_arguments)]
    fn new(
        address: &str,
        authority: &str,
        identities: Vec<String>,
        source_identity: &str,
        source_ip: Option<&str>,
        headers: Option<Vec<(String, String)>>,
        forwarded_host: Option<String>,
        tag: Option<Py<PyAny>>,
        counters: Option<Py<Counters>>,
        log: Option<Py<LogTemplate>>,
    ) -> PyResult<Self> {
        if let Some(host) = &forwarded_host {
            if host.is_empty() || HeaderValue::try_from(format!("host={host}")).is_err() {
                return Err(PyValueError::new_err(format!(
                    "HboneTarget.forwarded_host: expected a host name, got {host:?}"
                )));
            }
        }
        let address = parse_address("HboneTarget", "address", address)?;
        if authority.is_empty() || http::uri::Authority::try_from(authority).is_err() {
            return Err(PyValueError::new_err(format!(
                "HboneTarget.authority: expected 'host:port', got {authority:?}"
            )));
        }
        if identities.is_empty() {
            return Err(PyValueError::new_err(
                "HboneTarget.identities: at least one expected server identity is required",
            ));
        }
        for id in &identities {
            check_spiffe("HboneTarget", "identities", id)?;
        }
        check_spiffe("HboneTarget", "source_identity", source_identity)?;
        let mut ids: Vec<Arc<str>> = identities.into_iter().map(Arc::from).collect();
        ids.sort();
        ids.dedup();
        let headers = headers
            .unwrap_or_default()
            .into_iter()
            .map(|(name, value)| {
                let n = HeaderName::try_from(name.as_str()).map_err(|_| {
                    PyValueError::new_err(format!("HboneTarget.headers: bad header name {name:?}"))
                })?;
                let v = HeaderValue::try_from(value.as_str()).map_err(|_| {
                    PyValueError::new_err(format!(
                        "HboneTarget.headers: bad value for {name:?}: {value:?}"
                    ))
                })?;
                Ok((n, v))
            })
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Self {
            address,
            authority: authority.to_string(),
            identities: ids,
            source_identity: Arc::from(source_identity),
            source_ip: parse_ip("HboneTarget", "source_ip", source_ip)?,
            headers,
            forwarded_host,
            tag,
            counters,
            log,
        })
    }

    #[getter]
    fn address(&self) -> String {
        self.address.to_string()
    }
    #[getter]
    fn forwarded_host(&self) -> Option<&str> {
        self.forwarded_host.as_deref()
    }
    #[getter]
    fn authority(&self) -> &str {
        &self.authority
    }
    #[getter]
    fn identities(&self) -> Vec<String> {
        self.identities.iter().map(|s| s.to_string()).collect()
    }
    #[getter]
    fn source_identity(&self) -> &str {
        &self.source_identity
    }
    #[getter]
    fn source_ip(&self) -> Option<String> {
        self.source_ip.map(|ip| ip.to_string())
    }
    #[getter]
    fn headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "HboneTarget(address='{}', authority='{}', identities={:?}, source_identity='{}')",
            self.address, self.authority, self.identities, self.source_identity
        )
    }
}

/// Send the connection as plain TCP (a destination outside the mesh, or passthrough).
#[pyclass(frozen, module = "ambient._core")]
#[derive(Debug)]
pub struct TcpTarget {
    pub address: SocketAddr,
    pub source_ip: Option<IpAddr>,
    #[pyo3(get)]
    pub tag: Option<Py<PyAny>>,
    /// Where the core counts this connection for metrics (shared by every connection with the
    /// same labels).
    #[pyo3(get)]
    pub counters: Option<Py<Counters>>,
    /// The connection's access-log line, written by the core when it ends.
    #[pyo3(get)]
    pub log: Option<Py<LogTemplate>>,
}

#[pymethods]
impl TcpTarget {
    #[new]
    #[pyo3(signature = (address, *, source_ip=None, tag=None, counters=None, log=None))]
    fn new(
        address: &str,
        source_ip: Option<&str>,
        tag: Option<Py<PyAny>>,
        counters: Option<Py<Counters>>,
        log: Option<Py<LogTemplate>>,
    ) -> PyResult<Self> {
        Ok(Self {
            address: parse_address("TcpTarget", "address", address)?,
            source_ip: parse_ip("TcpTarget", "source_ip", source_ip)?,
            tag,
            counters,
            log,
        })
    }

    #[getter]
    fn address(&self) -> String {
        self.address.to_string()
    }
    #[getter]
    fn source_ip(&self) -> Option<String> {
        self.source_ip.map(|ip| ip.to_string())
    }

    fn __repr__(&self) -> String {
        format!("TcpTarget(address='{}')", self.address)
    }
}

/// Let an inbound HBONE stream through to `upstream` (the application's `ip:port`).
#[pyclass(frozen, module = "ambient._core")]
#[derive(Debug)]
pub struct Allow {
    pub upstream: SocketAddr,
    /// Source IP of the connection to the application (the client's, where the platform allows).
    pub source_ip: Option<IpAddr>,
    #[pyo3(get)]
    pub tag: Option<Py<PyAny>>,
    /// Where the core counts this connection for metrics (shared by every connection with the
    /// same labels).
    #[pyo3(get)]
    pub counters: Option<Py<Counters>>,
    /// The connection's access-log line, written by the core when it ends.
    #[pyo3(get)]
    pub log: Option<Py<LogTemplate>>,
}

#[pymethods]
impl Allow {
    #[new]
    #[pyo3(signature = (upstream, *, source_ip=None, tag=None, counters=None, log=None))]
    fn new(
        upstream: &str,
        source_ip: Option<&str>,
        tag: Option<Py<PyAny>>,
        counters: Option<Py<Counters>>,
        log: Option<Py<LogTemplate>>,
    ) -> PyResult<Self> {
        Ok(Self {
            upstream: parse_address("Allow", "upstream", upstream)?,
            source_ip: parse_ip("Allow", "source_ip", source_ip)?,
            tag,
            counters,
            log,
        })
    }

    #[getter]
    fn source_ip(&self) -> Option<String> {
        self.source_ip.map(|ip| ip.to_string())
    }

    #[getter]
    fn upstream(&self) -> String {
        self.upstream.to_string()
    }

    fn __repr__(&self) -> String {
        format!("Allow(upstream='{}')", self.upstream)
    }
}

/// Refuse: an HBONE stream is answered with `status`; a plain connection is closed.
#[pyclass(frozen, module = "ambient._core")]
#[derive(Debug)]
pub struct Deny {
    pub status: u16,
    pub reason: String,
    #[pyo3(get)]
    pub tag: Option<Py<PyAny>>,
    /// Where the core counts this connection for metrics (shared by every connection with the
    /// same labels).
    #[pyo3(get)]
    pub counters: Option<Py<Counters>>,
    /// The connection's access-log line, written by the core when it ends.
    #[pyo3(get)]
    pub log: Option<Py<LogTemplate>>,
}

#[pymethods]
impl Deny {
    #[new]
    #[pyo3(signature = (reason, *, status=401, tag=None, counters=None, log=None))]
    fn new(
        reason: String,
        status: u16,
        tag: Option<Py<PyAny>>,
        counters: Option<Py<Counters>>,
        log: Option<Py<LogTemplate>>,
    ) -> PyResult<Self> {
        if !(400..=599).contains(&status) {
            return Err(PyValueError::new_err(format!(
                "Deny.status: expected an HTTP error status 400-599, got {status}"
            )));
        }
        Ok(Self {
            status,
            reason,
            tag,
            counters,
            log,
        })
    }

    #[getter]
    fn status(&self) -> u16 {
        self.status
    }
    #[getter]
    fn reason(&self) -> &str {
        &self.reason
    }

    fn __repr__(&self) -> String {
        format!("Deny({:?}, status={})", self.reason, self.status)
    }
}
