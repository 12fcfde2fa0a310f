//! Kubernetes ServiceAccount tokens as the CA checks them: a compact JWS (RFC 7515) signed with
//! RS256 (what API servers use) or ES256, whose claims name one ServiceAccount of one pod.
//!
//! Everything here is synchronous and pure (the key set and the clock are arguments), so the
//! rules can be tested without a network; fetching the keys is [`super::jwks`]'s job.
//!
//! The order of the checks matters: the signature is verified before any claim is believed, so
//! an error that quotes a claim (expired, wrong audience, …) is only ever about a token the
//! cluster really signed.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature;
use serde::Deserialize;

/// Allowed difference between the API server's clock and ours for `nbf` and `iat`: 30 s. A token
/// minted by an API server whose clock runs slightly ahead must not be refused for being "from
/// the future"; `exp` gets no leeway (fail closed: kubelet rewrites the token long before it
/// expires, and the sidecar re-reads the file at every attempt).
pub const CLOCK_LEEWAY_SECS: i64 = 30;
/// Longest token accepted, in bytes (a Kubernetes token is about 1 KiB; the HTTP header limit
/// of the CA is 16 KiB anyway).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a ServiceAccount token was refused. Every message names the cause and what to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum K8sTokenError {
    #[error("ServiceAccount token is malformed: {0}")]
    Malformed(String),
    #[error(
        "ServiceAccount token uses alg {alg:?}, which is refused (only RS256 and ES256 signatures from the cluster's published keys are accepted)"
    )]
    AlgRefused { alg: String },
    #[error(
        "ServiceAccount token has no key id (kid); the CA cannot tell which of the cluster's keys signed it"
    )]
    NoKeyId,
    #[error(
        "ServiceAccount token is signed with key id {kid:?}, which the cluster's key set (JWKS) does not hold, even after re-fetching it; is --k8s-issuer the issuer of the cluster that minted the token?"
    )]
    UnknownKey { kid: String },
    #[error(
        "the cluster's ServiceAccount signing keys are not available yet ({reason}); the CA keeps fetching them — check --k8s-issuer / --k8s-jwks-url, --k8s-api-ca and the CA's RBAC (system:service-account-issuer-discovery)"
    )]
    KeysUnavailable { reason: String },
    #[error("ServiceAccount token says alg {alg} but key {kid:?} is {key_type}; refused")]
    AlgKeyMismatch {
        alg: String,
        kid: String,
        key_type: &'static str,
    },
    #[error(
        "ServiceAccount token signature does not verify against key {kid:?} of the cluster (forged or altered token)"
    )]
    BadSignature { kid: String },
    #[error("ServiceAccount token was issued by {got:?}, not by {want:?} (the CA's --k8s-issuer)")]
    WrongIssuer { got: String, want: String },
    #[error(
        "ServiceAccount token is for audience {got:?}, not {want:?}: project the token with `audience: {want}` (or change --k8s-audience)"
    )]
    WrongAudience { got: Vec<String>, want: String },
    #[error(
        "ServiceAccount token of {subject} expired at {exp} (Unix time; now {now}); kubelet rewrites projected tokens before they expire — is the token file a stale copy?"
    )]
    Expired { subject: String, exp: i64, now: i64 },
    #[error(
        "ServiceAccount token of {subject} is not valid before {at} (Unix time; now {now}, leeway {CLOCK_LEEWAY_SECS} s); check the clocks of the CA and the API server"
    )]
    NotYetValid { subject: String, at: i64, now: i64 },
    #[error(
        "ServiceAccount token lacks the claim {0}; it is not a Kubernetes ServiceAccount token"
    )]
    MissingClaim(&'static str),
    #[error("ServiceAccount token claims disagree: {0}")]
    Inconsistent(String),
    #[error(
        "ServiceAccount token of {subject} is not bound to a pod (no kubernetes.io.pod claim); mount a projected serviceAccountToken volume instead of a token made with `kubectl create token`"
    )]
    NotPodBound { subject: String },
}

impl K8sTokenError {
    /// The stable error code of the CA API (`error` in the JSON answer, `code` in logs and the
    /// `meshgate_ca_svid_refusals_total` metric).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "token_malformed",
            Self::AlgRefused { .. } | Self::AlgKeyMismatch { .. } => "token_alg_refused",
            Self::NoKeyId | Self::UnknownKey { .. } => "token_unknown_key",
            Self::KeysUnavailable { .. } => "k8s_keys_unavailable",
            Self::BadSignature { .. } => "token_invalid",
            Self::WrongIssuer { .. } => "token_wrong_issuer",
            Self::WrongAudience { .. } => "token_wrong_audience",
            Self::Expired { .. } => "token_expired",
            Self::NotYetValid { .. } => "token_not_yet_valid",
            Self::MissingClaim(_) | Self::Inconsistent(_) => "token_claims_invalid",
            Self::NotPodBound { .. } => "token_not_pod_bound",
        }
    }
}

/// True when `token` has the shape of a compact JWS (three base64url parts, a JSON header):
/// how the CA tells a ServiceAccount token from a join token (`mgjt1.…`).
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.trim().split('.');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(h), Some(_), Some(_), None) if h.starts_with("eyJ")
    )
}

/// The signature algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    fn parse(alg: &str) -> Result<Self, K8sTokenError> {
        match alg {
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            // `none` and the HMAC algorithms are the classic JWT confusion attacks (an unsigned
            // token, or one "signed" with the public key as an HMAC secret); everything else is
            // simply not what clusters use.
            other => Err(K8sTokenError::AlgRefused {
                alg: other.to_string(),
            }),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

/// One public key of the cluster (a JWK of the JWKS).
#[derive(Clone)]
pub struct VerifyingKey {
    kid: String,
    key: KeyMaterial,
}

#[derive(Clone)]
enum KeyMaterial {
    /// Modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// Uncompressed P-256 point (`04 || x || y`).
    EcP256 { point: Vec<u8> },
}

impl KeyMaterial {
    fn alg(&self) -> Alg {
        match self {
            Self::Rsa { .. } => Alg::Rs256,
            Self::EcP256 { .. } => Alg::Es256,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Self::Rsa { .. } => "an RSA key",
            Self::EcP256 { .. } => "a P-256 key",
        }
    }
}

impl VerifyingKey {
    /// The key id (`kid`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    fn verify(&self, alg: Alg, signed: &[u8], sig: &[u8]) -> Result<(), K8sTokenError> {
        if alg != self.key.alg() {
            return Err(K8sTokenError::AlgKeyMismatch {
                alg: alg.as_str().to_string(),
                kid: self.kid.clone(),
                key_type: self.key.type_name(),
            });
        }
        let ok = match &self.key {
            // 2048 to 8192-bit moduli: ring refuses shorter (weak) keys outright.
            KeyMaterial::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
                .is_ok(),
            // JWS ES256 signatures are the fixed-size r || s, not DER.
            KeyMaterial::EcP256 { point } => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed, sig)
                    .is_ok()
            }
        };
        if ok {
            Ok(())
        } else {
            Err(K8sTokenError::BadSignature {
                kid: self.kid.clone(),
            })
        }
    }
}

/// The cluster's public keys, by key id.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<VerifyingKey>,
}

/// Why a JWKS document cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksParseError {
    #[error("not a JWKS document (expected {{\"keys\": [...]}}): {0}")]
    NotJwks(String),
    #[error(
        "the JWKS holds no usable signing key (RSA, or EC P-256, with a kid); skipped: {skipped:?}"
    )]
    NoUsableKey { skipped: Vec<String> },
}

#[derive(Deserialize)]
struct JwksDoc {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Most keys read from one JWKS: a cluster publishes a handful (current and previous).
const MAX_KEYS: usize = 64;

impl KeySet {
    /// Parses a JWKS (RFC 7517). Keys that cannot verify tokens here (other types or curves,
    /// encryption keys, no `kid`) are skipped and reported; a set with no usable key is an
    /// error, so a broken answer never replaces a good key set.
    pub fn from_jwks(json: &[u8]) -> Result<Self, JwksParseError> {
        let doc: JwksDoc =
            serde_json::from_slice(json).map_err(|e| JwksParseError::NotJwks(e.to_string()))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for value in doc.keys.into_iter().take(MAX_KEYS) {
            match parse_jwk(value) {
                Ok(key) => keys.push(key),
                Err(why) => skipped.push(why),
            }
        }
        if keys.is_empty() {
            return Err(JwksParseError::NoUsableKey { skipped });
        }
        Ok(Self { keys })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key with this id.
    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

fn parse_jwk(value: serde_json::Value) -> Result<VerifyingKey, String> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|e| format!("unreadable JWK: {e}"))?;
    let kid = jwk
        .kid
        .ok_or_else(|| format!("{} key without kid", jwk.kty))?;
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Err(format!("{kid}: not a signing key (use {:?})", jwk.use_));
    }
    let b64 = |field: &str, v: Option<String>| -> Result<Vec<u8>, String> {
        let v = v.ok_or_else(|| format!("{kid}: missing {field}"))?;
        B64.decode(v.trim_end_matches('='))
            .map_err(|_| format!("{kid}: {field} is not base64url"))
    };
    let key = match jwk.kty.as_str() {
        "RSA" => {
            if jwk.alg.as_deref().is_some_and(|a| a != "RS256") {
                return Err(format!("{kid}: RSA key for alg {:?}", jwk.alg));
            }
            let n = strip_leading_zeros(b64("n", jwk.n)?);
            let e = strip_leading_zeros(b64("e", jwk.e)?);
            KeyMaterial::Rsa { n, e }
        }
        "EC" => {
            if jwk.crv.as_deref() != Some("P-256") {
                return Err(format!("{kid}: EC curve {:?} is not P-256", jwk.crv));
            }
            if jwk.alg.as_deref().is_some_and(|a| a != "ES256") {
                return Err(format!("{kid}: P-256 key for alg {:?}", jwk.alg));
            }
            let (x, y) = (b64("x", jwk.x)?, b64("y", jwk.y)?);
            if x.len() != 32 || y.len() != 32 {
                return Err(format!("{kid}: P-256 coordinates must be 32 bytes"));
            }
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            KeyMaterial::EcP256 { point }
        }
        other => return Err(format!("{kid}: key type {other} is not supported")),
    };
    Ok(VerifyingKey { kid, key })
}

/// RFC 7518 encodes n and e without leading zeros, but some encoders keep them; ring wants none.
fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros.min(v.len().saturating_sub(1)));
    v
}

/// The JOSE header.
#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    /// RFC 7515 §4.1.11: extensions the recipient must understand; none are understood here.
    crit: Option<serde_json::Value>,
}

/// `aud` is a string or an array of strings (RFC 7519 §4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims Kubernetes puts in a ServiceAccount token (unknown ones, such as `jti`, are
/// ignored). Everything is optional here so that a missing claim gets its own error.
#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<i64>,
    nbf: Option<i64>,
    iat: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Deserialize)]
struct KubernetesClaim {
    namespace: Option<String>,
    serviceaccount: Option<ObjectRef>,
    pod: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: Option<String>,
    uid: Option<String>,
}

/// What a verified token proves: a pod running as a ServiceAccount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountToken {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to (`kubernetes.io.pod`).
    pub pod_name: String,
    pub pod_uid: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// The key that signed it.
    pub kid: String,
}

/// What the CA requires of a token besides a good signature.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// `iss` must equal this exactly.
    pub issuer: String,
    /// `aud` must contain this.
    pub audience: String,
}

/// A token split into its parts, header decoded, nothing verified yet.
struct Parsed<'a> {
    alg: Alg,
    kid: String,
    signed: &'a str,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

fn malformed(what: &str) -> K8sTokenError {
    K8sTokenError::Malformed(what.to_string())
}

fn split(token: &str) -> Result<(&str, &str, &str), K8sTokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(malformed("longer than 8 KiB"));
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => Ok((h, p, s)),
        _ => Err(malformed(
            "expected three base64url parts separated by '.' (a compact JWS)",
        )),
    }
}

fn parse(token: &str) -> Result<Parsed<'_>, K8sTokenError> {
    let token = token.trim();
    let (h, p, s) = split(token)?;
    let header = B64
        .decode(h)
        .map_err(|_| malformed("header is not base64url"))?;
    let header: Header =
        serde_json::from_slice(&header).map_err(|e| malformed(&format!("header: {e}")))?;
    let alg = Alg::parse(&header.alg)?;
    if header.crit.is_some() {
        return Err(malformed(
            "header has \"crit\" extensions, which this CA does not understand",
        ));
    }
    let kid = header
        .kid
        .filter(|k| !k.is_empty())
        .ok_or(K8sTokenError::NoKeyId)?;
    let payload = B64
        .decode(p)
        .map_err(|_| malformed("payload is not base64url"))?;
    let signature = B64
        .decode(s)
        .map_err(|_| malformed("signature is not base64url"))?;
    Ok(Parsed {
        alg,
        kid,
        signed: &token[..h.len() + 1 + p.len()],
        payload,
        signature,
    })
}

/// The key id a token names (to look it up, or to decide to re-fetch the key set).
pub fn key_id(token: &str) -> Result<String, K8sTokenError> {
    parse(token).map(|p| p.kid)
}

/// Verifies `token` against `keys` and the expectations, at Unix time `now`.
/// [`K8sTokenError::UnknownKey`] means the caller may re-fetch the key set and try again.
pub fn verify(
    token: &str,
    keys: &KeySet,
    expect: &Expectations,
    now: i64,
) -> Result<ServiceAccountToken, K8sTokenError> {
    let parsed = parse(token)?;
    let key = keys.get(&parsed.kid).ok_or(K8sTokenError::UnknownKey {
        kid: parsed.kid.clone(),
    })?;
    key.verify(parsed.alg, parsed.signed.as_bytes(), &parsed.signature)?;
    // Only now are the claims the cluster's word.
    let claims: Claims =
        serde_json::from_slice(&parsed.payload).map_err(|e| malformed(&format!("claims: {e}")))?;
    check_claims(claims, expect, now, parsed.kid)
}

fn check_claims(
    claims: Claims,
    expect: &Expectations,
    now: i64,
    kid: String,
) -> Result<ServiceAccountToken, K8sTokenError> {
    let iss = claims.iss.ok_or(K8sTokenError::MissingClaim("iss"))?;
    if iss != expect.issuer {
        return Err(K8sTokenError::WrongIssuer {
            got: iss,
            want: expect.issuer.clone(),
        });
    }
    let aud = match claims.aud.ok_or(K8sTokenError::MissingClaim("aud"))? {
        Audience::One(a) => vec![a],
        Audience::Many(a) => a,
    };
    if !aud.contains(&expect.audience) {
        return Err(K8sTokenError::WrongAudience {
            got: aud,
            want: expect.audience.clone(),
        });
    }
    let sub = claims.sub.ok_or(K8sTokenError::MissingClaim("sub"))?;
    let exp = claims.exp.ok_or(K8sTokenError::MissingClaim("exp"))?;
    if exp <= now {
        return Err(K8sTokenError::Expired {
            subject: sub,
            exp,
            now,
        });
    }
    for at in [claims.nbf, claims.iat].into_iter().flatten() {
        if at > now + CLOCK_LEEWAY_SECS {
            return Err(K8sTokenError::NotYetValid {
                subject: sub,
                at,
                now,
            });
        }
    }
    let (ns, sa) = subject_parts(&sub)?;
    let k8s = claims
        .kubernetes
        .ok_or(K8sTokenError::MissingClaim("kubernetes.io"))?;
    let claim_ns = k8s
        .namespace
        .ok_or(K8sTokenError::MissingClaim("kubernetes.io.namespace"))?;
    let claim_sa = k8s
        .serviceaccount
        .and_then(|s| s.name)
        .ok_or(K8sTokenError::MissingClaim(
            "kubernetes.io.serviceaccount.name",
        ))?;
    if claim_ns != ns || claim_sa != sa {
        return Err(K8sTokenError::Inconsistent(format!(
            "sub {sub:?} names {ns}/{sa} but kubernetes.io names {claim_ns}/{claim_sa}"
        )));
    }
    let (pod_name, pod_uid) = match k8s.pod {
        Some(ObjectRef {
            name: Some(name),
            uid: Some(uid),
        }) if !name.is_empty() && !uid.is_empty() => (name, uid),
        _ => return Err(K8sTokenError::NotPodBound { subject: sub }),
    };
    Ok(ServiceAccountToken {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        pod_name,
        pod_uid,
        exp,
        kid,
    })
}

/// `system:serviceaccount:<namespace>:<name>`, with Kubernetes' own name rules: the namespace
/// is a DNS label (RFC 1123), the ServiceAccount name a DNS subdomain (it may contain dots).
/// Both become segments of the SPIFFE ID, so nothing else may pass.
fn subject_parts(sub: &str) -> Result<(&str, &str), K8sTokenError> {
    let bad = |why: String| K8sTokenError::Inconsistent(why);
    let rest = sub.strip_prefix("system:serviceaccount:").ok_or_else(|| {
        bad(format!(
            "sub {sub:?} is not a ServiceAccount (system:serviceaccount:<namespace>:<name>)"
        ))
    })?;
    let (ns, sa) = rest.split_once(':').ok_or_else(|| {
        bad(format!(
            "sub {sub:?} is not system:serviceaccount:<namespace>:<name>"
        ))
    })?;
    if !is_dns_label(ns) {
        return Err(bad(format!(
            "namespace {ns:?} in sub is not a valid Kubernetes namespace name"
        )));
    }
    if sa.len() > 253 || !sa.split('.').all(is_dns_label) {
        return Err(bad(format!(
            "ServiceAccount {sa:?} in sub is not a valid Kubernetes ServiceAccount name"
        )));
    }
    Ok((ns, sa))
}

/// RFC 1123 label: 1–63 of `[a-z0-9-]`, starting and ending with a letter or digit.
fn is_dns_label(s: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|c| alnum(c) || c == b'-')
        && alnum(s.as_bytes()[0])
        && alnum(s.as_bytes()[s.len() - 1])
}

/// Reads the ServiceAccount a token names **without** verifying anything: for the workload,
/// which must put its SPIFFE ID in the CSR but holds no keys. Never use this to authorize: the
/// CA issues from the verified claims only, and refuses a CSR asking for anything else.
pub fn peek_service_account(token: &str) -> Result<(String, String), K8sTokenError> {
    let (_, p, _) = split(token.trim())?;
    let payload = B64
        .decode(p)
        .map_err(|_| malformed("payload is not base64url"))?;
    let claims: Claims =
        serde_json::from_slice(&payload).map_err(|e| malformed(&format!("claims: {e}")))?;
    let sub = claims.sub.ok_or(K8sTokenError::MissingClaim("sub"))?;
    let (ns, sa) = subject_parts(&sub)?;
    Ok((ns.to_string(), sa.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const NOW: i64 = 1_800_000_000;

    struct Signer {
        kid: String,
        key: EcdsaKeyPair,
    }

    impl Signer {
        fn new(kid: &str) -> Self {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .unwrap();
            Self {
                kid: kid.into(),
                key,
            }
        }

        fn jwk(&self) -> serde_json::Value {
            let point = self.key.public_key().as_ref();
            serde_json::json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig",
                "alg": "ES256", "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..])})
        }

        fn sign_raw(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
            let signed = format!(
                "{}.{}",
                B64.encode(header.to_string()),
                B64.encode(claims.to_string())
            );
            let sig = self
                .key
                .sign(&SystemRandom::new(), signed.as_bytes())
                .unwrap();
            format!("{signed}.{}", B64.encode(sig.as_ref()))
        }

        fn sign(&self, claims: &serde_json::Value) -> String {
            self.sign_raw(
                &serde_json::json!({"alg": "ES256", "kid": self.kid}),
                claims,
            )
        }
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({
            "aud": ["meshgate-ca"], "exp": NOW + 600, "iat": NOW - 10, "nbf": NOW - 10,
            "iss": ISS, "jti": "6a7c1b8e-0f0e-4a43-9d2a-6f1c1f0a1a11",
            "kubernetes.io": {
                "namespace": "shop",
                "node": {"name": "kind-worker", "uid": "0b8e3c1e-1111-4c2b-9a0e-2f6b1c3d4e5f"},
                "pod": {"name": "web-7d4b9c6f5-x2x9z", "uid": "3f1d9a52-2222-4d7e-8c55-8a1b2c3d4e5f"},
                "serviceaccount": {"name": "web", "uid": "a1b2c3d4-3333-4e5f-8a9b-0c1d2e3f4a5b"}
            },
            "sub": "system:serviceaccount:shop:web"
        })
    }

    fn expect() -> Expectations {
        Expectations {
            issuer: ISS.into(),
            audience: "meshgate-ca".into(),
        }
    }

    fn keys(signers: &[&Signer]) -> KeySet {
        let jwks = serde_json::json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()});
        KeySet::from_jwks(jwks.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn claim_rules() {
        let signer = Signer::new("k1");
        let keys = keys(&[&signer]);
        let ok = verify(&signer.sign(&claims()), &keys, &expect(), NOW).unwrap();
        assert_eq!(
            (ok.namespace.as_str(), ok.service_account.as_str()),
            ("shop", "web")
        );
        assert_eq!(ok.pod_name, "web-7d4b9c6f5-x2x9z");
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = claims();
            f(&mut c);
            verify(&signer.sign(&c), &keys, &expect(), NOW)
        };
        // A single-string audience is fine too.
        assert!(with(&|c| c["aud"] = "meshgate-ca".into()).is_ok());
        // Clock leeway applies to nbf/iat only.
        assert!(with(&|c| c["iat"] = (NOW + CLOCK_LEEWAY_SECS).into()).is_ok());
        // A ServiceAccount name may be a DNS subdomain.
        assert!(
            with(&|c| {
                c["sub"] = "system:serviceaccount:shop:web.v2".into();
                c["kubernetes.io"]["serviceaccount"]["name"] = "web.v2".into();
            })
            .is_ok()
        );
        type Case = (
            &'static str,
            Box<dyn Fn(&mut serde_json::Value)>,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "expired",
                Box::new(|c| c["exp"] = NOW.into()),
                "token_expired",
            ),
            (
                "nbf ahead",
                Box::new(|c| c["nbf"] = (NOW + 31).into()),
                "token_not_yet_valid",
            ),
            (
                "iat ahead",
                Box::new(|c| c["iat"] = (NOW + 31).into()),
                "token_not_yet_valid",
            ),
            (
                "audience",
                Box::new(|c| c["aud"] = serde_json::json!(["https://kubernetes.default.svc"])),
                "token_wrong_audience",
            ),
            (
                "issuer",
                Box::new(|c| c["iss"] = "https://evil.example".into()),
                "token_wrong_issuer",
            ),
            (
                "no sub",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("sub");
                }),
                "token_claims_invalid",
            ),
            (
                "no exp",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                "token_claims_invalid",
            ),
            (
                "no aud",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("aud");
                }),
                "token_claims_invalid",
            ),
            (
                "no kubernetes.io",
                Box::new(|c| {
                    c.as_object_mut().unwrap().remove("kubernetes.io");
                }),
                "token_claims_invalid",
            ),
            (
                "not pod bound",
                Box::new(|c| {
                    c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
                }),
                "token_not_pod_bound",
            ),
            (
                "sub vs namespace",
                Box::new(|c| c["kubernetes.io"]["namespace"] = "kube-system".into()),
                "token_claims_invalid",
            ),
            (
                "sub vs account",
                Box::new(|c| c["kubernetes.io"]["serviceaccount"]["name"] = "admin".into()),
                "token_claims_invalid",
            ),
            (
                "user subject",
                Box::new(|c| c["sub"] = "system:admin".into()),
                "token_claims_invalid",
            ),
            (
                "bad namespace",
                Box::new(|c| {
                    c["sub"] = "system:serviceaccount:Shop:web".into();
                    c["kubernetes.io"]["namespace"] = "Shop".into();
                }),
                "token_claims_invalid",
            ),
            (
                "dot account",
                Box::new(|c| {
                    c["sub"] = "system:serviceaccount:shop:..".into();
                    c["kubernetes.io"]["serviceaccount"]["name"] = "..".into();
                }),
                "token_claims_invalid",
            ),
            (
                "float exp",
                Box::new(|c| c["exp"] = serde_json::json!((NOW + 600) as f64 + 0.5)),
                "token_malformed",
            ),
        ];
        for (name, tweak, code) in cases {
            let err = with(&*tweak).expect_err(name);
            assert_eq!(err.code(), code, "{name}: {err}");
        }
    }

    #[test]
    fn header_and_signature_rules() {
        let signer = Signer::new("k1");
        let other = Signer::new("k1");
        let keys = keys(&[&signer]);
        let check = |token: &str| {
            verify(token, &keys, &expect(), NOW)
                .map(|_| ())
                .map_err(|e| e.code())
        };
        // Same kid, other key: forged.
        assert_eq!(check(&other.sign(&claims())), Err("token_invalid"));
        // Claims swapped after signing.
        let good = signer.sign(&claims());
        let mut c = claims();
        c["sub"] = "system:serviceaccount:shop:admin".into();
        c["kubernetes.io"]["serviceaccount"]["name"] = "admin".into();
        let parts: Vec<&str> = good.split('.').collect();
        let swapped = format!("{}.{}.{}", parts[0], B64.encode(c.to_string()), parts[2]);
        assert_eq!(check(&swapped), Err("token_invalid"));
        // alg none, HMAC, unknown kid, no kid, crit.
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none","kid":"k1"}"#),
            parts[1]
        );
        assert_eq!(check(&none), Err("token_alg_refused"));
        let hs = signer.sign_raw(&serde_json::json!({"alg": "HS256", "kid": "k1"}), &claims());
        assert_eq!(check(&hs), Err("token_alg_refused"));
        let rs = signer.sign_raw(&serde_json::json!({"alg": "RS256", "kid": "k1"}), &claims());
        assert_eq!(check(&rs), Err("token_alg_refused"));
        let unknown = signer.sign_raw(&serde_json::json!({"alg": "ES256", "kid": "k2"}), &claims());
        assert_eq!(check(&unknown), Err("token_unknown_key"));
        let nokid = signer.sign_raw(&serde_json::json!({"alg": "ES256"}), &claims());
        assert_eq!(check(&nokid), Err("token_unknown_key"));
        let crit = signer.sign_raw(
            &serde_json::json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}),
            &claims(),
        );
        assert_eq!(check(&crit), Err("token_malformed"));
        assert_eq!(check("a.b"), Err("token_malformed"));
        assert!(looks_like_jwt(&good));
        assert!(!looks_like_jwt("mgjt1.abc.def"));
        assert_eq!(
            peek_service_account(&good).unwrap(),
            ("shop".to_string(), "web".to_string())
        );
    }

    #[test]
    fn jwks_parsing() {
        let signer = Signer::new("k1");
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            signer.jwk(),
        ]});
        let set = KeySet::from_jwks(jwks.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.get("k1").is_some());
        let none = serde_json::json!({"keys": [{"kty": "oct", "kid": "sym", "k": "c2VjcmV0"}]});
        assert!(matches!(
            KeySet::from_jwks(none.to_string().as_bytes()),
            Err(JwksParseError::NoUsableKey { .. })
        ));
        assert!(matches!(
            KeySet::from_jwks(b"<html>"),
            Err(JwksParseError::NotJwks(_))
        ));
    }
}
