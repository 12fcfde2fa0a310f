//! One request described on the command line (or in a test case), judged by
//! [`meshgate_policy::judge()`] — the function the inbound sidecar calls — so `test` and
//! `explain` can never disagree with a sidecar: a method the sidecar refuses (`delete`,
//! `CONNECT`: reason "bad request") or a path it cannot normalize (reason "bad path") is a
//! `bad-request` decision, as in the sidecar's logs and metrics (it answers 400).

use http::{HeaderMap, HeaderName, HeaderValue};
use meshgate_spiffe::SpiffeId;

use meshgate_policy::authz::{Decision, PolicySnapshot};
use meshgate_policy::judge::{HttpRequest, Refusal, judge};
use meshgate_policy::load::PolicySet;
use meshgate_policy::path::{NormalizedPath, PathError, normalize_path};
use meshgate_policy::validate::is_token;

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
    #[error(
        "an HTTP request needs both a method and a path; give neither for an L4 (TCP) connection"
    )]
    HalfHttp,
    #[error("an L4 (TCP) connection carries no headers; drop them or give a method and a path")]
    L4Headers,
}

/// A fully parsed request description: who calls which workload with what.
#[derive(Debug, Clone)]
pub struct Probe {
    pub peer: SpiffeId,
    /// The workload whose sidecar judges the request.
    pub workload: SpiffeId,
    /// The HTTP request: method and the path as the caller sent it (before normalization);
    /// `None` for an L4 (TCP) connection, which only identity and port rules judge.
    pub http: Option<(String, String)>,
    pub port: u16,
    pub headers: HeaderMap,
}

/// The outcome of a probe: the normalization result (none for L4) and the decision.
#[derive(Debug, Clone)]
pub struct Judgement {
    pub normalized: Option<Result<NormalizedPath, PathError>>,
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
        method: Option<&str>,
        path: Option<&str>,
        port: u16,
        headers: &[(String, String)],
    ) -> Result<Self, ProbeError> {
        let http = match (method, path) {
            (Some(method), Some(path)) => {
                if !is_token(method) {
                    return Err(ProbeError::Method(method.to_string()));
                }
                Some((method.to_string(), path.to_string()))
            }
            (None, None) if !headers.is_empty() => return Err(ProbeError::L4Headers),
            (None, None) => None,
            _ => return Err(ProbeError::HalfHttp),
        };
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
            http,
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
        let http = self.http.as_ref().map(|(method, target)| HttpRequest {
            method,
            target,
            headers: &self.headers,
        });
        let judged = judge(snapshot, &self.peer, self.port, http);
        let normalized = match (judged.normalized, judged.refusal) {
            (Some(n), _) => Some(Ok(n)),
            (None, Some(Refusal::Path(e))) => Some(Err(e)),
            // L4, or a method refused before the path was looked at: the path as sent.
            (None, Some(Refusal::Method(_))) => {
                self.http.as_ref().map(|(_, target)| normalize_path(target))
            }
            (None, None) => None,
        };
        Judgement {
            normalized,
            decision: judged.decision,
        }
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
