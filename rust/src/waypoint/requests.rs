//! HTTP at the waypoint: hyper serves the HTTP/1.1 or HTTP/2 inside an accepted HBONE stream;
//! every request is routed by the table (route, then backend by weight, then endpoint by least
//! request), its route's filters applied, and sent to the endpoint (`upstream`). Bodies stream
//! through in both directions; nothing is buffered whole.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use super::table::{
    Backend, HeaderModifier, Mirror, PathModifier, Protocol, Routed, Rule, Table, Target,
};
use super::telemetry::{Exchange, SeriesKey};
use super::upstream::{Body, UpstreamError, UpstreamKey};
use super::{StreamInfo, Waypoint};
use crate::hbone::io::H2Io;
use crate::hbone::server::InboundContext;

/// Istio's waypoint adds one when a request has none, so a request can be followed hop by hop.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Headers that belong to one connection (RFC 9110 §7.6.1), never forwarded as they are.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Serve HTTP on one HBONE stream until the client closes it (or the listener drains: then the
/// connection finishes its request and closes).
pub async fn serve(
    io: H2Io,
    http2_only: bool,
    info: Arc<StreamInfo>,
    ctx: &InboundContext,
    waypoint: &Arc<Waypoint>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    if http2_only {
        builder = builder.http2_only();
    }
    let service_waypoint = waypoint.clone();
    let service = hyper::service::service_fn(move |request| {
        let waypoint = service_waypoint.clone();
        let info = info.clone();
        async move { Ok::<_, Infallible>(handle(request, &info, &waypoint).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    log::debug!("waypoint: HTTP connection ended: {e}");
                }
                return;
            }
            _ = ctx.scope.draining.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A request in flight to an endpoint, counted for least-request balancing until dropped.
pub struct Active {
    table: Arc<Table>,
    endpoint: usize,
}

impl Active {
    pub fn new(table: &Arc<Table>, endpoint: usize) -> Self {
        table.endpoints[endpoint]
            .active
            .fetch_add(1, Ordering::Relaxed);
        Self {
            table: table.clone(),
            endpoint,
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.table.endpoints[self.endpoint]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The less loaded of two endpoints picked at random (Envoy's least-request with two choices,
/// Istio's default), or the only one.
fn least_request(table: &Table, candidates: &[(usize, u16)]) -> Option<(usize, u16)> {
    let load = |c: &(usize, u16)| table.endpoints[c.0].active.load(Ordering::Relaxed);
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = rand::random_range(0..n);
            let mut b = rand::random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            Some(if load(&b) < load(&a) { b } else { a })
        }
    }
}

/// A backend by weight (weight 0 is never chosen); None when every weight is 0.
fn weighted(backends: &[Backend]) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut pick = rand::random_range(0..total);
    for b in backends {
        let w = u64::from(b.weight);
        if pick < w {
            return Some(b);
        }
        pick -= w;
    }
    None
}

/// The endpoint for a stream to a TCP port: a pod target is its own endpoint; a Service's is
/// picked by least request among its endpoints on that port.
pub fn endpoint_for_stream(table: &Table, info: &StreamInfo) -> Option<(usize, u16)> {
    match table.targets.get(&info.target.ip())? {
        Target::Workload { endpoint } => Some((*endpoint, info.target.port())),
        Target::Service { service } => {
            let port = table.services[*service].ports.get(&info.target.port())?;
            let backend = weighted(&port.default.backends)?;
            least_request(table, &backend.endpoints)
        }
    }
}

/// Why a request got no upstream: the response, and the flag Istio logs for it.
struct Refusal {
    status: StatusCode,
    flag: &'static str,
    text: String,
}

fn refuse(status: StatusCode, flag: &'static str, text: String) -> Refusal {
    Refusal { status, flag, text }
}

/// Where a request goes: the endpoint, the protocol to speak, and the rule that sent it there.
struct Destination<'a> {
    endpoint: usize,
    port: u16,
    http2: bool,
    rule: Option<(&'a Rule, Option<&'a str>)>,
    /// The backend the endpoint was picked from (a retry picks another of its endpoints).
    backend: Option<&'a Backend>,
}

/// Route a request (or refuse it) with `table`.
fn route<'a>(
    table: &'a Table,
    info: &StreamInfo,
    head: &super::table::Head<'_>,
) -> Result<Destination<'a>, Refusal> {
    let target = table.targets.get(&info.target.ip()).ok_or_else(|| {
        refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "NR",
            format!("{} is no longer bound to this waypoint", info.target.ip()),
        )
    })?;
    let service = match target {
        Target::Workload { endpoint } => {
            // Direct to a pod: forwarded to it, no routing; the protocol as it came.
            return Ok(Destination {
                endpoint: *endpoint,
                port: info.target.port(),
                http2: false,
                rule: None,
                backend: None,
            });
        }
        Target::Service { service } => &table.services[*service],
    };
    let port = service.ports.get(&info.target.port()).ok_or_else(|| {
        refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "NR",
            format!(
                "port {} is no longer a port of {}",
                info.target.port(),
                service.name
            ),
        )
    })?;
    let (rule, prefix) = match port.route(head, &info.client_namespace) {
        Routed::Rule(rule, prefix) => (rule, prefix),
        Routed::NoRoute => {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "NR",
                format!("no rule of the routes attached to {} matches", service.name),
            ))
        }
    };
    if rule.redirect.is_some() {
        return Ok(Destination {
            endpoint: usize::MAX,
            port: 0,
            http2: false,
            rule: Some((rule, prefix)),
            backend: None,
        });
    }
    if rule.backends.is_empty() {
        return Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "NR",
            format!("route {} has no backend", rule.route),
        ));
    }
    let Some(backend) = weighted(&rule.backends) else {
        return Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "NR",
            format!("every backend of route {} has weight 0", rule.route),
        ));
    };
    if let Some(why) = &backend.invalid {
        return Err(refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "NR",
            format!("route {}: backend {}: {why}", rule.route, backend.service),
        ));
    }
    let Some((endpoint, port)) = least_request(table, &backend.endpoints) else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            format!("backend {} has no ready endpoint", backend.service),
        ));
    };
    Ok(Destination {
        endpoint,
        port,
        http2: backend.protocol == Protocol::Http2,
        rule: Some((rule, prefix)),
        backend: Some(backend),
    })
}

fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    // Names and values were checked when the table was loaded.
    for (name, value) in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// The path after a path modifier; `prefix` is the PathPrefix the request matched.
fn modified_path(path: &str, modifier: &PathModifier, prefix: Option<&str>) -> String {
    match modifier {
        PathModifier::ReplaceFullPath { value } => value.clone(),
        PathModifier::ReplacePrefixMatch { value } => {
            let rest = &path[prefix.unwrap_or("").len().min(path.len())..];
            let mut out = value.trim_end_matches('/').to_string();
            if !rest.is_empty() {
                out.push_str(rest);
            }
            if out.is_empty() {
                out.push('/');
            }
            out
        }
    }
}

/// The request's host (authority without the port) and port, from `:authority` or `Host`.
fn host_and_port(parts: &http::request::Parts) -> (String, Option<u16>) {
    let authority = parts.uri.authority().cloned().or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<Authority>().ok())
    });
    match authority {
        Some(a) => (a.host().to_string(), a.port_u16()),
        None => (String::new(), None),
    }
}

fn redirect(parts: &http::request::Parts, rule: &Rule, prefix: Option<&str>) -> Response<Body> {
    let r = rule.redirect.as_ref().expect("a redirect rule");
    let (host, request_port) = host_and_port(parts);
    let scheme = r.scheme.clone().unwrap_or_else(|| "http".to_string());
    let host = r.hostname.clone().unwrap_or(host);
    // Gateway API: an explicit port; else, with a scheme given, that scheme's port; else the
    // request's. A scheme's well-known port is left out of the Location.
    let port = r.port.or(if r.scheme.is_some() {
        None
    } else {
        request_port
    });
    let well_known = matches!(
        (scheme.as_str(), port),
        ("http", Some(80)) | ("https", Some(443))
    );
    let path = match &r.path {
        Some(m) => modified_path(parts.uri.path(), m, prefix),
        None => parts.uri.path().to_string(),
    };
    let mut location = format!("{scheme}://{host}");
    if let (Some(p), false) = (port, well_known) {
        location.push_str(&format!(":{p}"));
    }
    location.push_str(&path);
    if let Some(q) = parts.uri.query() {
        location.push('?');
        location.push_str(q);
    }
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    let mut response = text_response(status, String::new());
    if let Ok(v) = HeaderValue::try_from(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

fn random_request_id() -> HeaderValue {
    let v: u128 = rand::random();
    let h = format!("{v:032x}");
    let text = format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..]
    );
    HeaderValue::try_from(text).expect("hex is a valid header")
}

fn new_traceparent() -> HeaderValue {
    let trace: u128 = rand::random();
    let span: u64 = rand::random();
    HeaderValue::try_from(format!("00-{trace:032x}-{span:016x}-01")).expect("hex")
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // `TE: trailers` says the client takes trailers; it is the one TE value HTTP/2 allows
    // (RFC 9113 §8.2.2) and gRPC servers require it, so it goes on.
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        if keep_upgrade && (name == header::UPGRADE || name == header::CONNECTION) {
            continue;
        }
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The request as it leaves for the endpoint: filters applied, hop-by-hop headers dropped,
/// `x-request-id` and `traceparent` present, the URI in the form the upstream protocol wants.
fn upstream_request(
    mut parts: http::request::Parts,
    body: Body,
    rule: Option<(&Rule, Option<&str>)>,
    http2: bool,
    upgrade: bool,
) -> Request<Body> {
    let (host, port) = host_and_port(&parts);
    let mut authority = match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    let mut path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some((rule, prefix)) = rule {
        if let Some(m) = &rule.request_headers {
            modify_headers(&mut parts.headers, m);
        }
        if let Some(rewrite) = &rule.rewrite {
            if let Some(h) = &rewrite.hostname {
                authority = h.clone();
            }
            if let Some(m) = &rewrite.path {
                let path = modified_path(parts.uri.path(), m, prefix);
                path_and_query = match parts.uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                };
            }
        }
    }
    if !parts.headers.contains_key(TRACEPARENT) {
        parts.headers.insert(TRACEPARENT, new_traceparent());
    }
    let pq =
        PathAndQuery::try_from(path_and_query).unwrap_or_else(|_| PathAndQuery::from_static("/"));
    if http2 {
        parts.headers.remove(header::HOST);
        let mut uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .path_and_query(pq.clone());
        if !authority.is_empty() {
            uri = uri.authority(authority.as_str());
        }
        parts.uri = uri.build().unwrap_or_else(|_| Uri::from(pq));
        parts.version = Version::HTTP_2;
    } else {
        if let Ok(v) = HeaderValue::try_from(authority.as_str()) {
            if !authority.is_empty() {
                parts.headers.insert(header::HOST, v);
            }
        }
        parts.uri = Uri::from(pq);
        parts.version = Version::HTTP_11;
    }
    Request::from_parts(parts, body)
}

/// A response body on its way to the client: its bytes counted, its endpoint counted as busy,
/// and its request reported once it is done (or the client went away: `DC`).
struct Tracked<B> {
    body: B,
    exchange: Arc<Exchange>,
    status: u16,
    waypoint: Arc<Waypoint>,
    _active: Option<Active>,
    ended: bool,
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        let (flags, details) = if self.ended {
            ("-", None)
        } else {
            (
                "DC",
                Some("the client went away before the whole response was sent"),
            )
        };
        self.exchange.finish(
            self.status,
            flags,
            details,
            &self.waypoint.table.get().metrics,
            self.waypoint.access_log.as_ref(),
        );
    }
}

impl<B> HttpBody for Tracked<B>
where
    B: HttpBody<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.exchange
                        .response_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                if self.body.is_end_stream() {
                    self.ended = true;
                }
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body on its way to the endpoint, its bytes counted for the report.
struct CountedRequest {
    body: Incoming,
    bytes: Arc<AtomicU64>,
}

impl HttpBody for CountedRequest {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn seconds(limit: Option<f64>) -> Option<Duration> {
    limit
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| !d.is_zero())
}

/// The Service a stream was sent to (`namespace/name`), "" for a pod.
pub fn service_name(table: &Table, target: SocketAddr) -> Arc<str> {
    match table.targets.get(&target.ip()) {
        Some(Target::Service { service }) => table.services[*service].name.clone(),
        _ => Arc::from(""),
    }
}

/// The report of a request, begun when its head is in.
fn exchange(parts: &http::request::Parts, info: &StreamInfo, service: Arc<str>) -> Exchange {
    let text = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (host, port) = host_and_port(parts);
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    Exchange {
        started: Instant::now(),
        method: parts.method.to_string(),
        authority: match port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        },
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        protocol: match parts.version {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        request_id: text(&REQUEST_ID).unwrap_or_default(),
        user_agent: text(&header::USER_AGENT),
        client: info.client,
        key: SeriesKey {
            source_principal: info.source_principal.clone(),
            source_ip: Some(info.client.ip()),
            service,
            endpoint: Arc::from(""),
            endpoint_principal: Arc::from(""),
            code: 0,
            grpc,
            flags: "-",
        },
        route: Arc::from(""),
        upstream: None,
        request_bytes: Arc::default(),
        response_bytes: AtomicU64::new(0),
    }
}

/// A response the waypoint makes itself (a refusal, a redirect), reported at once.
fn local(
    exchange: &Exchange,
    response: Response<Body>,
    flags: &'static str,
    details: Option<&str>,
    waypoint: &Waypoint,
) -> Response<Body> {
    let status = response.status().as_u16();
    waypoint.counts().answered(status);
    let metrics = &waypoint.table.get().metrics;
    exchange.finish(
        status,
        flags,
        details,
        metrics,
        waypoint.access_log.as_ref(),
    );
    response
}

/// One request: route, filter, balance, forward; the response streams back.
async fn handle(
    request: Request<Incoming>,
    info: &StreamInfo,
    waypoint: &Arc<Waypoint>,
) -> Response<Body> {
    let table = waypoint.table();
    let counts = waypoint.counts();
    let (mut parts, body) = request.into_parts();
    if !parts.headers.contains_key(REQUEST_ID) {
        parts.headers.insert(REQUEST_ID, random_request_id());
    }
    let mut report = exchange(&parts, info, service_name(&table, info.target));
    let destination = {
        let head = super::table::Head {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        route(&table, info, &head)
    };
    let destination = match destination {
        Ok(d) => d,
        Err(r) => {
            let counter = match r.flag {
                "UH" => &counts.no_healthy_upstream,
                _ => &counts.no_route,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "waypoint: {} {} from {} answered {} ({}): {}",
                parts.method,
                parts.uri,
                info.peer,
                r.status.as_u16(),
                r.flag,
                r.text
            );
            let response = text_response(r.status, format!("{}\n", r.text));
            return local(&report, response, r.flag, Some(&r.text), waypoint);
        }
    };
    if let Some((rule, prefix)) = destination.rule {
        report.route = rule.route.clone();
        if rule.redirect.is_some() {
            let response = redirect(&parts, rule, prefix);
            return local(&report, response, "-", None, waypoint);
        }
    }
    let upgrade = parts.headers.contains_key(header::UPGRADE) && parts.version == Version::HTTP_11;
    let downstream_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let rule = destination.rule.map(|(r, _)| r);
    // A request without a body can be sent again (retried, mirrored); one with a body streams to
    // one endpoint, once: nothing is buffered to replay it.
    let replayable = body.is_end_stream() && !upgrade;
    if replayable {
        for mirror in rule.map(|r| r.mirrors.as_slice()).unwrap_or_default() {
            mirror_request(waypoint, &table, &parts, destination.rule, mirror);
        }
    }
    let retry = rule.and_then(|r| r.retry.as_ref()).filter(|_| replayable);
    let attempts = 1 + retry.map_or(0, |r| r.attempts);
    let started = Instant::now();
    let overall = rule.and_then(|r| seconds(r.request_timeout));
    let per_try = rule.and_then(|r| seconds(r.backend_timeout));
    let mut streamed = Some(body);
    let mut tried: Vec<usize> = Vec::with_capacity(attempts as usize);
    let mut endpoint_index = destination.endpoint;
    let mut port = destination.port;
    let mut attempt = 0;
    let (mut response, active) = loop {
        attempt += 1;
        if attempt > 1 {
            let backoff = retry.map_or(0.0, |r| r.backoff);
            tokio::time::sleep(Duration::from_secs_f64(backoff)).await;
            if let Some((i, p)) = destination
                .backend
                .and_then(|b| retry_endpoint(&table, b, &tried))
            {
                (endpoint_index, port) = (i, p);
            }
        }
        tried.push(endpoint_index);
        let endpoint = &table.endpoints[endpoint_index];
        let key = UpstreamKey {
            address: SocketAddr::new(endpoint.ip, port),
            hbone: endpoint.hbone.map(|h| (h, endpoint.identity.clone())),
            http2: destination.http2,
        };
        report.key.endpoint = endpoint.name.clone();
        report.key.endpoint_principal = endpoint.identity.clone();
        report.upstream = Some(key.address);
        let active = Active::new(&table, endpoint_index);
        let (attempt_parts, attempt_body) = match streamed.take() {
            Some(body) if !replayable => (
                {
                    let copy = copy_parts(&parts);
                    std::mem::replace(&mut parts, copy)
                },
                CountedRequest {
                    body,
                    bytes: report.request_bytes.clone(),
                }
                .boxed(),
            ),
            _ => (copy_parts(&parts), empty_body()),
        };
        let outgoing = upstream_request(
            attempt_parts,
            attempt_body,
            destination.rule,
            key.http2,
            upgrade,
        );
        let send = waypoint.upstreams.send(&key, outgoing, &waypoint.dialer);
        let left = overall.map(|o| o.saturating_sub(started.elapsed()));
        let limit = earliest(per_try, left);
        let result = match limit {
            Some(limit) => match tokio::time::timeout(limit, send).await {
                Ok(result) => result,
                Err(_) => {
                    counts.timeouts.fetch_add(1, Ordering::Relaxed);
                    let text = format!("upstream {} did not answer within {limit:?}", key.address);
                    let response = text_response(StatusCode::GATEWAY_TIMEOUT, format!("{text}\n"));
                    return local(&report, response, "UT", Some(&text), waypoint);
                }
            },
            None => send.await,
        };
        let more = attempt < attempts;
        match result {
            Ok(response) => {
                let code = response.status().as_u16();
                let retriable = retry.is_some_and(|r| r.codes.contains(&code));
                if more && retriable {
                    log::debug!("waypoint: {} answered {code}: retrying", key.address);
                    continue;
                }
                if retriable && attempt > 1 {
                    // Retries exhausted: the last answer goes back, flagged.
                    counts.retries_exhausted.fetch_add(1, Ordering::Relaxed);
                    let response = response.map(BodyExt::boxed);
                    return local(&report, response, "URX", None, waypoint);
                }
                break (response, active);
            }
            Err(e) => {
                counts.upstream_failures.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "waypoint: request from {} ({}) to {} ({}): {e}",
                    info.peer,
                    info.source_principal,
                    key.address,
                    endpoint.name
                );
                // Istio's retry_on: connect-failure, refused-stream, unavailable. A stream that
                // failed after the request went out is not retried (it may have been served).
                if more && matches!(e, UpstreamError::Connect(_)) {
                    continue;
                }
                let text = match &e {
                    UpstreamError::Connect(why) => format!("upstream connect error: {why}"),
                    UpstreamError::Http(_) => format!("upstream request failed: {e}"),
                };
                let flags = if attempt > 1 { "URX" } else { "UF" };
                let response = text_response(StatusCode::SERVICE_UNAVAILABLE, format!("{text}\n"));
                return local(&report, response, flags, Some(&text), waypoint);
            }
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream_upgrade {
            let upstream = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::try_join!(downstream, upstream) {
                    Ok((down, up)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(down),
                            &mut TokioIo::new(up),
                        )
                        .await;
                    }
                    Err(e) => log::debug!("waypoint: upgrade failed: {e}"),
                }
            });
        }
    }
    let (mut parts, body) = response.into_parts();
    if !upgrade {
        strip_hop_by_hop(&mut parts.headers, false);
    }
    if let Some(m) = rule.and_then(|r| r.response_headers.as_ref()) {
        modify_headers(&mut parts.headers, m);
    }
    let status = parts.status.as_u16();
    counts.answered(status);
    let body = Tracked {
        body,
        exchange: Arc::new(report),
        status,
        waypoint: waypoint.clone(),
        _active: Some(active),
        ended: false,
    }
    .boxed();
    Response::from_parts(parts, body)
}

/// How long a mirrored request may take before it is dropped (nobody waits for its answer).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

fn empty_body() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A request head again, to send it once more (its extensions are not carried over).
fn copy_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.uri_mut() = parts.uri.clone();
    *copy.version_mut() = parts.version;
    *copy.headers_mut() = parts.headers.clone();
    copy.into_parts().0
}

/// The endpoint for a retry: least request among the backend's endpoints not tried yet (Envoy's
/// previous-hosts predicate), or None when every one was.
fn retry_endpoint(table: &Table, backend: &Backend, tried: &[usize]) -> Option<(usize, u16)> {
    let untried: Vec<(usize, u16)> = backend
        .endpoints
        .iter()
        .copied()
        .filter(|(i, _)| !tried.contains(i))
        .collect();
    least_request(table, &untried)
}

/// `host-shadow[:port]`: how a mirrored request says it is one (as Envoy marks it).
fn shadow(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    }
}

/// Send a copy of a request without a body to `mirror`'s backend (for its share of requests),
/// and forget it: its answer is read and dropped, its failure only logged.
fn mirror_request(
    waypoint: &Arc<Waypoint>,
    table: &Arc<Table>,
    parts: &http::request::Parts,
    rule: Option<(&Rule, Option<&str>)>,
    mirror: &Mirror,
) {
    if mirror.backend.invalid.is_some() || rand::random::<f64>() * 100.0 >= mirror.percent {
        return;
    }
    let Some((index, port)) = least_request(table, &mirror.backend.endpoints) else {
        return;
    };
    let endpoint = &table.endpoints[index];
    let key = UpstreamKey {
        address: SocketAddr::new(endpoint.ip, port),
        hbone: endpoint.hbone.map(|h| (h, endpoint.identity.clone())),
        http2: mirror.backend.protocol == Protocol::Http2,
    };
    let mut request = upstream_request(copy_parts(parts), empty_body(), rule, key.http2, false);
    if key.http2 {
        let shadowed = request
            .uri()
            .authority()
            .and_then(|a| Authority::try_from(shadow(a.as_str())).ok());
        if let Some(authority) = shadowed {
            let mut uri = request.uri().clone().into_parts();
            uri.authority = Some(authority);
            if let Ok(uri) = Uri::from_parts(uri) {
                *request.uri_mut() = uri;
            }
        }
    } else if let Some(host) = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        if let Ok(v) = HeaderValue::try_from(shadow(host)) {
            request.headers_mut().insert(header::HOST, v);
        }
    }
    waypoint.counts().mirrored.fetch_add(1, Ordering::Relaxed);
    let waypoint = waypoint.clone();
    let active = Active::new(table, index);
    tokio::spawn(async move {
        let _active = active;
        let send = async {
            let response = waypoint
                .upstreams
                .send(&key, request, &waypoint.dialer)
                .await?;
            // Read to the end, so the connection can carry the next request.
            response
                .into_body()
                .collect()
                .await
                .map_err(UpstreamError::Http)?;
            Ok::<_, UpstreamError>(())
        };
        match tokio::time::timeout(MIRROR_TIMEOUT, send).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::debug!("waypoint: mirrored request to {}: {e}", key.address),
            Err(_) => log::debug!("waypoint: mirrored request to {} timed out", key.address),
        }
    });
}

/// The smaller of two optional limits.
fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
