//! What a request passes before it is routed, in Istio's order: CUSTOM authorization (an
//! external authorizer, `extauthz`), the Python filters of the AUTHN phase, JWT authentication
//! (`authn`), the AUTHZ filters, the AuthorizationPolicies (`authz`), then the STATS filters
//! (`plugins`). A refusal is the response the client gets, reported like any answer.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;

use super::authn::Refused;
use super::authz::{remote_ip, without_scheme, Request as AuthzRequest, RequestAuth};
use super::bodies::{empty_body, text_response, RequestBody};
use super::extauthz::{self, Checked};
use super::filters::{authority, set_path_and_query};
use super::plugins::{FilterRequest, Phase, Verdict};
use super::requests::local;
use super::table::{Table, Target};
use super::telemetry::Exchange;
use super::upstream::Body;
use super::{StreamInfo, Waypoint};

/// The checks a request sent to `bound` must pass, in order: `Err` is the answer to send
/// instead of routing it (denied, unauthenticated, answered or failed by a filter).
pub(super) async fn admit(
    table: &Arc<Table>,
    bound: Option<&Target>,
    info: &StreamInfo,
    parts: &mut http::request::Parts,
    filtering: &mut Filtering,
    waypoint: &Waypoint,
    report: &Exchange,
) -> Result<(), Response<Body>> {
    let counts = waypoint.counts();
    // The policies, JWT rules and filters of the Service (or pod) the stream was sent to; the
    // Python filters of each phase run before the step it names. Routing, after this, refuses
    // a target no longer bound.
    let plugins = bound.map_or(&[][..], |t| table.plugins_for(t));
    macro_rules! phase {
        ($phase:expr, $auth:expr) => {
            if !plugins.is_empty() {
                if let Some(response) = run_plugins(
                    $phase, plugins, table, waypoint, info, parts, filtering, $auth, report,
                )
                .await
                {
                    return Err(response);
                }
            }
        };
    }
    if let Some(response) =
        check_custom(table, bound, info, parts, filtering, waypoint, report).await
    {
        return Err(response);
    }
    phase!(Phase::Authn, None);
    let auth = match authenticate(table, bound, parts) {
        Ok(auth) => auth,
        Err(refused) => {
            counts.unauthenticated.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "waypoint: {} {} from {} ({}) refused its JWT: {}",
                parts.method,
                parts.uri,
                info.peer,
                info.source_principal,
                refused.reason
            );
            let details = format!("jwt_authn_access_denied{{{}}}", refused.reason);
            let mut response = text_response(StatusCode::UNAUTHORIZED, refused.reason.clone());
            if let Ok(v) = HeaderValue::from_str(&www_authenticate(parts)) {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return Err(local(report, response, "-", Some(&details), waypoint));
        }
    };
    phase!(Phase::Authz, auth.as_deref());
    if let Some(denied) = authorize(table, bound, info, parts, auth.as_deref()) {
        counts.denied.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "waypoint: {} {} from {} ({}) denied: {}",
            parts.method,
            parts.uri,
            info.peer,
            info.source_principal,
            denied
        );
        let response = text_response(StatusCode::FORBIDDEN, DENIED_BODY.to_string());
        return Err(local(report, response, "-", Some(&denied), waypoint));
    }
    phase!(Phase::Stats, auth.as_deref());
    Ok(())
}

/// The body of a request an AuthorizationPolicy denied (Envoy's, which Istio users match on).
const DENIED_BODY: &str = "RBAC: access denied";

/// The AuthorizationPolicies applying to this request, in Istio's order: None when allowed,
/// else what denied it, as Envoy's `response_code_details` says it.
fn authorize(
    table: &Table,
    bound: Option<&Target>,
    info: &StreamInfo,
    parts: &http::request::Parts,
    auth: Option<&RequestAuth>,
) -> Option<String> {
    let applying = table.policies_for(bound?);
    if applying.is_empty() {
        return None;
    }
    let request = authz_request(table, info, parts, auth);
    let verdict = table.policies.evaluate(applying, &request);
    for p in &verdict.logged {
        let kind = if p.dry_run { "dry-run" } else { "audit" };
        log::info!(
            "waypoint: {} {} from {}: {kind} {:?} policy {} matched",
            parts.method,
            parts.uri,
            info.source_principal,
            p.action,
            p.key
        );
    }
    if verdict.allowed {
        return None;
    }
    Some(match verdict.policy {
        Some(key) => format!("rbac_access_denied_matched_policy[{key}]"),
        None => "rbac_access_denied_matched_policy[none]: no ALLOW policy matched".to_string(),
    })
}

/// A request as AuthorizationPolicies see it.
fn authz_request<'a>(
    table: &Table,
    info: &'a StreamInfo,
    parts: &'a http::request::Parts,
    auth: Option<&'a RequestAuth>,
) -> AuthzRequest<'a> {
    let source_ip = info.client.ip();
    AuthzRequest {
        method: parts.method.as_str(),
        host: authority(parts),
        path: parts.uri.path(),
        headers: &parts.headers,
        source_principal: without_scheme(&info.source_principal),
        source_ip,
        remote_ip: remote_ip(&parts.headers, source_ip, table.trusted_proxies),
        destination_ip: info.target.ip(),
        destination_port: info.target.port(),
        auth,
    }
}

/// CUSTOM policies first (Istio's order): each one that matches has its provider check the
/// request. None when every check allowed (their headers applied to the request, and kept for
/// the response in `filtering`), else the response to send.
async fn check_custom(
    table: &Arc<Table>,
    bound: Option<&Target>,
    info: &StreamInfo,
    parts: &mut http::request::Parts,
    filtering: &mut Filtering,
    waypoint: &Waypoint,
    report: &Exchange,
) -> Option<Response<Body>> {
    let applying = table.policies_for(bound?);
    if !applying.has_custom() {
        return None;
    }
    let matched: Vec<(String, String)> = {
        let request = authz_request(table, info, parts, None);
        table
            .policies
            .custom(applying, &request)
            .into_iter()
            .map(|p| (p.key.clone(), p.provider.clone().unwrap_or_default()))
            .collect()
    };
    for (policy, name) in matched {
        let counts = waypoint.counts();
        let Some(provider) = table.providers.get(&name) else {
            counts.denied.fetch_add(1, Ordering::Relaxed);
            let text = format!(
                "policy {policy} names ext_authz provider {name:?}, which the mesh config does \
                 not define"
            );
            log::warn!("waypoint: {} {} denied: {text}", parts.method, parts.uri);
            let response = text_response(StatusCode::FORBIDDEN, DENIED_BODY.to_string());
            return Some(local(report, response, "-", Some(&text), waypoint));
        };
        match extauthz::check(provider, table, waypoint, parts).await {
            Checked::Allowed {
                upstream,
                downstream,
            } => {
                let mut last = None;
                for (n, v) in upstream {
                    let n = n.or(last.clone()).expect("the first header has a name");
                    if last.as_ref() != Some(&n) {
                        parts.headers.remove(&n);
                    }
                    parts.headers.append(n.clone(), v);
                    last = Some(n);
                }
                filtering.downstream.extend(downstream);
            }
            Checked::Denied {
                status,
                headers,
                body,
            } => {
                counts.denied.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "waypoint: {} {} from {} ({}) denied {} by ext_authz provider {name} \
                     (policy {policy})",
                    parts.method,
                    parts.uri,
                    info.peer,
                    info.source_principal,
                    status.as_u16()
                );
                let mut response = Response::new(
                    http_body_util::Full::new(body)
                        .map_err(|never| match never {})
                        .boxed(),
                );
                *response.status_mut() = status;
                *response.headers_mut() = headers;
                return Some(local(
                    report,
                    response,
                    "UAEX",
                    Some("ext_authz_denied"),
                    waypoint,
                ));
            }
            Checked::Failed { why, status } => {
                counts.denied.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "waypoint: {} {} from {} ({}): ext_authz provider {name} (policy {policy}) \
                     failed: {why}; answered {}",
                    parts.method,
                    parts.uri,
                    info.peer,
                    info.source_principal,
                    status.as_u16()
                );
                let mut response = Response::new(empty_body());
                *response.status_mut() = status;
                let details = format!("ext_authz_error: {why}");
                return Some(local(report, response, "UAEX", Some(&details), waypoint));
            }
        }
    }
    None
}

/// The request's JWT checked by the rules that apply to it: None without a token (or without
/// rules), the claims of a valid one; a refusal is a 401.
fn authenticate(
    table: &Table,
    bound: Option<&Target>,
    parts: &mut http::request::Parts,
) -> Result<Option<Arc<RequestAuth>>, Refused> {
    match bound.map(|t| table.authn_for(t)) {
        Some(authn) if !authn.is_empty() => authn.authenticate(parts),
        _ => Ok(None),
    }
}

/// Envoy's challenge on a refused JWT: the realm is the request's URL.
fn www_authenticate(parts: &http::request::Parts) -> String {
    format!(
        "Bearer realm=\"http://{}{}\", error=\"invalid_token\"",
        authority(parts),
        parts.uri.path()
    )
}

/// A request on its way through the Python filters: what they may change, and the state of
/// those that look at the response too.
pub(super) struct Filtering {
    pub(super) body: RequestBody,
    pub(super) responders: Vec<(usize, pyo3::Py<pyo3::PyAny>)>,
    /// Headers an external authorizer gave for the response.
    pub(super) downstream: http::HeaderMap,
}

/// Run the Python filters of `phase` that apply to this request, in order: None when the
/// request goes on, else the response (a filter answered it, or failed closed).
#[allow(clippy::too_many_arguments)]
async fn run_plugins(
    phase: Phase,
    applying: &[usize],
    table: &Table,
    waypoint: &Waypoint,
    info: &StreamInfo,
    parts: &mut http::request::Parts,
    filtering: &mut Filtering,
    auth: Option<&RequestAuth>,
    report: &Exchange,
) -> Option<Response<Body>> {
    let host = waypoint.plugin_host();
    for &index in applying {
        let plugin = &table.plugins[index];
        let spec = &plugin.spec;
        if spec.phase != phase
            || !(spec.ports.is_empty() || spec.ports.contains(&info.target.port()))
        {
            continue;
        }
        if spec.body_limit > 0 {
            let body = std::mem::replace(&mut filtering.body, RequestBody::Buffered(None));
            match body.buffered(spec.body_limit).await {
                Ok(Some(body)) => filtering.body = body,
                Ok(None) => {
                    let text = format!(
                        "the request body is larger than filter {}'s limit of {} bytes",
                        spec.name, spec.body_limit
                    );
                    let response =
                        text_response(StatusCode::PAYLOAD_TOO_LARGE, format!("{text}\n"));
                    return Some(local(report, response, "-", Some(&text), waypoint));
                }
                Err(e) => {
                    let text = format!("the client's request body failed: {e}");
                    let response = text_response(StatusCode::BAD_REQUEST, format!("{text}\n"));
                    return Some(local(report, response, "DC", Some(&text), waypoint));
                }
            }
        }
        let request = FilterRequest {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
            authority: authority(parts).to_string(),
            headers: parts.headers.clone(),
            source_principal: info.source_principal.to_string(),
            source_ip: info.client.ip().to_string(),
            destination: info.target.to_string(),
            service: report.key.service.to_string(),
            request_principal: auth.map(|a| a.principal.clone()),
            body: filtering.body.bytes(),
        };
        match host.on_request(plugin, request).await {
            Ok(Verdict::Continue {
                headers,
                path,
                state,
            }) => {
                if let Some(headers) = headers {
                    parts.headers = headers;
                }
                if let Some(path) = path {
                    set_path_and_query(&mut parts.uri, path);
                }
                if let Some(state) = state {
                    filtering.responders.push((index, state));
                }
            }
            Ok(Verdict::Respond {
                status,
                body,
                headers,
            }) => {
                host.answered.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "waypoint: {} {} from {} ({}) answered {status} by filter {}",
                    parts.method,
                    parts.uri,
                    info.peer,
                    info.source_principal,
                    spec.name
                );
                let mut response = Response::new(
                    http_body_util::Full::new(body)
                        .map_err(|never| match never {})
                        .boxed(),
                );
                *response.status_mut() =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                *response.headers_mut() = headers;
                let details = format!("python_filter_response{{{}}}", spec.name);
                return Some(local(report, response, "-", Some(&details), waypoint));
            }
            Err(failure) => {
                let strategy = if spec.fail_open {
                    "FAIL_OPEN: going on"
                } else {
                    "FAIL_CLOSE: 500"
                };
                log::warn!(
                    "waypoint: filter {} on {} {} from {} ({}) {}; {strategy}",
                    spec.name,
                    parts.method,
                    parts.uri,
                    info.peer,
                    info.source_principal,
                    failure.text
                );
                if !spec.fail_open {
                    let details =
                        format!("python_filter_failed{{{}:{}}}", spec.name, failure.reason);
                    let response = text_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("filter {} failed\n", spec.name),
                    );
                    return Some(local(report, response, "-", Some(&details), waypoint));
                }
            }
        }
    }
    None
}

/// The filters that asked for it look at the response head, last first: None when it goes on
/// (perhaps with new headers), else the 500 of a filter that failed closed.
pub(super) async fn plugins_on_response(
    table: &Table,
    waypoint: &Waypoint,
    responders: Vec<(usize, pyo3::Py<pyo3::PyAny>)>,
    status: u16,
    headers: &mut http::HeaderMap,
    report: &Exchange,
) -> Option<Response<Body>> {
    let host = waypoint.plugin_host();
    for (index, state) in responders.into_iter().rev() {
        let plugin = &table.plugins[index];
        match host.on_response(plugin, state, status, headers).await {
            Ok(Some(new)) => *headers = new,
            Ok(None) => {}
            Err(failure) => {
                log::warn!(
                    "waypoint: filter {} on a {status} response {}",
                    plugin.spec.name,
                    failure.text
                );
                if !plugin.spec.fail_open {
                    let details = format!(
                        "python_filter_failed{{{}:{}}}",
                        plugin.spec.name, failure.reason
                    );
                    let response = text_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("filter {} failed\n", plugin.spec.name),
                    );
                    return Some(local(report, response, "-", Some(&details), waypoint));
                }
            }
        }
    }
    None
}
