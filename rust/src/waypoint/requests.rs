//! HTTP at the waypoint: hyper serves the HTTP/1.1 or HTTP/2 inside an accepted HBONE stream;
//! every request is routed by the table (route, then backend by weight, then endpoint by least
//! request), its route's filters applied, and sent to the endpoint (`upstream`). Bodies stream
//! through in both directions; nothing is buffered whole.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use super::admission::{self, plugins_on_response, Filtering};
use super::authz::normalize_path;
use super::balance::{least_request, retry_endpoint, weighted, Active};
use super::bodies::{empty_body, text_response, CountedRequest, RequestBody, Tracked};
use super::filters::{
    copy_parts, host_and_port, modify_headers, normalize_uri, random_request_id, redirect, shadow,
    strip_hop_by_hop, upstream_request, REQUEST_ID,
};
use super::table::{Backend, Mirror, Protocol, Routed, Rule, Table, Target};
use super::telemetry::{Exchange, Head, SeriesKey};
use super::upstream::{Body, UpstreamError, UpstreamKey};
use super::{StreamInfo, Waypoint};
use crate::hbone::io::H2Io;
use crate::hbone::server::InboundContext;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serve HTTP on one HBONE stream until the client closes it (or the listener drains: then the
/// connection finishes its request and closes).
pub async fn serve(
    mut io: H2Io,
    http2_only: bool,
    info: Arc<StreamInfo>,
    ctx: &InboundContext,
    waypoint: &Arc<Waypoint>,
) {
    let service_waypoint = waypoint.clone();
    let service = hyper::service::service_fn(move |request| {
        let waypoint = service_waypoint.clone();
        let info = info.clone();
        async move { Ok::<_, Infallible>(handle(request, &info, &waypoint).await) }
    });
    // The version is decided here from the first bytes when they tell (they almost always
    // do), so the connection is hyper's HTTP/1 or HTTP/2 one itself; hyper-util's auto
    // connection, which wraps every read to look for the preface, is kept for a first frame
    // that is only the start of the preface.
    let version = if http2_only {
        Some(Version::HTTP_2)
    } else {
        match io.peek().await {
            Ok(first) if first.starts_with(H2_PREFACE) => Some(Version::HTTP_2),
            Ok(first) if !first.is_empty() && H2_PREFACE.starts_with(first) => None,
            _ => Some(Version::HTTP_11),
        }
    };
    let io = TokioIo::new(io);
    match version {
        Some(Version::HTTP_11) => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(io, service)
                .with_upgrades();
            until_done(conn, ctx, |c| c.graceful_shutdown()).await
        }
        Some(_) => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service);
            until_done(conn, ctx, |c| c.graceful_shutdown()).await
        }
        None => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let conn = builder.serve_connection_with_upgrades(io, service);
            until_done(conn, ctx, |c| c.graceful_shutdown()).await
        }
    }
}

/// Drive an HTTP connection to its end; when the listener drains, shut it down gracefully.
async fn until_done<C, E>(conn: C, ctx: &InboundContext, graceful_shutdown: fn(Pin<&mut C>))
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
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
                graceful_shutdown(conn.as_mut());
            }
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

/// The report of a request, begun when its head is in; `logged`: the waypoint writes an access
/// log, so the line's text fields are taken from the head.
fn exchange(
    parts: &http::request::Parts,
    info: &StreamInfo,
    service: Arc<str>,
    logged: bool,
    log_rule: Option<Arc<super::telemetry::LogRule>>,
) -> Exchange {
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    Exchange {
        started: Instant::now(),
        log_rule,
        head: logged.then(|| log_head(parts)),
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

fn log_head(parts: &http::request::Parts) -> Head {
    let text = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (host, port) = host_and_port(parts);
    Head {
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
    }
}

/// A response the waypoint makes itself (a refusal, a redirect), reported at once.
pub(super) fn local(
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
    let mut filtering = Filtering {
        body: RequestBody::Streamed(body),
        responders: Vec::new(),
        downstream: http::HeaderMap::new(),
    };
    if !parts.headers.contains_key(REQUEST_ID) {
        parts.headers.insert(REQUEST_ID, random_request_id());
    }
    // Authorization and routing see the normalized path, and so does the endpoint.
    if let Cow::Owned(normal) = normalize_path(parts.uri.path()) {
        normalize_uri(&mut parts.uri, &normal);
    }
    let bound = table.targets.get(&info.target.ip());
    let log_rule = bound.and_then(|t| table.access_log_for(t)).cloned();
    let logged = waypoint.access_log.is_some() && !log_rule.as_ref().is_some_and(|r| r.disabled);
    let mut report = exchange(
        &parts,
        info,
        service_name(&table, info.target),
        logged,
        log_rule,
    );
    // Everything before routing, in Istio's order (`admission`): a refusal is answered here.
    if let Err(response) = admission::admit(
        &table,
        bound,
        info,
        &mut parts,
        &mut filtering,
        waypoint,
        &report,
    )
    .await
    {
        return response;
    }
    let body = filtering.body;
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
    let mut head = Some(parts);
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
        // The last attempt (the only one, for a request with a body) sends the head itself; an
        // attempt that may be followed by another sends a copy.
        let attempt_parts = if attempt == attempts {
            head.take()
                .expect("the head is kept until the last attempt")
        } else {
            copy_parts(
                head.as_ref()
                    .expect("the head is kept until the last attempt"),
            )
        };
        let attempt_body = match streamed.take() {
            Some(body) if !replayable => CountedRequest {
                body,
                bytes: report.request_bytes.clone(),
            }
            .boxed(),
            _ => empty_body(),
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
    if !filtering.responders.is_empty() {
        let status = parts.status.as_u16();
        if let Some(failed) = plugins_on_response(
            &table,
            waypoint,
            filtering.responders,
            status,
            &mut parts.headers,
            &report,
        )
        .await
        {
            return failed;
        }
    }
    if let Some(m) = rule.and_then(|r| r.response_headers.as_ref()) {
        modify_headers(&mut parts.headers, m);
    }
    for (name, value) in std::mem::take(&mut filtering.downstream) {
        if let Some(name) = name {
            parts.headers.append(name, value);
        }
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
