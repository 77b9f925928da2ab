//! L7 authorization at the waypoint: the AuthorizationPolicies Python compiled into the table
//! (`ambient/waypoint/authz.py`, the readable reference, where the semantics are explained),
//! evaluated per request with no Python call. A differential test holds the two together.
//!
//! And the path normalization that runs before authorization and routing (Istio's
//! `MERGE_SLASHES`): the normalized path is the one matched and the one sent upstream.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName};
use regex::Regex;
use serde::Deserialize;

#[derive(Deserialize, Debug)]
pub struct CheckSpec {
    attribute: String,
    #[serde(default)]
    key: Vec<String>,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

#[derive(Deserialize, Debug)]
pub struct PolicySpec {
    key: String,
    action: String,
    /// A CUSTOM policy's ext_authz provider.
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    dry_run: bool,
    /// rule → clause (all hold) → match (any holds) → test (all hold).
    #[serde(default)]
    rules: Vec<Vec<Vec<Vec<CheckSpec>>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    /// Ask an external authorizer (`provider`) about the requests it matches.
    Custom,
}

enum Attribute {
    SourcePrincipal,
    SourceNamespace,
    SourceServiceAccount,
    SourceIp,
    RemoteIp,
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    AuthClaim(Vec<String>),
    Header(HeaderName),
    Host,
    Method,
    Path,
    DestinationIp,
    DestinationPort,
    Sni,
}

/// An Istio string match: `*`, `prefix*`, `*suffix` or exact.
enum Text {
    Any,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

impl Text {
    fn new(pattern: &str) -> Self {
        if pattern == "*" {
            Text::Any
        } else if let Some(p) = pattern.strip_suffix('*') {
            Text::Prefix(p.to_string())
        } else if let Some(s) = pattern.strip_prefix('*') {
            Text::Suffix(s.to_string())
        } else {
            Text::Exact(pattern.to_string())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Text::Any => true,
            Text::Prefix(p) => value.starts_with(p.as_str()),
            Text::Suffix(s) => value.ends_with(s.as_str()),
            Text::Exact(e) => value == e,
        }
    }
}

/// A CIDR block.
struct Block {
    network: IpAddr,
    prefix: u8,
}

impl Block {
    fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("expected an IP address or CIDR block, got {text:?}"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("bad prefix length in {text:?}"))?,
            None => max,
        };
        Ok(Block { network, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

enum Pattern {
    Text(Text),
    /// Lower-cased; `bare`: written without a port, so it matches the host on any port.
    Host {
        text: Text,
        bare: bool,
    },
    Template(Regex, String),
    Block(Block),
    Port(u16),
}

/// A value of the request, as a test reads it.
enum Actual<'r> {
    Text(Cow<'r, str>),
    Ip(IpAddr),
    Port(u16),
}

impl Pattern {
    fn matches(&self, actual: &Actual<'_>) -> bool {
        match (self, actual) {
            (Pattern::Text(t), Actual::Text(v)) => t.matches(v),
            (Pattern::Host { text, bare }, Actual::Text(v)) => {
                let host = v.to_ascii_lowercase();
                if text.matches(&host) {
                    return true;
                }
                match host.rsplit_once(':') {
                    Some((name, port)) if *bare && port.bytes().all(|b| b.is_ascii_digit()) => {
                        text.matches(name)
                    }
                    _ => false,
                }
            }
            (Pattern::Template(re, _), Actual::Text(v)) => re.is_match(v),
            (Pattern::Block(b), Actual::Ip(ip)) => b.contains(*ip),
            (Pattern::Port(p), Actual::Port(v)) => p == v,
            _ => false,
        }
    }
}

struct Check {
    attribute: Attribute,
    values: Vec<Pattern>,
    not_values: Vec<Pattern>,
}

pub struct Policy {
    pub key: String,
    pub action: Action,
    pub provider: Option<String>,
    pub dry_run: bool,
    /// rule (any) → clause (all) → match (any) → test (all).
    rules: Vec<Vec<Vec<Vec<Check>>>>,
}

/// What a verified JWT says (RequestAuthentication); None without a token.
#[derive(Default)]
pub struct RequestAuth {
    pub principal: String,
    pub audiences: Vec<String>,
    pub presenter: String,
    pub claims: serde_json::Value,
}

/// A request as authorization sees it.
pub struct Request<'r> {
    pub method: &'r str,
    pub host: &'r str,
    /// Normalized, without the query.
    pub path: &'r str,
    pub headers: &'r HeaderMap,
    /// The client's identity without `spiffe://` ("" without one).
    pub source_principal: &'r str,
    pub source_ip: IpAddr,
    pub remote_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    pub auth: Option<&'r RequestAuth>,
}

/// The decision on one request.
pub struct Verdict<'t> {
    pub allowed: bool,
    /// The policy that decided (`namespace/name`), if one did.
    pub policy: Option<&'t str>,
    pub reason: &'static str,
    /// AUDIT and dry-run policies that matched, for the log.
    pub logged: Vec<&'t Policy>,
}

fn template(value: &str) -> Result<Regex, String> {
    let mut out = String::from("^");
    let mut rest = value;
    while let Some(at) = rest.find('{') {
        out.push_str(&regex::escape(&rest[..at]));
        rest = &rest[at..];
        if let Some(r) = rest.strip_prefix("{**}") {
            out.push_str(".*");
            rest = r;
        } else if let Some(r) = rest.strip_prefix("{*}") {
            out.push_str("[^/]+");
            rest = r;
        } else {
            return Err(format!("bad path template {value:?}"));
        }
    }
    out.push_str(&regex::escape(rest));
    out.push('$');
    Regex::new(&out).map_err(|e| format!("path template {value:?}: {e}"))
}

fn compile_check(spec: CheckSpec) -> Result<Check, String> {
    let attribute = match spec.attribute.as_str() {
        "source.principal" => Attribute::SourcePrincipal,
        "source.namespace" => Attribute::SourceNamespace,
        "source.service_account" => Attribute::SourceServiceAccount,
        "source.ip" => Attribute::SourceIp,
        "remote.ip" => Attribute::RemoteIp,
        "request.auth.principal" => Attribute::AuthPrincipal,
        "request.auth.audiences" => Attribute::AuthAudiences,
        "request.auth.presenter" => Attribute::AuthPresenter,
        "request.auth.claims" => Attribute::AuthClaim(spec.key.clone()),
        "request.headers" => {
            let name = spec.key.first().map(String::as_str).unwrap_or("");
            Attribute::Header(
                HeaderName::try_from(name).map_err(|_| format!("bad header name {name:?}"))?,
            )
        }
        "request.host" => Attribute::Host,
        "request.method" => Attribute::Method,
        "request.path" => Attribute::Path,
        "destination.ip" => Attribute::DestinationIp,
        "destination.port" => Attribute::DestinationPort,
        "connection.sni" => Attribute::Sni,
        other => return Err(format!("unknown attribute {other:?}")),
    };
    let pattern = |v: &String| -> Result<Pattern, String> {
        Ok(match attribute {
            Attribute::SourceIp | Attribute::RemoteIp | Attribute::DestinationIp => {
                Pattern::Block(Block::parse(v)?)
            }
            Attribute::DestinationPort => {
                Pattern::Port(v.parse().map_err(|_| format!("bad port {v:?}"))?)
            }
            Attribute::Host => {
                let lower = v.to_ascii_lowercase();
                Pattern::Host {
                    bare: !lower.contains(':'),
                    text: Text::new(&lower),
                }
            }
            Attribute::Path if v.contains('{') => {
                let literal = v[..v.find('{').unwrap_or(0)].to_string();
                Pattern::Template(template(v)?, literal)
            }
            _ => Pattern::Text(Text::new(v)),
        })
    };
    Ok(Check {
        values: spec.values.iter().map(pattern).collect::<Result<_, _>>()?,
        not_values: spec
            .not_values
            .iter()
            .map(pattern)
            .collect::<Result<_, _>>()?,
        attribute,
    })
}

impl Policy {
    pub fn from_spec(spec: PolicySpec) -> Result<Self, String> {
        let action = match spec.action.as_str() {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            "CUSTOM" => Action::Custom,
            other => return Err(format!("policy {}: unknown action {other:?}", spec.key)),
        };
        let rules = spec
            .rules
            .into_iter()
            .map(|rule| {
                rule.into_iter()
                    .map(|clause| {
                        clause
                            .into_iter()
                            .map(|m| m.into_iter().map(compile_check).collect())
                            .collect::<Result<Vec<_>, String>>()
                    })
                    .collect()
            })
            .collect::<Result<_, String>>()
            .map_err(|e| format!("policy {}: {e}", spec.key))?;
        if (action == Action::Custom) != spec.provider.is_some() {
            return Err(format!(
                "policy {}: a CUSTOM policy, and only one, names a provider",
                spec.key
            ));
        }
        Ok(Policy {
            key: spec.key,
            action,
            provider: spec.provider,
            dry_run: spec.dry_run,
            rules,
        })
    }

    fn matches(&self, r: &Request<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.iter().all(|clause| {
                clause
                    .iter()
                    .any(|m| !m.is_empty() && m.iter().all(|t| t.holds(r)))
            })
        })
    }

    /// The keys (`keys` reads them off a test) one of which every rule requires: for each rule,
    /// a clause whose every match has a test giving keys. None: some rule requires none.
    fn required(&self, keys: fn(&Check) -> Option<Vec<String>>) -> Option<Vec<String>> {
        if self.rules.is_empty() {
            return None; // it never matches; `rest` keeps that simple
        }
        let mut out = Vec::new();
        for rule in &self.rules {
            let found = rule.iter().find_map(|clause| {
                let mut all = Vec::new();
                for m in clause {
                    all.extend(m.iter().find_map(keys)?);
                }
                (!clause.is_empty()).then_some(all)
            })?;
            out.extend(found);
        }
        Some(out)
    }

    fn enforced(&self) -> bool {
        !self.dry_run && self.action != Action::Audit
    }
}

fn text(v: &str) -> Actual<'_> {
    Actual::Text(Cow::Borrowed(v))
}

/// A SPIFFE identity as policies name it: without `spiffe://`.
pub fn without_scheme(principal: &str) -> &str {
    principal.strip_prefix("spiffe://").unwrap_or(principal)
}

/// The namespace in `[spiffe://]<td>/ns/<namespace>/sa/<sa>`, "" otherwise.
pub fn namespace_of(principal: &str) -> &str {
    principal
        .split_once("/ns/")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(""))
        .unwrap_or("")
}

/// `ns/sa` of `td/ns/<ns>/sa/<sa>`, "" otherwise.
fn service_account_of(principal: &str) -> Option<String> {
    let (_, rest) = principal.split_once("/ns/")?;
    let (namespace, account) = rest.split_once("/sa/")?;
    (!account.is_empty()).then(|| format!("{namespace}/{account}"))
}

/// A claim's values: each element of a list, a nested claim reached through `path`.
fn claim_values<'r>(claims: &'r serde_json::Value, path: &[String]) -> Vec<Actual<'r>> {
    let mut value = claims;
    for k in path {
        match value.get(k) {
            Some(v) => value = v,
            None => return Vec::new(),
        }
    }
    let items: &[serde_json::Value] = match value {
        serde_json::Value::Array(items) => items,
        other => std::slice::from_ref(other),
    };
    items
        .iter()
        .filter_map(|v| match v {
            serde_json::Value::String(s) => Some(text(s)),
            serde_json::Value::Bool(b) => Some(text(if *b { "true" } else { "false" })),
            serde_json::Value::Number(n) => Some(Actual::Text(Cow::Owned(n.to_string()))),
            _ => None,
        })
        .collect()
}

impl Check {
    fn holds(&self, r: &Request<'_>) -> bool {
        let one = |v: Actual<'_>| self.check(std::iter::once(v));
        let optional = |v: &str| {
            if v.is_empty() {
                self.check(std::iter::empty())
            } else {
                one(text(v))
            }
        };
        match &self.attribute {
            Attribute::SourcePrincipal => optional(r.source_principal),
            Attribute::SourceNamespace => optional(namespace_of(r.source_principal)),
            Attribute::SourceServiceAccount => match service_account_of(r.source_principal) {
                Some(account) => one(Actual::Text(Cow::Owned(account))),
                None => self.check(std::iter::empty()),
            },
            Attribute::SourceIp => one(Actual::Ip(r.source_ip)),
            Attribute::RemoteIp => one(Actual::Ip(r.remote_ip)),
            Attribute::AuthPrincipal => optional(r.auth.map_or("", |a| a.principal.as_str())),
            Attribute::AuthPresenter => optional(r.auth.map_or("", |a| a.presenter.as_str())),
            Attribute::AuthAudiences => self.check(
                r.auth
                    .into_iter()
                    .flat_map(|a| a.audiences.iter().map(|s| text(s))),
            ),
            Attribute::AuthClaim(path) => match r.auth {
                Some(a) => self.check(claim_values(&a.claims, path).into_iter()),
                None => self.check(std::iter::empty()),
            },
            Attribute::Header(name) => self.check(
                r.headers
                    .get_all(name)
                    .iter()
                    .map(|v| Actual::Text(String::from_utf8_lossy(v.as_bytes()))),
            ),
            Attribute::Host => optional(r.host),
            Attribute::Method => one(text(r.method)),
            Attribute::Path => one(text(r.path)),
            Attribute::DestinationIp => one(Actual::Ip(r.destination_ip)),
            Attribute::DestinationPort => one(Actual::Port(r.destination_port)),
            // The waypoint sees no inner TLS: no SNI.
            Attribute::Sni => self.check(std::iter::empty()),
        }
    }

    /// Some value matches a pattern of `values` (if any), and none a pattern of `not_values`.
    fn check<'a>(&self, actual: impl Iterator<Item = Actual<'a>>) -> bool {
        let mut positive = self.values.is_empty();
        for v in actual {
            if self.not_values.iter().any(|p| p.matches(&v)) {
                return false;
            }
            positive = positive || self.values.iter().any(|p| p.matches(&v));
        }
        positive
    }
}

/// The policies of the table; Services and pods refer to theirs through a [`PolicySet`].
#[derive(Default)]
pub struct Policies {
    pub all: Vec<Policy>,
}

/// Policies of one action, each filed under what every one of its rules requires: one of some
/// exact principals, else a path starting with one of some literal prefixes (an exact path, a
/// `prefix*`, a template's text before its first `{`), else in `rest`. A request evaluates only
/// the policies filed under its own principal and path prefixes, and the rest: 1,000 per-client
/// or per-path policies on a Service cost what the few relevant to a request cost. Entries are
/// positions in the set's order (the mesh's), kept sorted.
#[derive(Default)]
struct Index {
    by_principal: HashMap<String, Vec<usize>>,
    /// Prefix length → prefix → positions.
    by_path_prefix: Vec<(usize, HashMap<String, Vec<usize>>)>,
    rest: Vec<usize>,
}

fn file(list: &mut Vec<usize>, position: usize) {
    if list.last() != Some(&position) {
        list.push(position);
    }
}

impl Index {
    fn add(&mut self, position: usize, policy: &Policy) {
        if let Some(principals) = policy.required(principal_keys) {
            for p in principals {
                file(self.by_principal.entry(p).or_default(), position);
            }
        } else if let Some(prefixes) = policy.required(path_keys) {
            for p in prefixes {
                let at = match self.by_path_prefix.iter().position(|(n, _)| *n == p.len()) {
                    Some(at) => at,
                    None => {
                        self.by_path_prefix.push((p.len(), HashMap::new()));
                        self.by_path_prefix.len() - 1
                    }
                };
                file(self.by_path_prefix[at].1.entry(p).or_default(), position);
            }
        } else {
            self.rest.push(position);
        }
    }

    /// The positions of the policies that may match `r`, in order.
    fn candidates<'a>(&'a self, r: &Request<'_>) -> Merged<'a> {
        let mut filed: Vec<usize> = Vec::new();
        if let Some(list) = self.by_principal.get(r.source_principal) {
            filed.extend_from_slice(list);
        }
        for (len, table) in &self.by_path_prefix {
            if let Some(list) = r.path.get(..*len).and_then(|p| table.get(p)) {
                filed.extend_from_slice(list);
            }
        }
        filed.sort_unstable();
        filed.dedup();
        Merged {
            a: filed,
            at: 0,
            b: &self.rest,
        }
    }
}

/// The exact principals a test requires, if that is all it accepts.
fn principal_keys(t: &Check) -> Option<Vec<String>> {
    if !matches!(t.attribute, Attribute::SourcePrincipal) || t.values.is_empty() {
        return None;
    }
    t.values
        .iter()
        .map(|v| match v {
            Pattern::Text(Text::Exact(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// The literal path prefixes a test requires, if it requires one (templates up to their first
/// operator; an exact path is its own prefix).
fn path_keys(t: &Check) -> Option<Vec<String>> {
    if !matches!(t.attribute, Attribute::Path) || t.values.is_empty() {
        return None;
    }
    t.values
        .iter()
        .map(|v| match v {
            Pattern::Text(Text::Exact(e) | Text::Prefix(e)) if !e.is_empty() => Some(e.clone()),
            Pattern::Template(_, prefix) if !prefix.is_empty() => Some(prefix.clone()),
            _ => None,
        })
        .collect()
}

/// Two sorted position lists (with no position in both), merged in order.
struct Merged<'a> {
    a: Vec<usize>,
    at: usize,
    b: &'a [usize],
}

impl Iterator for Merged<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let a = self.a.get(self.at).copied();
        match (a, self.b.first()) {
            (Some(x), Some(y)) if *y < x => {
                self.b = &self.b[1..];
                Some(*y)
            }
            (Some(x), _) => {
                self.at += 1;
                Some(x)
            }
            (None, Some(y)) => {
                self.b = &self.b[1..];
                Some(*y)
            }
            (None, None) => None,
        }
    }
}

/// The policies that apply to one Service's requests (or to pods'), compiled for per-request
/// evaluation.
#[derive(Default)]
pub struct PolicySet {
    /// Indices into the table's policies, in the mesh's order.
    order: Vec<usize>,
    deny: Index,
    allow: Index,
    /// AUDIT and dry-run policies: evaluated only to be logged.
    logged: Vec<usize>,
    /// CUSTOM policies: what they match is checked by their provider first.
    custom: Vec<usize>,
    any_allow: bool,
}

impl PolicySet {
    pub fn new(policies: &Policies, applying: &[usize]) -> Self {
        let mut set = PolicySet {
            order: applying.to_vec(),
            ..Default::default()
        };
        for (position, i) in applying.iter().enumerate() {
            let p = &policies.all[*i];
            if !p.enforced() {
                set.logged.push(position);
            } else if p.action == Action::Custom {
                set.custom.push(position);
            } else if p.action == Action::Deny {
                set.deny.add(position, p);
            } else {
                set.any_allow = true;
                set.allow.add(position, p);
            }
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Whether any CUSTOM policy is among them.
    pub fn has_custom(&self) -> bool {
        !self.custom.is_empty()
    }
}

impl Policies {
    /// The CUSTOM policies of `set` that match `r`: each one's provider checks the request
    /// before anything else does.
    pub fn custom<'t>(&'t self, set: &PolicySet, r: &Request<'_>) -> Vec<&'t Policy> {
        set.custom
            .iter()
            .map(|n| &self.all[set.order[*n]])
            .filter(|p| p.matches(r))
            .collect()
    }

    /// Istio's order over the policies of `set`: a matching DENY denies; no ALLOW: allowed; a
    /// matching ALLOW allows; else denied. AUDIT and dry-run policies are only logged.
    pub fn evaluate<'t>(&'t self, set: &PolicySet, r: &Request<'_>) -> Verdict<'t> {
        let policy = |position: usize| &self.all[set.order[position]];
        let mut verdict = Verdict {
            allowed: true,
            policy: None,
            reason: "no ALLOW policy applies",
            logged: Vec::new(),
        };
        for p in set.logged.iter().map(|n| policy(*n)) {
            if p.matches(r) {
                verdict.logged.push(p);
            }
        }
        if let Some(p) = set.deny.candidates(r).map(policy).find(|p| p.matches(r)) {
            verdict.allowed = false;
            verdict.policy = Some(&p.key);
            verdict.reason = "denied by policy";
            return verdict;
        }
        if !set.any_allow {
            return verdict;
        }
        match set.allow.candidates(r).map(policy).find(|p| p.matches(r)) {
            Some(p) => {
                verdict.policy = Some(&p.key);
                verdict.reason = "allowed by policy";
            }
            None => {
                verdict.allowed = false;
                verdict.reason = "no ALLOW policy matched";
            }
        }
        verdict
    }
}

/// The client per `x-forwarded-for`, trusting `trusted` hops from its right; else `source`.
pub fn remote_ip(headers: &HeaderMap, source: IpAddr, trusted: usize) -> IpAddr {
    if trusted == 0 {
        return source;
    }
    let Some(xff) = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) else {
        return source;
    };
    let hops: Vec<&str> = xff.split(',').map(str::trim).collect();
    if hops.len() < trusted {
        return source;
    }
    hops[hops.len() - trusted].parse().unwrap_or(source)
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `path` (without its query) normalized: percent-encoded unreserved characters decoded, runs
/// of `/` merged, `.` and `..` segments removed (RFC 3986 5.2.4). Borrowed when already normal,
/// the common case, so most requests pay one scan.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let clean = !bytes
        .windows(2)
        .any(|w| w[0] == b'%' || (w[0] == b'/' && (w[1] == b'/' || w[1] == b'.')))
        && bytes.last() != Some(&b'%');
    if clean && path != "." && path != ".." {
        return Cow::Borrowed(path);
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = h * 16 + l;
                if unreserved(c) {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        if b == b'/' && decoded.last() == Some(&b'/') {
            i += 1;
            continue;
        }
        decoded.push(b);
        i += 1;
    }
    // Decoding only turns `%XX` into unreserved ASCII, so the bytes stay UTF-8 (or as the
    // client sent them, which hyper already accepted as a path).
    let merged = String::from_utf8_lossy(&decoded);
    let absolute = merged.starts_with('/');
    let body = if absolute { &merged[1..] } else { &merged[..] };
    let segments: Vec<&str> = body.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    Cow::Owned(if absolute {
        format!("/{joined}")
    } else {
        joined
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_closes_the_usual_bypasses() {
        for (raw, want) in [
            ("/admin", "/admin"),
            ("/admin/../admin", "/admin"),
            ("//admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a/%2e%2e/admin", "/admin"),
            ("/a%2Fb", "/a%2Fb"),
            ("/..", "/"),
            ("/a/..", "/"),
            ("/a/.", "/a/"),
            ("/%", "/%"),
            ("/%zz", "/%zz"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }

    #[test]
    fn blocks_and_templates() {
        let b = Block::parse("10.1.0.0/16").unwrap();
        assert!(b.contains("10.1.200.3".parse().unwrap()));
        assert!(!b.contains("10.2.0.1".parse().unwrap()));
        assert!(Block::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        let t = template("/foo/{*}/bar/{**}").unwrap();
        assert!(t.is_match("/foo/x/bar/"));
        assert!(t.is_match("/foo/x/bar/y/z"));
        assert!(!t.is_match("/foo/x/y/bar/z"));
    }
}
