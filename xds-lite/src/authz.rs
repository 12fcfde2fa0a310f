//! Compiled, indexed authorization for one workload. (Interface; implementation in progress.)

use std::sync::Arc;

use meshgate_ca::SpiffeId;

use crate::load::PolicySet;

/// What a request is judged on. `method`/`path` are `None` for L4 (TCP) connections: rules with
/// L7 conditions never match those.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    pub peer: &'a SpiffeId,
    pub method: Option<&'a str>,
    /// Already normalized (see [`crate::path::normalize_path`]).
    pub path: Option<&'a str>,
    /// The destination port of the workload's app.
    pub port: u16,
    pub headers: Option<&'a http::HeaderMap>,
}

/// The decision label used in logs, metrics and traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionKind {
    Allow,
    Deny,
    /// Allowed, and an AUDIT policy matched.
    Audit,
    /// Allowed, but a dry-run policy would have denied it.
    DryRunDeny,
}

impl DecisionKind {
    /// `allow` | `deny` | `audit` | `dry-run-deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::DryRunDeny => "dry-run-deny",
        }
    }
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub kind: DecisionKind,
    /// True when the request may pass (allow, audit, dry-run-deny).
    pub allowed: bool,
    /// `namespace/name` of the policy that decided, if any (none for the mesh default).
    pub policy: Option<String>,
    /// Index of the deciding rule within that policy.
    pub rule: Option<usize>,
    pub version: Arc<str>,
    /// Human-readable reason, for logs (never sent to the caller).
    pub reason: String,
}

/// The policies that apply to one workload, compiled and indexed.
#[derive(Debug)]
pub struct PolicySnapshot {
    version: Arc<str>,
}

impl PolicySnapshot {
    /// Compiles the policies of `set` that apply to `workload`.
    pub fn compile(set: &PolicySet, workload: &SpiffeId) -> Self {
        let _ = (set, workload);
        todo!()
    }

    /// The snapshot in force before any policy was loaded: denies everything.
    pub fn deny_all(workload: &SpiffeId) -> Self {
        let _ = workload;
        Self { version: Arc::from("none") }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Judges one request.
    pub fn evaluate(&self, req: &AuthzRequest<'_>) -> Decision {
        let _ = req;
        todo!()
    }

    /// JSON view of the compiled policy for the admin `/config` endpoint.
    pub fn dump(&self) -> serde_json::Value {
        todo!()
    }
}
