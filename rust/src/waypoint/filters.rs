//! What the waypoint does to a request's head on its way to an endpoint: the route's filters
//! (header modifiers, redirect, rewrite), hop-by-hop headers dropped, `x-request-id` and
//! `traceparent` added when absent, the URI in the form the upstream protocol wants.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};

use super::bodies::text_response;
use super::table::{HeaderModifier, PathModifier, Rule};
use super::upstream::Body;
use crate::hbone::client::{lower_hex, new_traceparent};

/// Istio's waypoint adds one when a request has none, so a request can be followed hop by hop.
pub(super) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(super) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Headers that belong to one connection (RFC 9110 §7.6.1), never forwarded as they are.
pub(super) const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(super) fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
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
pub(super) fn modified_path(path: &str, modifier: &PathModifier, prefix: Option<&str>) -> String {
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

/// The request's authority as sent: `:authority` (HTTP/2, absolute form), else `Host`; "" if
/// neither.
pub(super) fn authority(parts: &http::request::Parts) -> &str {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

/// The request's host (authority without the port) and port, from `:authority` or `Host`.
pub(super) fn host_and_port(parts: &http::request::Parts) -> (String, Option<u16>) {
    match authority(parts).parse::<Authority>() {
        Ok(a) => (a.host().to_string(), a.port_u16()),
        Err(_) => (String::new(), None),
    }
}

pub(super) fn redirect(
    parts: &http::request::Parts,
    rule: &Rule,
    prefix: Option<&str>,
) -> Response<Body> {
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

/// A random (version 4) UUID, as Envoy generates `x-request-id`.
pub(super) fn random_request_id() -> HeaderValue {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = 0x40 | (bytes[6] & 0x0f); // version 4
    bytes[8] = 0xa0 | (bytes[8] & 0x0f); // variant 10xx (written as `a`, as before)
    let mut text = *b"________-____-____-____-____________";
    lower_hex(&bytes[..4], &mut text[..8]);
    lower_hex(&bytes[4..6], &mut text[9..13]);
    lower_hex(&bytes[6..8], &mut text[14..18]);
    lower_hex(&bytes[8..10], &mut text[19..23]);
    lower_hex(&bytes[10..], &mut text[24..]);
    HeaderValue::from_bytes(&text).expect("hex is a valid header")
}

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none (and name none: `Connection` is one of them): one look at the
    // names present instead of hashing each hop-by-hop name to remove it.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
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
pub(super) fn upstream_request(
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
    // Rewritten, or the request's own (a cheap clone of its bytes).
    let mut rewritten_path: Option<String> = None;
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
                rewritten_path = Some(match parts.uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                });
            }
        }
    }
    if !parts.headers.contains_key(TRACEPARENT) {
        parts.headers.insert(TRACEPARENT, new_traceparent());
    }
    let pq = match rewritten_path {
        Some(p) => PathAndQuery::try_from(p).ok(),
        None => parts.uri.path_and_query().cloned(),
    }
    .unwrap_or_else(|| PathAndQuery::from_static("/"));
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

/// A request head again, to send it once more (its extensions are not carried over).
pub(super) fn copy_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.uri_mut() = parts.uri.clone();
    *copy.version_mut() = parts.version;
    *copy.headers_mut() = parts.headers.clone();
    copy.into_parts().0
}

/// `host-shadow[:port]`: how a mirrored request says it is one (as Envoy marks it).
pub(super) fn shadow(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    }
}

/// `uri` with `path` in place of its path (query kept).
pub(super) fn normalize_uri(uri: &mut http::Uri, path: &str) {
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    set_path_and_query(uri, path_and_query);
}

pub(super) fn set_path_and_query(uri: &mut http::Uri, path_and_query: String) {
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = http::uri::PathAndQuery::try_from(path_and_query) {
        parts.path_and_query = Some(pq);
        if let Ok(normal) = http::Uri::from_parts(parts) {
            *uri = normal;
        }
    }
}
