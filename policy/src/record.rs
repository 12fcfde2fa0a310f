//! The one record of an authorization decision.
//!
//! The sidecar builds a [`DecisionRecord`] once per decision — HTTP requests (allowed, denied,
//! refused as bad requests) and L4 tunnels alike — and writes that same value to its log line,
//! its trace span, its metrics and its decision feed. The serde names are the log's field names
//! (OpenTelemetry semantic conventions where one exists), so the tools that read decisions back
//! from logs (`policy suggest`, `policy diff --flows`, the demo's table) deserialize the very
//! type the sidecar wrote; a field renamed on one side breaks a round-trip test, not a user.

use meshgate_spiffe::SpiffeId;
use serde::{Deserialize, Serialize};

use crate::authz::{Decision, DecisionKind};

/// The `event` field of every decision log line.
pub const DECISION_EVENT: &str = "authz.decision";

/// Which layer decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// An HTTP request, judged per request.
    L7,
    /// An opaque TCP tunnel, judged by identity and port when it opens (and at policy swaps).
    L4,
}

impl Layer {
    fn l7() -> Self {
        Layer::L7
    }
}

/// One decision, as logged, traced, counted and published. Not `deny_unknown_fields`: a log
/// line carries a timestamp, a level and whatever a later sidecar adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// `l7` when absent: sidecars before 0.1 logged `layer` on L4 lines only.
    #[serde(default = "Layer::l7")]
    pub layer: Layer,
    /// The workload whose sidecar decided.
    #[serde(rename = "meshgate.workload.id")]
    pub workload: SpiffeId,
    /// The caller, as its certificate proved it.
    #[serde(rename = "peer.id")]
    pub peer: SpiffeId,
    #[serde(rename = "peer.addr", default, skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
    /// The app port the request or tunnel was for (0 when an older sidecar did not log it).
    #[serde(default)]
    pub port: u16,
    #[serde(
        rename = "http.request.method",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub method: Option<String>,
    /// The normalized path: what was judged and what the app received (none for L4 and for
    /// requests refused before normalization).
    #[serde(rename = "url.path", default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The target as the caller sent it, when it differs from `url.path` or could not be
    /// normalized.
    #[serde(
        rename = "meshgate.path.original",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub original: Option<String>,
    pub decision: DecisionKind,
    /// `namespace/name` of the deciding policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    #[serde(rename = "policy.version")]
    pub version: std::sync::Arc<str>,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run_policy: Option<String>,
    /// The W3C trace ID of the request's span, when tracing is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl DecisionRecord {
    /// The record of `decision`, made by `workload`'s sidecar for `peer` on `port`.
    pub fn new(
        layer: Layer,
        workload: &SpiffeId,
        peer: &SpiffeId,
        port: u16,
        decision: &Decision,
    ) -> Self {
        Self::from_decision(layer, workload, peer, port, decision.clone())
    }

    /// [`DecisionRecord::new`] taking the decision's strings rather than copying them (the
    /// sidecar's per-request path).
    pub fn from_decision(
        layer: Layer,
        workload: &SpiffeId,
        peer: &SpiffeId,
        port: u16,
        decision: Decision,
    ) -> Self {
        Self {
            layer,
            workload: workload.clone(),
            peer: peer.clone(),
            peer_addr: None,
            port,
            method: None,
            path: None,
            original: None,
            decision: decision.kind,
            policy: decision.policy,
            rule: decision.rule,
            version: decision.version,
            reason: decision.reason,
            audit_policy: decision.audit_policy,
            dry_run_policy: decision.dry_run_policy,
            trace_id: None,
        }
    }

    /// True when the request or tunnel may pass.
    pub fn allowed(&self) -> bool {
        matches!(
            self.decision,
            DecisionKind::Allow | DecisionKind::Audit | DecisionKind::DryRunDeny
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_log_line_with_extra_fields() {
        let line = r#"{"timestamp":"t","level":"INFO","event":"authz.decision","layer":"l7","meshgate.workload.id":"spiffe://mesh.local/ns/shop/sa/orders","peer.id":"spiffe://mesh.local/ns/shop/sa/web","peer.addr":"127.0.0.1:5555","port":8080,"http.request.method":"GET","url.path":"/orders/1","decision":"allow","policy":"shop/orders-readers","rule":0,"policy.version":"ab12","reason":"r","target":"meshgate_proxy::inbound::authz"}"#;
        let r: DecisionRecord = serde_json::from_str(line).unwrap();
        assert_eq!(r.layer, Layer::L7);
        assert_eq!(r.path.as_deref(), Some("/orders/1"));
        assert_eq!(r.decision, DecisionKind::Allow);
        assert!(r.allowed());
        let back: DecisionRecord =
            serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn refuses_an_unknown_decision_label() {
        let line = r#"{"layer":"l4","meshgate.workload.id":"spiffe://a/ns/b/sa/c","peer.id":"spiffe://a/ns/b/sa/d","port":1,"decision":"maybe","policy.version":"v","reason":"r"}"#;
        assert!(serde_json::from_str::<DecisionRecord>(line).is_err());
    }
}
