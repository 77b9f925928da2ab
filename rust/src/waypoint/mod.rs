//! The waypoint: an HBONE server whose streams are not carried to a local app but read as HTTP
//! (or, on a TCP port, as a stream), routed per request by the table Python compiled from the
//! mesh (`table`), and sent through a second HBONE tunnel to the chosen endpoint's ztunnel with
//! the waypoint's own identity (`upstream`).
//!
//! It shares the HBONE server (TLS, HTTP/2, keepalive, drain, the guards against hostile peers)
//! with ztunnel's inbound side: only what happens to an accepted CONNECT stream differs.

mod admission;
pub mod authn;
pub mod authz;
mod balance;
mod bodies;
mod extauthz;
mod filters;
mod plugins;
mod requests;
pub mod table;
mod telemetry;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tokio_util::sync::CancellationToken;

use crate::accesslog::AccessLog;
use crate::copy::{
    self, Cut, H2Reader, H2Writer, Prefixed, StreamReader, StreamWriter, Transferred,
};
use crate::hbone::io::H2Io;
use crate::hbone::server::{respond_status, InboundContext};
use crate::metrics::{ConnectionCount, Counters, Flag};
use crate::stats::Stats;
use table::{Protocol, Table, Target};
use telemetry::{RequestMetrics, StreamKey};
use upstream::{Dialer, UpstreamKey, Upstreams};

/// How long protocol detection waits for a client's first bytes before taking the stream as TCP
/// (a server-first protocol sends nothing until it hears from the server).
const DETECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The table the waypoint routes by, swapped whole when the snapshot changes: a request reads
/// the table current when it starts, and finishes on it.
#[pyclass(frozen, module = "ambient._core")]
pub struct WaypointTable {
    current: RwLock<Arc<Table>>,
    json: RwLock<String>,
    counts: Arc<RequestCounts>,
    metrics: RequestMetrics,
    plugins: plugins::PluginHost,
}

/// Requests answered, by class: what `ambient top` and the tests read without parsing logs.
#[derive(Default)]
pub struct RequestCounts {
    pub requests: AtomicU64,
    /// 1xx to 5xx.
    pub by_class: [AtomicU64; 5],
    pub no_route: AtomicU64,
    pub no_healthy_upstream: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub timeouts: AtomicU64,
    pub retries_exhausted: AtomicU64,
    pub mirrored: AtomicU64,
    pub refused_targets: AtomicU64,
    /// Denied by an AuthorizationPolicy (403).
    pub denied: AtomicU64,
    /// A JWT refused by a RequestAuthentication (401).
    pub unauthenticated: AtomicU64,
}

impl RequestCounts {
    pub fn answered(&self, status: u16) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }
}

impl WaypointTable {
    pub fn current(&self) -> Arc<Table> {
        self.current.read().unwrap().clone()
    }
}

#[pymethods]
impl WaypointTable {
    #[new]
    fn new(json: &str) -> PyResult<Self> {
        let plugins = plugins::PluginHost::default();
        let table = Table::from_json(json, &plugins).map_err(PyValueError::new_err)?;
        Ok(Self {
            current: RwLock::new(Arc::new(table)),
            json: RwLock::new(json.to_string()),
            counts: Arc::default(),
            metrics: RequestMetrics::default(),
            plugins,
        })
    }

    /// Swap in a new table (a new snapshot); requests already started keep the old one.
    fn update(&self, json: &str) -> PyResult<()> {
        let table = Table::from_json(json, &self.plugins).map_err(PyValueError::new_err)?;
        *self.current.write().unwrap() = Arc::new(table);
        *self.json.write().unwrap() = json.to_string();
        Ok(())
    }

    /// The object that runs the table's Python filters: its `on_request(name, method, path,
    /// authority, headers, source_principal, source_ip, destination, service,
    /// request_principal, body)` and `on_response(name, state, status, headers)` are called on
    /// the core's filter threads (`ambient.waypoint.plugins.PluginHost`).
    fn set_plugin_runner(&self, runner: Py<PyAny>) -> PyResult<()> {
        self.plugins
            .set_runner(runner)
            .map_err(|e| PyValueError::new_err(format!("cannot start the filter threads: {e}")))
    }

    /// Failures of each Python filter so far: `{(filter, reason): count}`, reason `raised`,
    /// `timeout`, `busy` or `invalid`.
    fn plugin_failures(&self) -> HashMap<(String, String), u64> {
        self.plugins
            .failures
            .lock()
            .unwrap()
            .iter()
            .map(|((name, reason), n)| ((name.to_string(), reason.to_string()), *n))
            .collect()
    }

    /// The table's JSON as last set (for `config_dump`).
    #[getter]
    fn json(&self) -> String {
        self.json.read().unwrap().clone()
    }

    /// Istio's request metrics as counted so far, one entry per series: `(source_principal,
    /// source_ip, service, endpoint, endpoint_principal, response_code, grpc, response_flags,
    /// duration_ms, request_bytes, response_bytes)`, each histogram as `(sum, count, buckets)`
    /// with `(upper bound, count)` per bucket, not cumulative, `+Inf` last.
    fn request_series<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let series = self.metrics.series.lock().unwrap();
        for (key, values) in series.iter() {
            let histogram = |h: &telemetry::Histogram| (h.sum, h.count, h.buckets());
            out.append((
                (
                    &*key.source_principal,
                    key.source_ip.map(|ip| ip.to_string()),
                    &*key.service,
                    &*key.endpoint,
                    &*key.endpoint_principal,
                    key.code,
                    key.grpc,
                    key.flags,
                ),
                histogram(&values.duration),
                histogram(&values.request_bytes),
                histogram(&values.response_bytes),
            ))?;
        }
        Ok(out)
    }

    /// The rule a request would take: the route's `namespace/name#rule` (or the Service itself),
    /// None when routes are attached and none matches (a 404). For `ambient explain` and the
    /// test that holds this table to `ambient.waypoint.routes.select`.
    #[pyo3(signature = (target, method, path, query=None, headers=Vec::new(), client_namespace=""))]
    fn route(
        &self,
        target: &str,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: Vec<(String, String)>,
        client_namespace: &str,
    ) -> PyResult<Option<String>> {
        let target: SocketAddr = target.parse().map_err(|_| {
            PyValueError::new_err(format!("target: expected ip:port, got {target:?}"))
        })?;
        let table = self.current();
        let port = match table.targets.get(&target.ip()) {
            Some(Target::Service { service }) => table.services[*service].ports.get(&target.port()),
            _ => None,
        }
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "{target} is not a Service port bound to this waypoint"
            ))
        })?;
        let map = header_map(&headers)?;
        let head = table::Head {
            method,
            path,
            query,
            headers: &map,
        };
        Ok(match port.route(&head, client_namespace) {
            table::Routed::Rule(rule, _) => Some(rule.route.to_string()),
            table::Routed::NoRoute => None,
        })
    }

    /// The verdict of this table's AuthorizationPolicies on a request to `target` (`ip:port`),
    /// as the waypoint reaches it per request (the path is normalized first): `(allowed,
    /// deciding policy or None, AUDIT and dry-run policies that matched)`. For `ambient explain`
    /// and the test that holds it to `ambient.waypoint.authz.evaluate`. `auth`: a verified
    /// JWT's `(principal, audiences, presenter, claims as JSON)`.
    #[pyo3(signature = (
        target, method, path, *, host="", headers=Vec::new(), source_principal="",
        source_ip="127.0.0.1", auth=None,
    ))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn authorize(
        &self,
        target: &str,
        method: &str,
        path: &str,
        host: &str,
        headers: Vec<(String, String)>,
        source_principal: &str,
        source_ip: &str,
        auth: Option<(String, Vec<String>, String, String)>,
    ) -> PyResult<(bool, Option<String>, Vec<String>)> {
        let target: SocketAddr = target.parse().map_err(|_| {
            PyValueError::new_err(format!("target: expected ip:port, got {target:?}"))
        })?;
        let source_ip: std::net::IpAddr = source_ip.parse().map_err(|_| {
            PyValueError::new_err(format!("source_ip: expected an IP, got {source_ip:?}"))
        })?;
        let table = self.current();
        let bound = table.targets.get(&target.ip()).ok_or_else(|| {
            PyValueError::new_err(format!("{target} is not bound to this waypoint"))
        })?;
        let map = header_map(&headers)?;
        let auth = match auth {
            Some((principal, audiences, presenter, claims)) => Some(authz::RequestAuth {
                principal,
                audiences,
                presenter,
                claims: serde_json::from_str(&claims)
                    .map_err(|e| PyValueError::new_err(format!("auth claims: {e}")))?,
            }),
            None => None,
        };
        let path = authz::normalize_path(path);
        let request = authz::Request {
            method,
            host,
            path: &path,
            headers: &map,
            source_principal: authz::without_scheme(source_principal),
            source_ip,
            remote_ip: authz::remote_ip(&map, source_ip, table.trusted_proxies),
            destination_ip: target.ip(),
            destination_port: target.port(),
            auth: auth.as_ref(),
        };
        let verdict = table.policies.evaluate(table.policies_for(bound), &request);
        Ok((
            verdict.allowed,
            verdict.policy.map(str::to_string),
            verdict.logged.iter().map(|p| p.key.clone()).collect(),
        ))
    }

    /// What the RequestAuthentications that apply to `target` (`ip:port`) make of a request
    /// with `headers` to `path` (as the waypoint checks each request): `(None, auth)` with
    /// `auth` = `(principal, audiences, presenter, claims JSON)` for a valid token or None
    /// without one; `(reason, None)` for a refused token (a 401). For `ambient explain --jwt`.
    #[pyo3(signature = (target, headers=Vec::new(), path="/"))]
    #[allow(clippy::type_complexity)]
    fn authenticate(
        &self,
        target: &str,
        headers: Vec<(String, String)>,
        path: &str,
    ) -> PyResult<(
        Option<String>,
        Option<(String, Vec<String>, String, String)>,
    )> {
        let target: SocketAddr = target.parse().map_err(|_| {
            PyValueError::new_err(format!("target: expected ip:port, got {target:?}"))
        })?;
        let table = self.current();
        let bound = table.targets.get(&target.ip()).ok_or_else(|| {
            PyValueError::new_err(format!("{target} is not bound to this waypoint"))
        })?;
        let mut request = Request::builder()
            .uri(path)
            .body(())
            .map_err(|e| PyValueError::new_err(format!("path: {e}")))?;
        *request.headers_mut() = header_map(&headers)?;
        let (mut parts, ()) = request.into_parts();
        Ok(match table.authn_for(bound).authenticate(&mut parts) {
            Ok(None) => (None, None),
            Ok(Some(auth)) => (
                None,
                Some((
                    auth.principal.clone(),
                    auth.audiences.clone(),
                    auth.presenter.clone(),
                    auth.claims.to_string(),
                )),
            ),
            Err(refused) => (Some(refused.reason), None),
        })
    }

    /// Istio's TCP metrics of the streams carried on TCP ports, one entry per series:
    /// `((source_principal, source_ip, service, endpoint, endpoint_principal), Counters)`.
    #[allow(clippy::type_complexity)]
    fn stream_series(
        &self,
        py: Python<'_>,
    ) -> Vec<(
        (String, Option<String>, String, String, String),
        Py<Counters>,
    )> {
        let streams = self.metrics.streams.lock().unwrap();
        streams
            .iter()
            .map(|(k, c)| {
                (
                    (
                        k.source_principal.to_string(),
                        k.source_ip.map(|ip| ip.to_string()),
                        k.service.to_string(),
                        k.endpoint.to_string(),
                        k.endpoint_principal.to_string(),
                    ),
                    c.clone_ref(py),
                )
            })
            .collect()
    }

    /// Requests answered so far, by status class and by what went wrong.
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.counts;
        let out = PyDict::new(py);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.set_item("requests", get(&c.requests))?;
        for (i, name) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            out.set_item(*name, get(&c.by_class[i]))?;
        }
        out.set_item("no_route", get(&c.no_route))?;
        out.set_item("no_healthy_upstream", get(&c.no_healthy_upstream))?;
        out.set_item("upstream_failures", get(&c.upstream_failures))?;
        out.set_item("timeouts", get(&c.timeouts))?;
        out.set_item("retries_exhausted", get(&c.retries_exhausted))?;
        out.set_item("mirrored", get(&c.mirrored))?;
        out.set_item("refused_targets", get(&c.refused_targets))?;
        out.set_item("denied", get(&c.denied))?;
        out.set_item("unauthenticated", get(&c.unauthenticated))?;
        out.set_item("filter_answered", get(&self.plugins.answered))?;
        Ok(out)
    }
}

/// What one waypoint listener shares among its streams.
pub struct Waypoint {
    pub table: Py<WaypointTable>,
    pub upstreams: Upstreams,
    pub dialer: Dialer,
    /// Where each request's line goes (None: not logged).
    pub access_log: Option<Py<AccessLog>>,
}

impl Waypoint {
    fn table(&self) -> Arc<Table> {
        self.table.get().current()
    }

    fn counts(&self) -> &RequestCounts {
        &self.table.get().counts
    }

    fn plugin_host(&self) -> &plugins::PluginHost {
        &self.table.get().plugins
    }
}

/// One accepted HBONE stream, as the request handler sees it.
pub struct StreamInfo {
    /// The HBONE peer: the client's ztunnel (or the client itself, if it speaks HBONE).
    pub peer: SocketAddr,
    /// The client's identity from its certificate ("" without one).
    pub source_principal: Arc<str>,
    /// The client as its ztunnel forwarded it (`Forwarded: for`), else the peer.
    pub client: SocketAddr,
    /// The namespace of the client's identity: consumer routes of that namespace apply.
    pub client_namespace: String,
    /// The CONNECT authority: a Service VIP or a pod IP, with the port.
    pub target: SocketAddr,
}

fn header_map(headers: &[(String, String)]) -> PyResult<http::HeaderMap> {
    let mut map = http::HeaderMap::new();
    for (name, value) in headers {
        let name = http::HeaderName::try_from(name.as_str())
            .map_err(|_| PyValueError::new_err(format!("bad header name {name:?}")))?;
        let value = http::HeaderValue::try_from(value.as_str())
            .map_err(|_| PyValueError::new_err(format!("bad header value {value:?}")))?;
        map.append(name, value);
    }
    Ok(map)
}

/// `path` as the waypoint normalizes a request's path before authorization and routing.
#[pyfunction]
pub fn normalize_path(path: &str) -> String {
    authz::normalize_path(path).into_owned()
}

/// The `for` address of a `Forwarded` header (RFC 7239), as ztunnel sends it: `for="ip:port"`.
fn forwarded_for(headers: &http::HeaderMap) -> Option<SocketAddr> {
    let value = headers.get("forwarded")?.to_str().ok()?;
    value.split([';', ',']).find_map(|part| {
        let (name, v) = part.trim().split_once('=')?;
        if !name.eq_ignore_ascii_case("for") {
            return None;
        }
        v.trim_matches('"').parse().ok()
    })
}

/// Serve one CONNECT stream accepted by a waypoint listener.
pub async fn serve_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_identity: Option<Arc<str>>,
    ctx: Arc<InboundContext>,
    waypoint: Arc<Waypoint>,
) {
    let started = Instant::now();
    let stats = &ctx.shared.stats;
    Stats::inc(&stats.hbone_requests_received);
    let (authority, target) = match crate::hbone::server::parse_connect(&request) {
        Ok(parsed) => parsed,
        Err(why) => {
            Stats::inc(&stats.hbone_requests_refused);
            log::info!("waypoint: HBONE request from {peer} refused with 400: {why}");
            respond_status(respond, StatusCode::BAD_REQUEST);
            return;
        }
    };
    let table = waypoint.table();
    let protocol = match bound_protocol(&table, target) {
        Ok(protocol) => protocol,
        Err(why) => {
            Stats::inc(&stats.hbone_requests_refused);
            waypoint
                .counts()
                .refused_targets
                .fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "waypoint: HBONE request from {peer} ({}) to {authority} refused with 421: {why}",
                peer_identity.as_deref().unwrap_or("no identity")
            );
            respond_status(respond, StatusCode::MISDIRECTED_REQUEST);
            ctx.reporter.early(
                peer,
                &authority,
                started,
                format!("refused with 421: {why}"),
            );
            return;
        }
    };
    drop(table);
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("static response");
    let send = match respond.send_response(ok, false) {
        Ok(send) => send,
        Err(e) => {
            log::debug!("waypoint: stream from {peer} gone before 200: {e}");
            return;
        }
    };
    let info = Arc::new(StreamInfo {
        peer,
        client: forwarded_for(request.headers()).unwrap_or(peer),
        client_namespace: authz::namespace_of(peer_identity.as_deref().unwrap_or("")).to_string(),
        source_principal: peer_identity.unwrap_or_else(|| Arc::from("")),
        target,
    });
    let mut io = H2Io::new(send, request.into_body());
    let protocol = match protocol {
        Protocol::Detect => detect(&mut io).await,
        known => known,
    };
    let served = async {
        match protocol {
            Protocol::Tcp => carry_tcp(io, &info, &ctx, &waypoint).await,
            http => {
                requests::serve(io, http == Protocol::Http2, info.clone(), &ctx, &waypoint).await
            }
        }
    };
    tokio::select! {
        biased;
        () = served => {}
        _reason = ctx.scope.cut() => Stats::inc(&stats.connections_cut),
    }
}

/// The protocol to read a stream to `target` with, or why this waypoint does not take it.
fn bound_protocol(table: &Table, target: SocketAddr) -> Result<Protocol, String> {
    match table.targets.get(&target.ip()) {
        None => Err(format!(
            "{} is not a Service VIP or pod IP bound to this waypoint",
            target.ip()
        )),
        Some(Target::Workload { .. }) => Ok(Protocol::Detect),
        Some(Target::Service { service }) => {
            let service = &table.services[*service];
            match service.ports.get(&target.port()) {
                Some(port) => Ok(port.protocol),
                None => Err(format!(
                    "port {} is not a port of Service {}",
                    target.port(),
                    service.name
                )),
            }
        }
    }
}

/// HTTP/1.x (a method token and a space) or the HTTP/2 preface; anything else, or silence, is TCP.
async fn detect(io: &mut H2Io) -> Protocol {
    let first = match tokio::time::timeout(DETECT_TIMEOUT, io.peek()).await {
        Ok(Ok(bytes)) => bytes,
        _ => return Protocol::Tcp,
    };
    if first.starts_with(b"PRI * HTTP/2.0") {
        return Protocol::Http2;
    }
    let token = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if token > 0 && first.get(token) == Some(&b' ') {
        Protocol::Http
    } else {
        Protocol::Tcp
    }
}

/// A TCP port at the waypoint: one endpoint per stream (least-request), bytes carried as they are.
async fn carry_tcp(io: H2Io, info: &StreamInfo, ctx: &InboundContext, waypoint: &Waypoint) {
    let table = waypoint.table();
    let Some(choice) = balance::endpoint_for_stream(&table, info) else {
        log::warn!(
            "waypoint: TCP stream from {} to {}: no ready endpoint",
            info.peer,
            info.target
        );
        return;
    };
    let endpoint = &table.endpoints[choice.0];
    let key = UpstreamKey {
        address: SocketAddr::new(endpoint.ip, choice.1),
        hbone: endpoint.hbone.map(|h| (h, endpoint.identity.clone())),
        http2: false,
    };
    let _active = balance::Active::new(&table, choice.0);
    let counters = waypoint.table.get().metrics.stream_counters(StreamKey {
        source_principal: info.source_principal.clone(),
        source_ip: Some(info.client.ip()),
        service: requests::service_name(&table, info.target),
        endpoint: endpoint.name.clone(),
        endpoint_principal: endpoint.identity.clone(),
    });
    let labelled: &Counters = counters.get();
    let count = ConnectionCount::open(Some(labelled));
    let (down_send, down_recv, first) = io.into_parts();
    let down_read = || Prefixed {
        first: Some(first.clone()),
        inner: H2Reader(down_recv),
    };
    let stats = &ctx.shared.stats;
    let transferred = Transferred::default();
    let closing = CancellationToken::new();
    let cut = Cut::by([ctx.scope.hard.clone(), closing]);
    let result = match waypoint.dialer.stream(&key).await {
        Ok(upstream::Stream::Hbone(send, recv, _lease)) => {
            copy::bidirectional(
                (down_read(), H2Writer(down_send, cut.clone())),
                (H2Reader(recv), H2Writer(send, cut)),
                stats,
                &transferred,
                Some(labelled),
            )
            .await
        }
        Ok(upstream::Stream::Tcp(tcp)) => {
            let (r, w) = tcp.into_split();
            copy::bidirectional(
                (down_read(), H2Writer(down_send, cut.clone())),
                (StreamReader::new(r), StreamWriter::new(w, cut)),
                stats,
                &transferred,
                Some(labelled),
            )
            .await
        }
        Err(e) => {
            count.finish(Flag::Connect);
            waypoint
                .counts()
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "waypoint: TCP stream from {} to {}: {e}",
                info.peer,
                info.target
            );
            return;
        }
    };
    count.finish(if result.is_ok() {
        Flag::None
    } else {
        Flag::Connect
    });
    if let Err(e) = result {
        log::debug!(
            "waypoint: TCP stream {} -> {} ended after {}/{} bytes: {e}",
            info.peer,
            key.address,
            transferred.sent(),
            transferred.received()
        );
    }
}
