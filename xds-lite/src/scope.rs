//! What one sidecar is allowed to know: the control plane sends each sidecar only the resources
//! that concern its own SPIFFE ID — the policies and network policies that select it, and the
//! Services it may call — never the whole mesh's policy.

use meshgate_ca::SpiffeId;

use crate::authz::applies_to;
use crate::load::PolicySet;
use crate::model::{Action, DefaultAction, NetworkPolicy, ROOT_NAMESPACE, Service, Source};
use crate::pattern::Pattern;

fn network_policy_applies(np: &NetworkPolicy, workload: &SpiffeId) -> bool {
    let ns = np.metadata.namespace.as_str();
    let selected = |account: &str| {
        np.spec
            .selector
            .as_ref()
            .is_none_or(|s| s.account == account)
    };
    match workload.namespace_and_account() {
        Some((w_ns, w_sa)) => (ns == w_ns || ns == ROOT_NAMESPACE) && selected(w_sa),
        None => ns == ROOT_NAMESPACE && np.spec.selector.is_none(),
    }
}

fn matches_any(patterns: &[String], id: &SpiffeId) -> bool {
    patterns
        .iter()
        .filter_map(|p| Pattern::parse(p).ok())
        .any(|p| p.matches(id.as_str().as_bytes()))
}

fn source_admits(source: &Source, caller: &SpiffeId) -> bool {
    (source.principals.is_empty() || matches_any(&source.principals, caller))
        && !matches_any(&source.not_principals, caller)
}

/// True when some ALLOW policy of `callee` (or the mesh default) could let `caller` in, judging
/// only by identity. DENY rules, methods and paths are left to the callee's sidecar: this decides
/// what the caller may *know about*, not what it may do.
pub fn may_call(set: &PolicySet, caller: &SpiffeId, callee: &SpiffeId) -> bool {
    let mut allows = set
        .policies
        .iter()
        .filter(|p| p.spec.action == Action::Allow && applies_to(p, callee))
        .peekable();
    if allows.peek().is_none() {
        return set.mesh_config.spec.default_action == DefaultAction::Allow;
    }
    allows.any(|p| {
        p.spec
            .rules
            .iter()
            .any(|rule| rule.from.is_empty() || rule.from.iter().any(|s| source_admits(s, caller)))
    })
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
        services: set
            .services
            .iter()
            .filter(|s: &&Service| may_call(set, workload, &s.spec.identity))
            .cloned()
            .collect(),
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
    fn each_workload_sees_only_its_policies_and_callable_services() {
        let set = set();
        let names = |s: &PolicySet| -> (Vec<String>, Vec<String>) {
            (
                s.policies.iter().map(|p| p.metadata.name.clone()).collect(),
                s.services.iter().map(|s| s.metadata.name.clone()).collect(),
            )
        };
        // (workload, policies it receives, services it may call)
        let table: [(&str, &[&str], &[&str]); 3] = [
            ("web", &["web-open", "everyone-audit"], &["orders", "web"]),
            ("orders", &["orders-readers", "everyone-audit"], &["web"]),
            ("payments", &["everyone-audit"], &["web"]),
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
