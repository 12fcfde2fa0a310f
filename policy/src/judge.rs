//! One request judged exactly as the inbound sidecar judges it.
//!
//! The sidecar's authorization layer and the operator tools (`meshgate policy explain`,
//! `meshgate policy test`, the differential tests) all call [`judge`], so a tool can never
//! disagree with what a sidecar decides. In order:
//! 1. a method that is not in canonical form, or `CONNECT`, is refused ([`check_method`]);
//! 2. the request target is normalized ([`normalize_path`]); a target that cannot be is refused;
//! 3. the normalized path is evaluated against the workload's compiled policy.
//!
//! A refusal in steps 1-2 is a [`DecisionKind::BadRequest`] decision (the sidecar answers 400)
//! made before any policy is consulted. L4 (TCP) connections skip steps 1-2.

use std::sync::Arc;

use http::HeaderMap;
use meshgate_spiffe::SpiffeId;

use crate::authz::{Decision, DecisionKind, PolicySnapshot};
use crate::method::{MethodError, check_method};
use crate::path::{NormalizedPath, PathError, normalize_path};
use crate::request::AuthzRequest;

/// The HTTP part of a request, as the caller sent it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The request target as sent (path and query, before normalization).
    pub target: &'a str,
    pub headers: &'a HeaderMap,
}

/// Why a request was refused before any policy was consulted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("bad request: {0}")]
    Method(#[from] MethodError),
    #[error("bad path: {0}")]
    Path(#[from] PathError),
}

impl Refusal {
    /// The `reason` label of `meshgate_inbound_hygiene_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Method(_) => "bad_method",
            Refusal::Path(_) => "bad_path",
        }
    }
}

/// The outcome of [`judge`].
#[derive(Debug, Clone)]
pub struct Judgement {
    /// The normalized target (none for L4, or when the method was refused first).
    pub normalized: Option<NormalizedPath>,
    /// Set when the request was refused before the policy was consulted.
    pub refusal: Option<Refusal>,
    pub decision: Decision,
}

/// Judges one request from `peer` to the workload of `snapshot`, on the app port `port`.
/// `http` is `None` for an L4 (TCP) connection, which only identity and port rules judge.
pub fn judge(
    snapshot: &PolicySnapshot,
    peer: &SpiffeId,
    port: u16,
    http: Option<HttpRequest<'_>>,
) -> Judgement {
    let Some(http) = http else {
        return Judgement {
            normalized: None,
            refusal: None,
            decision: snapshot.evaluate(&AuthzRequest {
                peer,
                method: None,
                path: None,
                port,
                headers: None,
            }),
        };
    };
    let refused = |refusal: Refusal, normalized: Option<NormalizedPath>| Judgement {
        decision: Decision::bad_request(snapshot.version(), refusal.to_string()),
        normalized,
        refusal: Some(refusal),
    };
    if let Err(e) = check_method(http.method) {
        return refused(e.into(), None);
    }
    let normalized = match normalize_path(http.target) {
        Ok(n) => n,
        Err(e) => return refused(e.into(), None),
    };
    let decision = snapshot.evaluate(&AuthzRequest {
        peer,
        method: Some(http.method),
        path: Some(&normalized.path),
        port,
        headers: Some(http.headers),
    });
    Judgement {
        normalized: Some(normalized),
        refusal: None,
        decision,
    }
}

impl Decision {
    /// A request refused before any policy was consulted.
    pub fn bad_request(version: &str, reason: String) -> Self {
        Decision {
            kind: DecisionKind::BadRequest,
            allowed: false,
            policy: None,
            rule: None,
            version: Arc::from(version),
            reason,
            audit_policy: None,
            dry_run_policy: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> PolicySnapshot {
        let set = crate::load_text(
            std::path::Path::new("p.yaml"),
            "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: { name: open, namespace: shop }\nspec:\n  action: ALLOW\n  rules: [{}]\n",
        )
        .unwrap();
        PolicySnapshot::compile(
            &set,
            &"spiffe://mesh.local/ns/shop/sa/orders".parse().unwrap(),
        )
    }

    /// method, target → decision label, refusal label, normalized path.
    type Row = (
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    );

    #[test]
    fn judges_like_the_sidecar() {
        let snap = snapshot();
        let peer: SpiffeId = "spiffe://mesh.local/ns/shop/sa/web".parse().unwrap();
        let headers = HeaderMap::new();
        let table: &[Row] = &[
            ("GET", "/a/../b", "allow", None, Some("/b")),
            ("delete", "/b", "bad-request", Some("bad_method"), None),
            ("CONNECT", "/b", "bad-request", Some("bad_method"), None),
            ("GET", "/a%2fb", "bad-request", Some("bad_path"), None),
            ("GET", "/../..", "bad-request", Some("bad_path"), None),
        ];
        for (method, target, kind, refusal, path) in table {
            let j = judge(
                &snap,
                &peer,
                8080,
                Some(HttpRequest {
                    method,
                    target,
                    headers: &headers,
                }),
            );
            assert_eq!(j.decision.kind.as_str(), *kind, "{method} {target}");
            assert_eq!(
                j.refusal.as_ref().map(Refusal::label),
                *refusal,
                "{method} {target}"
            );
            assert_eq!(
                j.normalized.map(|n| n.path).as_deref(),
                *path,
                "{method} {target}"
            );
            assert_eq!(j.decision.allowed, *kind == "allow", "{method} {target}");
        }
        let l4 = judge(&snap, &peer, 5432, None);
        assert!(l4.decision.allowed && l4.normalized.is_none());
    }
}
