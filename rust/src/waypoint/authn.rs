//! RequestAuthentication (JWT) at the waypoint, per request: find the token where the rules
//! say, verify it with the `jsonwebtoken` crate against the rule of its issuer, and hand its
//! claims to authorization. The semantics and where the rules come from are explained in
//! `ambient/waypoint/authn.py`; this is the hot path.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderName, HeaderValue};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::authz::RequestAuth;

/// Verified tokens kept per table; past this many the memory is cleared and refilled.
const REMEMBERED_TOKENS: usize = 4096;
/// Clock skew allowed on `exp` and `nbf`, seconds (Envoy's default).
const CLOCK_SKEW: u64 = 60;

#[derive(Deserialize, Debug)]
pub struct JwtRuleSpec {
    /// `namespace/name` of its RequestAuthentication.
    policy: String,
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    /// The key set's JSON; None when a remote one could not be fetched (`jwks_error` says why).
    jwks: Option<String>,
    #[serde(default)]
    jwks_error: Option<String>,
    #[serde(default)]
    from_headers: Vec<(String, String)>,
    #[serde(default)]
    from_params: Vec<String>,
    #[serde(default)]
    from_cookies: Vec<String>,
    #[serde(default)]
    output_payload_to_header: Option<String>,
    #[serde(default)]
    output_claim_to_headers: Vec<(String, String)>,
    #[serde(default)]
    forward_original_token: bool,
}

/// Where a token is looked for.
enum Location {
    Header(HeaderName, String),
    Param(String),
    Cookie(String),
}

impl Location {
    fn same_place(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Header(a, p), Location::Header(b, q)) => a == b && p.eq_ignore_ascii_case(q),
            (Location::Param(a), Location::Param(b))
            | (Location::Cookie(a), Location::Cookie(b)) => a == b,
            _ => false,
        }
    }
}

struct JwtRule {
    policy: String,
    issuer: String,
    audiences: Vec<String>,
    keys: Result<Vec<(Jwk, DecodingKey)>, String>,
    locations: Vec<Location>,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, String)>,
    forward_original_token: bool,
}

/// The JWT rules applying to one Service's requests (or to pods'), and the tokens they
/// verified.
#[derive(Default)]
pub struct Authn {
    rules: Vec<JwtRule>,
    remembered: Mutex<HashMap<String, Remembered>>,
}

struct Remembered {
    auth: Arc<RequestAuth>,
    rule: usize,
    /// `exp` (unix seconds), or u64::MAX for a token without one.
    expires: u64,
}

/// Why a token was refused: the 401's body, and Envoy's `response_code_details`.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: String,
}

fn refused(reason: impl Into<String>) -> Refused {
    Refused {
        reason: reason.into(),
    }
}

fn header_name(name: &str, what: &str) -> Result<HeaderName, String> {
    HeaderName::try_from(name).map_err(|_| format!("{what}: bad header name {name:?}"))
}

fn keys(jwks: &str) -> Result<Vec<(Jwk, DecodingKey)>, String> {
    let set: JwkSet =
        serde_json::from_str(jwks).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    // A key the library cannot use (an unknown type) is skipped, as Envoy skips it.
    Ok(set
        .keys
        .into_iter()
        .filter_map(|jwk| DecodingKey::from_jwk(&jwk).ok().map(|k| (jwk, k)))
        .collect())
}

impl Authn {
    pub fn new(specs: Vec<JwtRuleSpec>) -> Result<Self, String> {
        let mut rules = Vec::with_capacity(specs.len());
        for spec in specs {
            let what = format!("RequestAuthentication {} ({})", spec.policy, spec.issuer);
            let mut locations = Vec::new();
            for (name, prefix) in &spec.from_headers {
                locations.push(Location::Header(header_name(name, &what)?, prefix.clone()));
            }
            locations.extend(spec.from_params.iter().cloned().map(Location::Param));
            locations.extend(spec.from_cookies.iter().cloned().map(Location::Cookie));
            if locations.is_empty() {
                locations.push(Location::Header(header::AUTHORIZATION, "Bearer ".into()));
                locations.push(Location::Param("access_token".into()));
            }
            let keys = match (&spec.jwks, &spec.jwks_error) {
                (Some(text), _) => keys(text),
                (None, Some(why)) => Err(why.clone()),
                (None, None) => Err("no key set".to_string()),
            };
            let claim_headers = spec
                .output_claim_to_headers
                .iter()
                .map(|(h, c)| Ok((header_name(h, &what)?, c.clone())))
                .collect::<Result<Vec<_>, String>>()?;
            rules.push(JwtRule {
                payload_header: spec
                    .output_payload_to_header
                    .as_deref()
                    .map(|h| header_name(h, &what))
                    .transpose()?,
                policy: spec.policy,
                issuer: spec.issuer,
                audiences: spec.audiences,
                keys,
                locations,
                claim_headers,
                forward_original_token: spec.forward_original_token,
            });
        }
        Ok(Self {
            rules,
            remembered: Mutex::new(HashMap::new()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The request's JWT, checked: Ok(None) without a token, Ok(claims) for a valid one
    /// (headers the rule adds are added, the token removed unless forwarded), Err for any
    /// other (a 401).
    pub fn authenticate(
        &self,
        parts: &mut http::request::Parts,
    ) -> Result<Option<Arc<RequestAuth>>, Refused> {
        let Some((token, place)) = self.find_token(parts) else {
            return Ok(None);
        };
        let (auth, rule) = self.verify(&token)?;
        let rule = &self.rules[rule];
        // A token counts only where its issuer's rule looks for it (as Envoy's providers).
        if !rule.locations.iter().any(|l| l.same_place(place)) {
            return Err(refused("Jwt issuer is not configured"));
        }
        let found_in = match place {
            Location::Header(name, _) => Some(name.clone()),
            _ => None,
        };
        if let Some(name) = &rule.payload_header {
            if let Some(payload) = token.split('.').nth(1) {
                if let Ok(v) = HeaderValue::from_str(payload) {
                    parts.headers.insert(name.clone(), v);
                }
            }
        }
        for (name, claim) in &rule.claim_headers {
            if let Some(value) = claim_text(&auth.claims, claim) {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    parts.headers.insert(name.clone(), v);
                }
            }
        }
        if !rule.forward_original_token {
            if let Some(name) = found_in {
                parts.headers.remove(name);
            }
        }
        Ok(Some(auth))
    }

    /// The first token found, in the rules' order and each rule's locations' order, and where.
    fn find_token(&self, parts: &http::request::Parts) -> Option<(String, &Location)> {
        for rule in &self.rules {
            for location in &rule.locations {
                match location {
                    Location::Header(name, prefix) => {
                        let value = parts.headers.get(name).and_then(|v| v.to_str().ok());
                        if let Some(token) = value.and_then(|v| strip_prefix(v, prefix)) {
                            return Some((token.trim().to_string(), location));
                        }
                    }
                    Location::Param(param) => {
                        if let Some(token) = query_param(parts.uri.query(), param) {
                            return Some((token, location));
                        }
                    }
                    Location::Cookie(cookie) => {
                        if let Some(token) = cookie_value(&parts.headers, cookie) {
                            return Some((token, location));
                        }
                    }
                }
            }
        }
        None
    }

    fn verify(&self, token: &str) -> Result<(Arc<RequestAuth>, usize), Refused> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(r) = self.remembered.lock().unwrap().get(token) {
            if r.expires.saturating_add(CLOCK_SKEW) >= now {
                return Ok((r.auth.clone(), r.rule));
            }
        }
        let issuer = unverified_issuer(token).ok_or_else(|| {
            refused(
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
            )
        })?;
        let (index, rule) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.issuer == issuer)
            .ok_or_else(|| refused("Jwt issuer is not configured"))?;
        let keys = rule
            .keys
            .as_ref()
            .map_err(|why| refused(format!("Jwks remote fetch is failed: {why}")))?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            refused(format!(
                "Jwt header is an invalid JSON or its alg is not supported: {e}"
            ))
        })?;
        let candidates: Vec<&(Jwk, DecodingKey)> = keys
            .iter()
            .filter(|(jwk, _)| match &header.kid {
                Some(kid) => jwk.common.key_id.as_deref() == Some(kid.as_str()),
                None => true,
            })
            .filter(|(jwk, _)| key_allows(jwk, header.alg))
            .collect();
        if candidates.is_empty() {
            return Err(refused(
                "Jwks doesn't have key to match kid or alg from Jwt",
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = CLOCK_SKEW;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::new();
        validation.set_issuer(&[&rule.issuer]);
        if rule.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&rule.audiences);
        }
        let mut last = None;
        for (_, key) in candidates {
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &validation) {
                Ok(data) => {
                    let auth = Arc::new(request_auth(data.claims));
                    let expires = auth
                        .claims
                        .get("exp")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(u64::MAX);
                    self.remember(token, &auth, index, expires);
                    return Ok((auth, index));
                }
                Err(e) => last = Some(e),
            }
        }
        use jsonwebtoken::errors::ErrorKind;
        Err(refused(match last.as_ref().map(|e| e.kind()) {
            Some(ErrorKind::ExpiredSignature) => "Jwt is expired",
            Some(ErrorKind::ImmatureSignature) => "Jwt not yet valid",
            Some(ErrorKind::InvalidAudience) => "Audiences in Jwt are not allowed",
            Some(ErrorKind::InvalidIssuer) => "Jwt issuer is not configured",
            Some(ErrorKind::InvalidAlgorithm) => "Jwt algorithm is not allowed by the key",
            _ => "Jwt verification fails",
        }))
    }

    fn remember(&self, token: &str, auth: &Arc<RequestAuth>, rule: usize, expires: u64) {
        let mut remembered = self.remembered.lock().unwrap();
        if remembered.len() >= REMEMBERED_TOKENS {
            remembered.clear();
        }
        remembered.insert(
            token.to_string(),
            Remembered {
                auth: auth.clone(),
                rule,
                expires,
            },
        );
    }

    /// The RequestAuthentication of the rule that would check a token of `issuer`.
    pub fn policy_of(&self, issuer: &str) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| r.issuer == issuer)
            .map(|r| r.policy.as_str())
    }
}

/// Does `jwk` allow `alg`: its declared `alg` if it has one, else its key type and curve.
fn key_allows(jwk: &Jwk, alg: Algorithm) -> bool {
    if let Some(declared) = jwk.common.key_algorithm {
        let same = matches!(
            (declared, alg),
            (KeyAlgorithm::HS256, Algorithm::HS256)
                | (KeyAlgorithm::HS384, Algorithm::HS384)
                | (KeyAlgorithm::HS512, Algorithm::HS512)
                | (KeyAlgorithm::ES256, Algorithm::ES256)
                | (KeyAlgorithm::ES384, Algorithm::ES384)
                | (KeyAlgorithm::RS256, Algorithm::RS256)
                | (KeyAlgorithm::RS384, Algorithm::RS384)
                | (KeyAlgorithm::RS512, Algorithm::RS512)
                | (KeyAlgorithm::PS256, Algorithm::PS256)
                | (KeyAlgorithm::PS384, Algorithm::PS384)
                | (KeyAlgorithm::PS512, Algorithm::PS512)
                | (KeyAlgorithm::EdDSA, Algorithm::EdDSA)
        );
        return same;
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        AlgorithmParameters::EllipticCurve(ec) => matches!(
            (&ec.curve, alg),
            (EllipticCurve::P256, Algorithm::ES256) | (EllipticCurve::P384, Algorithm::ES384)
        ),
        AlgorithmParameters::OctetKeyPair(_) => alg == Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => {
            matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
        }
    }
}

/// The `iss` of a token's payload, read before verification only to pick the rule that
/// verifies it (the verification checks it again).
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_string)
}

fn request_auth(claims: serde_json::Value) -> RequestAuth {
    let text = |k: &str| claims.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    RequestAuth {
        principal: format!("{}/{}", text("iss"), text("sub")),
        audiences,
        presenter: text("azp").to_string(),
        claims,
    }
}

/// A claim as a header value: a string as it is, a number or boolean as written, a list of
/// strings joined by commas; `a.b` reaches a nested claim.
fn claim_text(claims: &serde_json::Value, claim: &str) -> Option<String> {
    let mut value = claims.get(claim);
    if value.is_none() && claim.contains('.') {
        value = claim.split('.').try_fold(claims, |v, k| v.get(k));
    }
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Array(items) => Some(
            items
                .iter()
                .filter_map(|i| i.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => None,
    }
}

fn strip_prefix<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix.is_empty() {
        return Some(value);
    }
    // "Bearer " is matched without regard to case, as HTTP auth schemes are.
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name && !v.is_empty()).then(|| v.to_string())
    })
}

fn cookie_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_locations() {
        assert_eq!(strip_prefix("Bearer abc", "Bearer "), Some("abc"));
        assert_eq!(strip_prefix("bearer abc", "Bearer "), Some("abc"));
        assert_eq!(strip_prefix("Basic abc", "Bearer "), None);
        assert_eq!(
            query_param(Some("a=1&access_token=t"), "access_token").as_deref(),
            Some("t")
        );
        assert_eq!(query_param(Some("access_token="), "access_token"), None);
        let mut h = http::HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; session=tok"));
        assert_eq!(cookie_value(&h, "session").as_deref(), Some("tok"));
    }

    #[test]
    fn claims_as_header_values() {
        let claims = serde_json::json!({"sub": "x", "n": 4, "g": ["a", "b"], "o": {"t": "y"}});
        assert_eq!(claim_text(&claims, "sub").as_deref(), Some("x"));
        assert_eq!(claim_text(&claims, "n").as_deref(), Some("4"));
        assert_eq!(claim_text(&claims, "g").as_deref(), Some("a,b"));
        assert_eq!(claim_text(&claims, "o.t").as_deref(), Some("y"));
        assert_eq!(claim_text(&claims, "missing"), None);
    }
}
