//! CUSTOM authorization at the waypoint: a request some CUSTOM AuthorizationPolicy matches is
//! first checked by the HTTP external authorizer the policy names (the mesh config's
//! `extensionProviders[].envoyExtAuthzHttp`, Envoy's `ext_authz` over HTTP).
//!
//! The check is a request with the original method and path (after `pathPrefix`), no body, and
//! the request's headers the provider lists (`includeRequestHeadersInCheck`, exact, `prefix*` or
//! `*suffix`; none listed: only the method, path and host travel) plus its fixed
//! `includeAdditionalHeadersInCheck`. It goes to an endpoint of the authorizer's Service as any
//! request does (HBONE when in the mesh). A 2xx answer allows: the headers named in
//! `headersToUpstreamOnAllow` are set on the request, those in `headersToDownstreamOnAllow` on
//! its response. Any other answer is returned to the client as it is (status, body, and the
//! headers `headersToDownstreamOnDeny` names, all but Host when it names none). No answer
//! within `timeout` (or no endpoint): `failOpen` lets the request on, else `statusOnError`
//! (403 by default).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;

use super::balance::{least_request, Active};
use super::bodies::empty_body;
use super::filters::{authority, upstream_request};
use super::table::{Backend, Protocol, Table};
use super::upstream::UpstreamKey;
use super::Waypoint;

/// The most of an authorizer's denial body passed back to the client.
const MAX_DENIAL_BODY: usize = 64 * 1024;

#[derive(Deserialize, Debug)]
pub struct ProviderSpec {
    pub name: String,
    /// The authorizer's Service and port as a backend (its `invalid` says why it cannot be
    /// called: a Service not in the mesh).
    pub backend: Backend,
    pub timeout: f64,
    #[serde(default)]
    pub path_prefix: String,
    #[serde(default)]
    pub include_headers: Vec<String>,
    #[serde(default)]
    pub additional_headers: Vec<(String, String)>,
    #[serde(default)]
    pub upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub downstream_on_allow: Vec<String>,
    #[serde(default)]
    pub downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub fail_open: bool,
    pub status_on_error: u16,
}

/// A header name pattern, as Istio takes them in these lists: exact, `prefix*` or `*suffix`.
enum NamePattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl NamePattern {
    fn new(text: &str) -> Self {
        let text = text.to_ascii_lowercase();
        if let Some(p) = text.strip_suffix('*') {
            NamePattern::Prefix(p.to_string())
        } else if let Some(s) = text.strip_prefix('*') {
            NamePattern::Suffix(s.to_string())
        } else {
            NamePattern::Exact(text)
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(e) => name == e,
            NamePattern::Prefix(p) => name.starts_with(p.as_str()),
            NamePattern::Suffix(s) => name.ends_with(s.as_str()),
        }
    }
}

fn any(patterns: &[NamePattern], name: &str) -> bool {
    patterns.iter().any(|p| p.matches(name))
}

pub struct Provider {
    pub name: Arc<str>,
    backend: Backend,
    timeout: Duration,
    path_prefix: String,
    include: Vec<NamePattern>,
    additional: Vec<(HeaderName, HeaderValue)>,
    upstream_on_allow: Vec<NamePattern>,
    downstream_on_allow: Vec<NamePattern>,
    downstream_on_deny: Vec<NamePattern>,
    fail_open: bool,
    status_on_error: StatusCode,
}

impl Provider {
    pub fn from_spec(spec: ProviderSpec) -> Result<Self, String> {
        let at = format!("ext_authz provider {}", spec.name);
        let additional = spec
            .additional_headers
            .iter()
            .map(|(n, v)| {
                Ok((
                    HeaderName::try_from(n.as_str())
                        .map_err(|_| format!("{at}: bad header name {n:?}"))?,
                    HeaderValue::try_from(v.as_str())
                        .map_err(|_| format!("{at}: bad header value {v:?}"))?,
                ))
            })
            .collect::<Result<_, String>>()?;
        let patterns = |list: &[String]| list.iter().map(|t| NamePattern::new(t)).collect();
        Ok(Provider {
            name: Arc::from(spec.name.as_str()),
            timeout: Duration::try_from_secs_f64(spec.timeout)
                .map_err(|_| format!("{at}: bad timeout {}", spec.timeout))?,
            status_on_error: StatusCode::from_u16(spec.status_on_error)
                .map_err(|_| format!("{at}: bad statusOnError {}", spec.status_on_error))?,
            include: patterns(&spec.include_headers),
            upstream_on_allow: patterns(&spec.upstream_on_allow),
            downstream_on_allow: patterns(&spec.downstream_on_allow),
            downstream_on_deny: patterns(&spec.downstream_on_deny),
            additional,
            backend: spec.backend,
            path_prefix: spec.path_prefix,
            fail_open: spec.fail_open,
        })
    }

    pub fn endpoints(&self) -> impl Iterator<Item = usize> + '_ {
        self.backend.endpoints.iter().map(|(i, _)| *i)
    }
}

/// What the authorizer said.
pub enum Checked {
    /// Allowed: set these on the request, add those to its response.
    Allowed {
        upstream: HeaderMap,
        downstream: HeaderMap,
    },
    /// Its denial, to return to the client as it is.
    Denied {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// No answer: the text says why; `failOpen` decides.
    Failed { why: String, status: StatusCode },
}

/// Ask `provider` about the request `parts`.
pub async fn check(
    provider: &Provider,
    table: &Arc<Table>,
    waypoint: &Waypoint,
    parts: &http::request::Parts,
) -> Checked {
    let failed = |why: String| {
        if provider.fail_open {
            Checked::Allowed {
                upstream: HeaderMap::new(),
                downstream: HeaderMap::new(),
            }
        } else {
            Checked::Failed {
                why,
                status: provider.status_on_error,
            }
        }
    };
    if let Some(why) = &provider.backend.invalid {
        return failed(format!("its service {}: {why}", provider.backend.service));
    }
    let Some((endpoint_index, port)) = least_request(table, &provider.backend.endpoints) else {
        return failed(format!(
            "its service {} has no ready endpoint",
            provider.backend.service
        ));
    };
    let endpoint = &table.endpoints[endpoint_index];
    let key = UpstreamKey {
        address: SocketAddr::new(endpoint.ip, port),
        hbone: endpoint.hbone.map(|h| (h, endpoint.identity.clone())),
        http2: provider.backend.protocol == Protocol::Http2,
    };
    let _active = Active::new(table, endpoint_index);
    let request = check_request(provider, parts, key.http2);
    let send = async {
        let response = waypoint
            .upstreams
            .send(&key, request, &waypoint.dialer)
            .await
            .map_err(|e| e.to_string())?;
        let (head, body) = response.into_parts();
        let body = Limited::new(body, MAX_DENIAL_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading its answer: {e}"))?
            .to_bytes();
        Ok::<_, String>((head, body))
    };
    let (head, body) = match tokio::time::timeout(provider.timeout, send).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(why)) => return failed(format!("calling {}: {why}", key.address)),
        Err(_) => {
            return failed(format!(
                "{} did not answer within {:?}",
                key.address, provider.timeout
            ))
        }
    };
    if head.status.is_success() {
        return Checked::Allowed {
            upstream: pick(&head.headers, &provider.upstream_on_allow),
            downstream: pick(&head.headers, &provider.downstream_on_allow),
        };
    }
    let mut headers = if provider.downstream_on_deny.is_empty() {
        let mut all = head.headers.clone();
        all.remove(header::HOST);
        for h in [
            header::CONNECTION,
            header::TRANSFER_ENCODING,
            header::CONTENT_LENGTH,
        ] {
            all.remove(h);
        }
        all
    } else {
        pick(&head.headers, &provider.downstream_on_deny)
    };
    headers.remove(header::CONTENT_LENGTH);
    Checked::Denied {
        status: head.status,
        headers,
        body,
    }
}

/// The headers of `from` whose names match `patterns`.
fn pick(from: &HeaderMap, patterns: &[NamePattern]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in from {
        if any(patterns, name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The check: the request's method, host and path (after the prefix), the headers the
/// provider takes, no body.
fn check_request(
    provider: &Provider,
    parts: &http::request::Parts,
    http2: bool,
) -> Request<super::upstream::Body> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(
            format!("{}{path}", provider.path_prefix)
                .parse::<Uri>()
                .unwrap_or_else(|_| Uri::from_static("/")),
        )
        .header(header::HOST, authority(parts));
    let headers = builder.headers_mut().expect("a valid builder");
    for (name, value) in &parts.headers {
        if name != header::HOST && any(&provider.include, name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &provider.additional {
        headers.insert(name.clone(), value.clone());
    }
    let request = builder.body(()).expect("a valid check request");
    let (check_parts, ()) = request.into_parts();
    upstream_request(check_parts, empty_body(), None, http2, false)
}
