//! Which documents apply to which workload — the one place this is decided, for the evaluator
//! ([`crate::authz::PolicySnapshot::compile`]), the loader's cross-checks, the control plane's
//! per-sidecar scope and the eBPF egress allowlist.
//!
//! What one sidecar is allowed to know: the control plane sends each sidecar only the policies
//! and network policies that select its own SPIFFE ID — never the whole mesh's policy — plus the
//! mesh's Services.
//!
//! Services are not scoped by who may call them: a caller that knew no route to a Service it
//! may not call got an opaque 502 from its own sidecar, with no decision logged anywhere. With
//! the route, the request reaches the callee's sidecar, which holds the policy and answers 403
//! with a logged, counted and traced decision naming the caller. Service names, hosts and
//! identities are discovery data (DNS already reveals them), not policy.

use meshgate_spiffe::SpiffeId;

use crate::model::{AuthorizationPolicy, NetworkPolicy, ROOT_NAMESPACE, Selector};
use crate::set::PolicySet;

/// The scoping rule, written once (docs/policy.md, "Scope"): a document in namespace `ns` applies
/// to the workloads of that namespace, or of every namespace when `ns` is the root namespace
/// `meshgate`; a `selector` narrows it to one service account. An ID that is not of the
/// `/ns/<ns>/sa/<sa>` form can only be named by a root-namespace document without a selector.
fn selects(ns: &str, selector: Option<&Selector>, workload: &SpiffeId) -> bool {
    match workload.namespace_and_account() {
        Some((w_ns, w_sa)) => {
            (ns == w_ns || ns == ROOT_NAMESPACE) && selector.is_none_or(|s| s.account == w_sa)
        }
        None => ns == ROOT_NAMESPACE && selector.is_none(),
    }
}

/// True when `policy` is enforced by `workload`'s sidecar (docs/policy.md, "Scope").
pub fn applies_to(policy: &AuthorizationPolicy, workload: &SpiffeId) -> bool {
    selects(
        &policy.metadata.namespace,
        policy.spec.selector.as_ref(),
        workload,
    )
}

/// True when `np` constrains `workload`'s traffic: what the control plane sends its sidecar and
/// what `meshgate redirect attach` loads into the workload's eBPF egress allowlist.
pub fn network_policy_applies(np: &NetworkPolicy, workload: &SpiffeId) -> bool {
    selects(&np.metadata.namespace, np.spec.selector.as_ref(), workload)
}

/// The part of `set` that `workload`'s sidecar receives, with the set's version.
pub fn scope(set: &PolicySet, workload: &SpiffeId) -> PolicySet {
    PolicySet {
        policies: set
            .policies
            .iter()
            .filter(|p| applies_to(p, workload))
            .cloned()
            .collect(),
        services: set.services.clone(),
        network_policies: set
            .network_policies
            .iter()
            .filter(|np| network_policy_applies(np, workload))
            .cloned()
            .collect(),
        mesh_config: set.mesh_config.clone(),
        version: set.version.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: orders-readers, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: web-open, namespace: shop }
spec:
  selector: { account: web }
  action: ALLOW
  rules: [{}]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: everyone-audit, namespace: meshgate }
spec:
  action: AUDIT
  rules: [{}]
"#;

    fn service(name: &str) -> String {
        format!(
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  identity: spiffe://mesh.local/ns/shop/sa/{name}\n  hosts: [{name}]\n  ports: [{{ port: 8080, protocol: http }}]\n  endpoints: [\"127.0.0.1:1\"]\n"
        )
    }

    fn set() -> PolicySet {
        let dir = tempfile::tempdir().unwrap();
        let docs = [
            DOCS.to_string(),
            service("orders"),
            service("web"),
            service("payments"),
        ]
        .join("---\n");
        std::fs::write(dir.path().join("all.yaml"), docs).unwrap();
        crate::load_dir(dir.path()).unwrap()
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://mesh.local/ns/shop/sa/{sa}")).unwrap()
    }

    #[test]
    fn each_workload_sees_only_its_policies_and_every_service() {
        let set = set();
        let names = |s: &PolicySet| -> (Vec<String>, Vec<String>) {
            (
                s.policies.iter().map(|p| p.metadata.name.clone()).collect(),
                s.services.iter().map(|s| s.metadata.name.clone()).collect(),
            )
        };
        // (workload, policies it receives, services it knows)
        let all: &[&str] = &["orders", "payments", "web"];
        let table: [(&str, &[&str], &[&str]); 3] = [
            ("web", &["web-open", "everyone-audit"], all),
            ("orders", &["orders-readers", "everyone-audit"], all),
            ("payments", &["everyone-audit"], all),
        ];
        for (workload, policies, services) in table {
            let scoped = scope(&set, &id(workload));
            let (mut got_p, mut got_s) = names(&scoped);
            got_p.sort();
            got_s.sort();
            let mut want_p: Vec<String> = policies.iter().map(|s| s.to_string()).collect();
            let mut want_s: Vec<String> = services.iter().map(|s| s.to_string()).collect();
            want_p.sort();
            want_s.sort();
            assert_eq!(got_p, want_p, "{workload} policies");
            assert_eq!(got_s, want_s, "{workload} services");
            assert_eq!(scoped.version, set.version);
        }
    }
}
