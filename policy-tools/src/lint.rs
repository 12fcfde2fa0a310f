//! `meshgate policy check` warnings: rules that load fine but cannot do what they look like they
//! do. A principal in another trust domain, or an ID that names no workload, never matches a
//! caller of this mesh; a DENY rule with only HTTP conditions also denies L4 tunnels (it drops
//! those conditions at L4). Warnings never fail the check: the policy is valid, just suspicious.

use meshgate_spiffe::SpiffeId;

use meshgate_policy::load::PolicySet;
use meshgate_policy::model::{Action, Protocol};

/// One warning, about one rule of one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `namespace/name` of the policy.
    pub policy: String,
    pub rule: usize,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "warning: policy {} rule {}: {}",
            self.policy, self.rule, self.message
        )
    }
}

/// Why a principal pattern can never match a workload of `trust_domain`, if it cannot.
fn never_matches(pattern: &str, trust_domain: &str) -> Option<String> {
    let rest = pattern.strip_prefix("spiffe://")?;
    let td = rest.split('/').next().unwrap_or(rest);
    if td.contains('*') {
        return None;
    }
    if td != trust_domain {
        return Some(format!(
            "principal {pattern:?} is in trust domain {td:?}, not this mesh's {trust_domain:?} (MeshConfig trustDomain): it can never match a caller"
        ));
    }
    if pattern.contains('*') {
        return None;
    }
    let id = SpiffeId::parse(pattern).ok()?;
    if id.namespace_and_account().is_none() {
        return Some(format!(
            "principal {pattern:?} names no workload: meshgate issues spiffe://{trust_domain}/ns/NAMESPACE/sa/ACCOUNT"
        ));
    }
    None
}

/// The warnings for `set`, in policy then rule order.
pub fn warnings(set: &PolicySet) -> Vec<Warning> {
    let td = set.mesh_config.spec.trust_domain.as_str();
    let mut out = Vec::new();
    for policy in &set.policies {
        let name = policy.metadata.key();
        for (index, rule) in policy.spec.rules.iter().enumerate() {
            let mut warn = |message: String| {
                out.push(Warning {
                    policy: name.clone(),
                    rule: index,
                    message,
                })
            };
            for source in &rule.from {
                for p in source.principals.iter().chain(&source.not_principals) {
                    if let Some(why) = never_matches(p, td) {
                        warn(why);
                    }
                }
            }
            if policy.spec.action != Action::Deny {
                continue;
            }
            let http_only = !rule.when.is_empty()
                || rule.to.iter().any(|op| {
                    op.ports.is_empty()
                        && (!op.methods.is_empty()
                            || !op.not_methods.is_empty()
                            || !op.paths.is_empty()
                            || !op.not_paths.is_empty())
                });
            let tcp_ports: Vec<u16> = set
                .services
                .iter()
                .filter(|s| meshgate_policy::scope::applies_to(policy, &s.spec.identity))
                .flat_map(|s| s.spec.ports.iter())
                .filter(|p| p.protocol == Protocol::Tcp)
                .map(|p| p.port)
                .collect();
            if http_only && !tcp_ports.is_empty() {
                warn(format!(
                    "this DENY rule has method/path/header conditions and no `ports`: at L4 it drops them and denies every TCP connection it matches, including ports {tcp_ports:?} that Services declare `protocol: tcp`; add `ports` to keep it to HTTP"
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_that_can_never_match() {
        for (pattern, warns) in [
            ("spiffe://mesh.local/ns/shop/sa/web", false),
            ("spiffe://mesh.local/ns/shop/*", false),
            ("*", false),
            ("*/sa/web", false),
            ("spiffe://other.mesh/ns/shop/sa/web", true),
            ("spiffe://other.mesh/*", true),
            ("spiffe://mesh.local/web", true),
            ("spiffe://mesh.local/ns/shop", true),
        ] {
            assert_eq!(
                never_matches(pattern, "mesh.local").is_some(),
                warns,
                "{pattern}"
            );
        }
    }
}
