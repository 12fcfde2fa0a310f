//! One request, judged exactly as the inbound sidecar judges it: the raw path is normalized first
//! and a path that cannot be normalized is refused before any policy is consulted (the sidecar
//! answers 400), so `test` and `explain` report that as a `deny` with reason "bad path"; so is a
//! method the sidecar refuses (`delete`, `CONNECT`: reason "bad request").

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use meshgate_ca::SpiffeId;

use crate::authz::{AuthzRequest, Decision, DecisionKind, PolicySnapshot};
use crate::load::PolicySet;
use crate::method::check_method;
use crate::path::{NormalizedPath, PathError, normalize_path};
use crate::validate::is_token;

/// The app port assumed when none is given (what the sample apps and docs use).
pub const DEFAULT_PORT: u16 = 8080;

/// Why a request description cannot be judged (the input is wrong, not the request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("{what} {value:?} is not a SPIFFE ID: {reason}")]
    Id {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("method {0:?} is not an HTTP method token (RFC 9110)")]
    Method(String),
    #[error("header name {0:?} is not a valid HTTP header name")]
    HeaderName(String),
    #[error("header {0:?} has a value that is not a valid HTTP header value")]
    HeaderValue(String),
}

/// A fully parsed request description: who calls which workload with what.
#[derive(Debug, Clone)]
pub struct Probe {
    pub peer: SpiffeId,
    /// The workload whose sidecar judges the request.
    pub workload: SpiffeId,
    pub method: String,
    /// The path as the caller sent it (before normalization).
    pub raw_path: String,
    pub port: u16,
    pub headers: HeaderMap,
}

/// The outcome of a probe: the normalization result and the decision.
#[derive(Debug, Clone)]
pub struct Judgement {
    pub normalized: Result<NormalizedPath, PathError>,
    pub decision: Decision,
}

/// Parses a SPIFFE ID, naming the argument in the error.
pub fn parse_id(what: &'static str, value: &str) -> Result<SpiffeId, ProbeError> {
    SpiffeId::parse(value).map_err(|e| ProbeError::Id {
        what,
        value: value.to_string(),
        reason: e.to_string(),
    })
}

impl Probe {
    /// Checks and assembles a request description.
    pub fn new(
        from: &str,
        to: &str,
        method: &str,
        path: &str,
        port: u16,
        headers: &[(String, String)],
    ) -> Result<Self, ProbeError> {
        if !is_token(method) {
            return Err(ProbeError::Method(method.to_string()));
        }
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| ProbeError::HeaderName(k.clone()))?;
            let value = HeaderValue::from_str(v).map_err(|_| ProbeError::HeaderValue(k.clone()))?;
            map.append(name, value);
        }
        Ok(Self {
            peer: parse_id("from", from)?,
            workload: parse_id("to", to)?,
            method: method.to_string(),
            raw_path: path.to_string(),
            port,
            headers: map,
        })
    }

    /// Judges the probe against `set`, compiled for the probe's workload.
    pub fn judge(&self, set: &PolicySet) -> Judgement {
        self.judge_with(&PolicySnapshot::compile(set, &self.workload))
    }

    /// Judges the probe against an already compiled snapshot (of the probe's workload).
    pub fn judge_with(&self, snapshot: &PolicySnapshot) -> Judgement {
        let normalized = normalize_path(&self.raw_path);
        if let Err(e) = check_method(&self.method) {
            return Judgement {
                normalized,
                decision: refused(snapshot, format!("bad request: {e}")),
            };
        }
        let decision = match &normalized {
            Ok(n) => snapshot.evaluate(&AuthzRequest {
                peer: &self.peer,
                method: Some(&self.method),
                path: Some(&n.path),
                port: self.port,
                headers: Some(&self.headers),
            }),
            Err(e) => refused(snapshot, format!("bad path: {e}")),
        };
        Judgement {
            normalized,
            decision,
        }
    }
}

/// The decision the sidecar's 400 amounts to: refused before any policy is consulted.
fn refused(snapshot: &PolicySnapshot, reason: String) -> Decision {
    Decision {
        kind: DecisionKind::Deny,
        allowed: false,
        policy: None,
        rule: None,
        version: Arc::from(snapshot.version()),
        reason,
        audit_policy: None,
        dry_run_policy: None,
    }
}

/// `policy rule N`, or `no policy` for decisions without a deciding rule.
pub fn describe_hit(policy: Option<&str>, rule: Option<usize>) -> String {
    match (policy, rule) {
        (Some(p), Some(r)) => format!("policy {p} rule {r}"),
        (Some(p), None) => format!("policy {p}"),
        (None, Some(r)) => format!("rule {r}"),
        (None, None) => "no policy".to_string(),
    }
}
