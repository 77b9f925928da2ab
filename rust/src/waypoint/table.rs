//! The waypoint's routing table: what Python compiles from the mesh snapshot (see
//! `ambient/waypoint/table.py`, where each field is explained) and the core reads per request with
//! no Python call. Matching here must agree with `ambient.waypoint.routes.select`, the readable
//! reference; a differential test holds the two together.
//!
//! The table arrives as JSON once per snapshot: parsing it is not on any request's path, and the
//! text is what `config_dump` shows.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use regex::Regex;
use serde::Deserialize;

use super::authn::{Authn, JwtRuleSpec};
use super::authz::{Policies, Policy, PolicySet, PolicySpec};
use super::extauthz::{Provider, ProviderSpec};
use super::plugins::{Plugin, PluginHost, PluginSpec};
use super::telemetry::LogRule;

/// A CONNECT target this waypoint is bound to.
#[derive(Deserialize, Debug)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// A Service VIP: the request is routed among the Service's routes and endpoints.
    Service { service: usize },
    /// A pod IP (waypoint-for workload/all): forwarded to that pod, no routing.
    Workload { endpoint: usize },
}

/// How a port's bytes are read: parsed as HTTP, or carried as a stream.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Tcp,
    /// HTTP/1.1, HTTP/2 with prior knowledge, or else TCP, from the first bytes.
    Detect,
}

#[derive(Deserialize, Debug)]
pub struct Endpoint {
    /// `namespace/name` of the pod.
    pub name: Arc<str>,
    pub ip: IpAddr,
    /// Where its ztunnel takes HBONE (`ip:15008`); None for a pod outside the mesh (plain TCP).
    pub hbone: Option<SocketAddr>,
    /// The SPIFFE identity the endpoint's certificate must carry.
    pub identity: Arc<str>,
    /// Requests in flight to it (least-request load balancing); not part of the JSON.
    #[serde(skip)]
    pub active: AtomicUsize,
}

#[derive(Deserialize, Debug)]
pub struct Backend {
    /// `namespace/name` of the backend Service.
    pub service: String,
    pub weight: u32,
    /// (endpoint index, target port) for each ready endpoint.
    pub endpoints: Vec<(usize, u16)>,
    /// Why this backend cannot take traffic (a Service that does not exist, no port): a 500.
    pub invalid: Option<String>,
    /// The backend port's protocol: how the waypoint speaks to its endpoints.
    pub protocol: Protocol,
}

#[derive(Deserialize, Debug, Default)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<(String, String)>,
    #[serde(default)]
    pub add: Vec<(String, String)>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A path modifier of a redirect or rewrite; `prefix` replaces the matched PathPrefix.
#[derive(Deserialize, Debug)]
#[serde(tag = "type")]
pub enum PathModifier {
    ReplaceFullPath { value: String },
    ReplacePrefixMatch { value: String },
}

#[derive(Deserialize, Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Deserialize, Debug)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// When a request that can be sent again is retried: on a failed connection, or an answer with one
/// of `codes`; at most `attempts` more times, `backoff` seconds apart, each on another endpoint
/// when there is one.
#[derive(Deserialize, Debug)]
pub struct Retry {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: f64,
}

/// A copy of each request (a `percent` of them) sent to `backend`, its answer ignored.
#[derive(Deserialize, Debug)]
pub struct Mirror {
    pub backend: Backend,
    pub percent: f64,
}

#[derive(Deserialize, Debug)]
pub struct Rule {
    /// `namespace/name` of its HTTPRoute and the rule's index, for the access log.
    pub route: Arc<str>,
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub request_headers: Option<HeaderModifier>,
    #[serde(default)]
    pub response_headers: Option<HeaderModifier>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    /// `timeouts.request` and `timeouts.backendRequest`, seconds (None: no limit).
    pub request_timeout: Option<f64>,
    pub backend_timeout: Option<f64>,
    pub retry: Option<Retry>,
    #[serde(default)]
    pub mirrors: Vec<Mirror>,
}

#[derive(Deserialize, Debug)]
pub struct ValueMatchSpec {
    pub name: String,
    pub value: String,
    pub regex: bool,
}

#[derive(Deserialize, Debug)]
pub struct MatchSpec {
    /// A consumer route's namespace: the match applies only to clients there.
    pub only_namespace: Option<String>,
    pub path_kind: String,
    pub path: String,
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
    #[serde(default)]
    pub query: Vec<ValueMatchSpec>,
    pub method: Option<String>,
    pub rule: usize,
}

#[derive(Deserialize, Debug)]
pub struct PortSpec {
    pub protocol: Protocol,
    /// Route matches in precedence order: the first that matches is taken.
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Routes in the Service's own namespace are attached (they apply to every client).
    #[serde(default)]
    pub producer_routes: bool,
    /// Namespaces whose (consumer) routes are attached.
    #[serde(default)]
    pub consumer_namespaces: Vec<String>,
    /// The Service itself on this port: where a request goes when no route is attached.
    pub default: Rule,
}

#[derive(Deserialize, Debug)]
pub struct Service {
    /// `namespace/name`.
    pub name: String,
    pub ports: HashMap<u16, PortSpec>,
    /// The policies (indices into the table's) that apply to requests for this Service.
    #[serde(default)]
    pub policies: Vec<usize>,
    /// The JWT rules of the RequestAuthentications that apply to them.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleSpec>,
    /// The Python filters (indices into the table's) that apply to them, in the order they run.
    #[serde(default)]
    pub plugins: Vec<usize>,
    /// Which of its requests are access-logged (Telemetry); None: all.
    #[serde(default)]
    pub access_log: Option<LogRule>,
}

#[derive(Deserialize, Debug)]
struct TableSpec {
    targets: HashMap<IpAddr, Target>,
    services: Vec<Service>,
    endpoints: Vec<Endpoint>,
    /// The AuthorizationPolicies that apply at this waypoint; services refer to them by index.
    #[serde(default)]
    policies: Vec<PolicySpec>,
    /// Those that apply to traffic sent to a pod (they target the waypoint itself).
    #[serde(default)]
    workload_policies: Vec<usize>,
    /// Hops of `x-forwarded-for` trusted for `remote.ip`.
    #[serde(default)]
    trusted_proxies: usize,
    #[serde(default)]
    workload_jwt_rules: Vec<JwtRuleSpec>,
    /// The Python filters that apply at this waypoint; services refer to them by index.
    #[serde(default)]
    plugins: Vec<PluginSpec>,
    #[serde(default)]
    workload_plugins: Vec<usize>,
    #[serde(default)]
    workload_access_log: Option<LogRule>,
    /// The mesh config's HTTP ext_authz providers that CUSTOM policies here name.
    #[serde(default)]
    providers: Vec<ProviderSpec>,
}

/// A path condition, compiled.
pub enum PathMatch {
    Exact(String),
    /// Without its trailing `/`; empty matches every path.
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                p.is_empty()
                    || path == p
                    || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, actual: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == actual,
            ValueMatch::Regex(r) => r.is_match(actual),
        }
    }
}

pub struct Match {
    pub only_namespace: Option<String>,
    pub path: PathMatch,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<String>,
    pub rule: usize,
}

/// A request head as routing reads it.
pub struct Head<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

impl Match {
    fn matches(&self, head: &Head<'_>) -> bool {
        if let Some(m) = &self.method {
            if m != head.method {
                return false;
            }
        }
        if !self.path.matches(head.path) {
            return false;
        }
        for (name, want) in &self.headers {
            match joined_header(head.headers, name) {
                Some(v) if want.matches(&v) => {}
                _ => return false,
            }
        }
        for (name, want) in &self.query {
            match query_param(head.query, name) {
                Some(v) if want.matches(&v) => {}
                _ => return false,
            }
        }
        true
    }
}

/// A header's values joined by `,` (RFC 9110 §5.3), as the reference reads them; None when absent
/// or not text.
fn joined_header(headers: &http::HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.to_str().ok()?;
    let mut out = first.to_string();
    for v in values {
        out.push(',');
        out.push_str(v.to_str().ok()?);
    }
    Some(out)
}

/// The first value of a query parameter, percent-decoded as the reference's `parse_qs` does.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    for pair in query?.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode_component(key) == name {
            return Some(decode_component(value));
        }
    }
    None
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space); bad escapes stay as written.
fn decode_component(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub struct Port {
    pub protocol: Protocol,
    pub matches: Vec<Match>,
    pub rules: Vec<Rule>,
    pub producer_routes: bool,
    pub consumer_namespaces: Vec<String>,
    pub default: Rule,
}

/// What routing decided for one request.
pub enum Routed<'a> {
    /// The rule taken, and the PathPrefix that matched (for `ReplacePrefixMatch`).
    Rule(&'a Rule, Option<&'a str>),
    /// Routes are attached for this client and none matched: 404.
    NoRoute,
}

impl Port {
    /// The rule `head` takes from a client in `client_namespace` (see the module's reference).
    pub fn route<'a>(&'a self, head: &Head<'_>, client_namespace: &str) -> Routed<'a> {
        let attached = self.producer_routes
            || self
                .consumer_namespaces
                .iter()
                .any(|n| n == client_namespace);
        if !attached {
            return Routed::Rule(&self.default, None);
        }
        for m in &self.matches {
            if let Some(ns) = &m.only_namespace {
                if ns != client_namespace {
                    continue;
                }
            }
            if m.matches(head) {
                let prefix = match &m.path {
                    PathMatch::Prefix(p) => Some(p.as_str()),
                    _ => None,
                };
                return Routed::Rule(&self.rules[m.rule], prefix);
            }
        }
        Routed::NoRoute
    }
}

pub struct CompiledService {
    pub name: Arc<str>,
    pub ports: HashMap<u16, Port>,
    pub policies: PolicySet,
    pub authn: Authn,
    pub plugins: Vec<usize>,
    pub access_log: Option<Arc<LogRule>>,
}

/// One snapshot's table, shared by the requests that started under it.
pub struct Table {
    pub targets: HashMap<IpAddr, Target>,
    pub services: Vec<CompiledService>,
    pub endpoints: Vec<Endpoint>,
    pub policies: Policies,
    pub workload_policies: PolicySet,
    pub workload_authn: Authn,
    pub trusted_proxies: usize,
    pub plugins: Vec<Plugin>,
    pub workload_plugins: Vec<usize>,
    /// By name.
    pub providers: HashMap<String, Provider>,
    pub workload_access_log: Option<Arc<LogRule>>,
}

/// A whole-value regular expression (the reference uses `re.fullmatch`).
fn anchored(text: &str, what: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{text})$"))
        .map_err(|e| format!("{what}: not a regular expression the core accepts ({e}): {text:?}"))
}

fn value_match(spec: &ValueMatchSpec, what: &str) -> Result<ValueMatch, String> {
    Ok(if spec.regex {
        ValueMatch::Regex(anchored(&spec.value, what)?)
    } else {
        ValueMatch::Exact(spec.value.clone())
    })
}

fn compile_match(spec: MatchSpec, rules: usize, at: &str) -> Result<Match, String> {
    if spec.rule >= rules {
        return Err(format!("{at}: rule {} out of range", spec.rule));
    }
    let path = match spec.path_kind.as_str() {
        "Exact" => PathMatch::Exact(spec.path),
        "PathPrefix" => PathMatch::Prefix(spec.path.trim_end_matches('/').to_string()),
        "RegularExpression" => PathMatch::Regex(anchored(&spec.path, at)?),
        other => return Err(format!("{at}: unknown path match {other:?}")),
    };
    let mut headers = Vec::with_capacity(spec.headers.len());
    for h in &spec.headers {
        let name = HeaderName::try_from(h.name.as_str())
            .map_err(|_| format!("{at}: bad header name {:?}", h.name))?;
        headers.push((name, value_match(h, at)?));
    }
    let mut query = Vec::with_capacity(spec.query.len());
    for q in &spec.query {
        query.push((q.name.clone(), value_match(q, at)?));
    }
    Ok(Match {
        only_namespace: spec.only_namespace,
        path,
        headers,
        query,
        method: spec.method,
        rule: spec.rule,
    })
}

fn check_rule(rule: &Rule, endpoints: usize, at: &str) -> Result<(), String> {
    let mirrored = rule.mirrors.iter().map(|m| &m.backend);
    for b in rule.backends.iter().chain(mirrored) {
        if b.endpoints.iter().any(|(i, _)| *i >= endpoints) {
            return Err(format!(
                "{at}: backend {} names a missing endpoint",
                b.service
            ));
        }
    }
    for m in [&rule.request_headers, &rule.response_headers]
        .into_iter()
        .flatten()
    {
        for (name, value) in m.set.iter().chain(&m.add) {
            HeaderName::try_from(name.as_str())
                .map_err(|_| format!("{at}: bad header name {name:?}"))?;
            HeaderValue::try_from(value.as_str())
                .map_err(|_| format!("{at}: bad header value {value:?}"))?;
        }
    }
    for t in [rule.request_timeout, rule.backend_timeout]
        .into_iter()
        .flatten()
    {
        Duration::try_from_secs_f64(t).map_err(|_| format!("{at}: bad timeout {t}"))?;
    }
    Ok(())
}

fn check_policies(indices: &[usize], n: usize, of: &str) -> Result<(), String> {
    match indices.iter().find(|i| **i >= n) {
        Some(i) => Err(format!("waypoint table: {of}: policy {i} out of range")),
        None => Ok(()),
    }
}

impl Table {
    /// The policies that apply to a request sent to `target`.
    pub fn policies_for(&self, target: &Target) -> &PolicySet {
        match target {
            Target::Service { service } => &self.services[*service].policies,
            Target::Workload { .. } => &self.workload_policies,
        }
    }

    /// The JWT rules that apply to a request sent to `target`.
    pub fn authn_for(&self, target: &Target) -> &Authn {
        match target {
            Target::Service { service } => &self.services[*service].authn,
            Target::Workload { .. } => &self.workload_authn,
        }
    }

    /// Which requests sent to `target` are access-logged (None: all).
    pub fn access_log_for(&self, target: &Target) -> Option<&Arc<LogRule>> {
        match target {
            Target::Service { service } => self.services[*service].access_log.as_ref(),
            Target::Workload { .. } => self.workload_access_log.as_ref(),
        }
    }

    /// The Python filters that apply to a request sent to `target`, in the order they run.
    pub fn plugins_for(&self, target: &Target) -> &[usize] {
        match target {
            Target::Service { service } => &self.services[*service].plugins,
            Target::Workload { .. } => &self.workload_plugins,
        }
    }

    /// Parse and compile a table; the error names the part that is wrong (a bug in the
    /// compiler on the Python side: users' mistakes are refused when the config is loaded).
    /// `host`: where the table's Python filters run.
    pub fn from_json(text: &str, host: &PluginHost) -> Result<Self, String> {
        let spec: TableSpec =
            serde_json::from_str(text).map_err(|e| format!("waypoint table: {e}"))?;
        let n_endpoints = spec.endpoints.len();
        for (ip, target) in &spec.targets {
            let ok = match target {
                Target::Service { service } => *service < spec.services.len(),
                Target::Workload { endpoint } => *endpoint < n_endpoints,
            };
            if !ok {
                return Err(format!("waypoint table: target {ip} out of range"));
            }
        }
        let all = spec
            .policies
            .into_iter()
            .map(Policy::from_spec)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("waypoint table: {e}"))?;
        let policies = Policies { all };
        let plugins = host
            .compile(spec.plugins)
            .map_err(|e| format!("waypoint table: {e}"))?;
        let check_plugins =
            |indices: &[usize], of: &str| match indices.iter().find(|i| **i >= plugins.len()) {
                Some(i) => Err(format!("waypoint table: {of}: filter {i} out of range")),
                None => Ok(()),
            };
        let mut services = Vec::with_capacity(spec.services.len());
        for service in spec.services {
            let mut ports = HashMap::with_capacity(service.ports.len());
            for (number, port) in service.ports {
                let at = format!("waypoint table: {} port {number}", service.name);
                for rule in port.rules.iter().chain([&port.default]) {
                    check_rule(rule, n_endpoints, &at)?;
                }
                let n_rules = port.rules.len();
                let matches = port
                    .matches
                    .into_iter()
                    .map(|m| compile_match(m, n_rules, &at))
                    .collect::<Result<Vec<_>, _>>()?;
                ports.insert(
                    number,
                    Port {
                        protocol: port.protocol,
                        matches,
                        rules: port.rules,
                        producer_routes: port.producer_routes,
                        consumer_namespaces: port.consumer_namespaces,
                        default: port.default,
                    },
                );
            }
            check_policies(&service.policies, policies.all.len(), &service.name)?;
            let authn = Authn::new(service.jwt_rules)
                .map_err(|e| format!("waypoint table: {}: {e}", service.name))?;
            check_plugins(&service.plugins, &service.name)?;
            services.push(CompiledService {
                name: Arc::from(service.name),
                ports,
                policies: PolicySet::new(&policies, &service.policies),
                authn,
                plugins: service.plugins,
                access_log: service.access_log.map(Arc::new),
            });
        }
        check_policies(&spec.workload_policies, policies.all.len(), "pods")?;
        check_plugins(&spec.workload_plugins, "pods")?;
        let mut providers = HashMap::with_capacity(spec.providers.len());
        for p in spec.providers {
            let name = p.name.clone();
            let provider = Provider::from_spec(p).map_err(|e| format!("waypoint table: {e}"))?;
            if provider.endpoints().any(|i| i >= n_endpoints) {
                return Err(format!(
                    "waypoint table: ext_authz provider {name} names a missing endpoint"
                ));
            }
            providers.insert(name, provider);
        }
        Ok(Self {
            targets: spec.targets,
            services,
            endpoints: spec.endpoints,
            workload_policies: PolicySet::new(&policies, &spec.workload_policies),
            workload_authn: Authn::new(spec.workload_jwt_rules)
                .map_err(|e| format!("waypoint table: pods: {e}"))?,
            policies,
            trusted_proxies: spec.trusted_proxies,
            plugins,
            workload_plugins: spec.workload_plugins,
            providers,
            workload_access_log: spec.workload_access_log.map(Arc::new),
        })
    }
}
