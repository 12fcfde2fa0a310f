//! `meshgate policy suggest`: least-privilege ALLOW policies learned from observed traffic
//! (typically a dry-run period), as a starting point a human reviews — not a policy to apply
//! blindly.
//!
//! Shape: one `AuthorizationPolicy` per destination workload (`<account>-observed` in its
//! namespace, selecting its account), one rule per caller (exact principal), one operation per
//! set of methods seen together on the same paths, and those paths generalized by
//! [`generalize_paths`]. Denied requests are not learned by default: they were refused, and
//! learning them would turn probes and attacks into permissions.

use std::collections::{BTreeMap, BTreeSet};

use meshgate_spiffe::SpiffeId;

use crate::flows::ObservedFlow;
use meshgate_policy::authz::DecisionKind;
use meshgate_policy::model::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Metadata, Mode, Operation, Rule,
    Selector, Source,
};
use meshgate_policy::validate::{check_path_pattern, is_token};

/// Generalizes a set of observed (normalized) paths into patterns, as simply as can be explained:
/// walking the path tree from the top, a prefix `/a/` under which the observed paths have at
/// least two distinct next segments becomes `/a/*`; a prefix with a single next segment is
/// descended into; paths that end on a node are kept exact. The root is never generalized (no
/// `/*`), and `/a` itself stays exact since `/a/*` does not match it.
///
/// So `/orders/1`, `/orders/2` → `/orders/*`, while `/orders/1` alone stays `/orders/1`.
pub fn generalize_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let paths: BTreeSet<&str> = paths.into_iter().collect();
    let all: Vec<&str> = paths.into_iter().filter(|p| p.starts_with('/')).collect();
    let mut out = BTreeSet::new();
    walk("/", &all, false, &mut out);
    out.into_iter().collect()
}

/// `paths` all start with `prefix`, which ends with `/`.
fn walk(prefix: &str, paths: &[&str], may_generalize: bool, out: &mut BTreeSet<String>) {
    // Next segment after the prefix ("" for the prefix itself) → the paths through it.
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in paths {
        let rest = &p[prefix.len()..];
        let seg = rest.split('/').next().unwrap_or("");
        next.entry(seg).or_default().push(p);
    }
    if may_generalize && next.len() >= 2 {
        out.insert(format!("{prefix}*"));
        return;
    }
    for (seg, group) in next {
        if seg.is_empty() {
            out.insert(prefix.to_string());
            continue;
        }
        let child = format!("{prefix}{seg}");
        let deeper: Vec<&str> = group
            .iter()
            .copied()
            .filter(|p| {
                if *p == child {
                    out.insert(child.clone());
                    false
                } else {
                    true
                }
            })
            .collect();
        if !deeper.is_empty() {
            walk(&format!("{child}/"), &deeper, true, out);
        }
    }
}

/// Knobs of [`suggest`].
#[derive(Debug, Clone, Copy)]
pub struct SuggestOptions {
    /// Flows (workload, caller, method, path) seen fewer times are dropped.
    pub min_count: usize,
    /// Learn from denied requests too.
    pub include_denied: bool,
}

impl Default for SuggestOptions {
    fn default() -> Self {
        Self {
            min_count: 1,
            include_denied: false,
        }
    }
}

/// Suggested policies and what was left out.
#[derive(Debug, Clone, Default)]
pub struct Suggestion {
    /// Sorted by namespace/name.
    pub policies: Vec<AuthorizationPolicy>,
    /// Distinct flows learned.
    pub learned: usize,
    /// Distinct flows seen fewer than `min_count` times.
    pub below_min_count: usize,
    /// Flow occurrences skipped because they were denied.
    pub denied: usize,
    /// Distinct flows that cannot be written as a policy: the workload ID is not
    /// `/ns/<ns>/sa/<account>`, or the method or path is not a valid exact pattern.
    pub unusable: Vec<String>,
}

/// Why suggestions could not be written out.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the suggested policies as YAML: {0}")]
pub struct SuggestYamlError(String);

/// path → methods, as seen from one caller.
type Calls = BTreeMap<String, BTreeSet<String>>;

/// Learns ALLOW policies from `flows`.
pub fn suggest(flows: &[ObservedFlow], opts: SuggestOptions) -> Suggestion {
    let mut out = Suggestion::default();
    let mut counts: BTreeMap<(&SpiffeId, &SpiffeId, &str, &str, bool), usize> = BTreeMap::new();
    for f in flows {
        if f.decision == DecisionKind::Deny && !opts.include_denied {
            out.denied += f.count;
            continue;
        }
        *counts
            .entry((
                &f.workload,
                &f.peer,
                f.method.as_str(),
                f.path.as_str(),
                f.pattern,
            ))
            .or_default() += f.count;
    }
    // (namespace, account) → caller → path → methods.
    let mut tree: BTreeMap<(String, String), BTreeMap<String, Calls>> = BTreeMap::new();
    for ((workload, peer, method, path, pattern), n) in counts {
        if n < opts.min_count {
            out.below_min_count += 1;
            continue;
        }
        let usable = workload.namespace_and_account().filter(|_| {
            // A `*` in a raw path would become a wildcard; in an aggregated flow's path
            // pattern it is one already.
            is_token(method) && check_path_pattern(path).is_ok() && (pattern || !path.contains('*'))
        });
        let Some((ns, account)) = usable else {
            out.unusable
                .push(format!("{method} {path} from {peer} to {workload}"));
            continue;
        };
        out.learned += 1;
        tree.entry((ns.to_string(), account.to_string()))
            .or_default()
            .entry(peer.as_str().to_string())
            .or_default()
            .entry(path.to_string())
            .or_default()
            .insert(method.to_string());
    }
    out.policies = tree
        .into_iter()
        .map(|((ns, account), callers)| policy_for(ns, account, callers))
        .collect();
    out
}

/// One policy for a workload: one rule per caller, one operation per set of methods.
fn policy_for(
    ns: String,
    account: String,
    callers: BTreeMap<String, Calls>,
) -> AuthorizationPolicy {
    let rules = callers
        .into_iter()
        .map(|(peer, by_path)| {
            let mut by_methods: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
            for (path, methods) in by_path {
                by_methods
                    .entry(methods.into_iter().collect())
                    .or_default()
                    .push(path);
            }
            Rule {
                from: vec![Source {
                    principals: vec![peer],
                    ..Source::default()
                }],
                to: by_methods
                    .into_iter()
                    .map(|(methods, paths)| Operation {
                        methods,
                        paths: generalize_paths(paths.iter().map(String::as_str)),
                        ..Operation::default()
                    })
                    .collect(),
                when: Vec::new(),
            }
        })
        .collect();
    AuthorizationPolicy {
        metadata: Metadata {
            name: format!("{account}-observed"),
            namespace: ns,
        },
        spec: AuthorizationPolicySpec {
            selector: Some(Selector { account }),
            action: Action::Allow,
            mode: Mode::Enforce,
            rules,
        },
    }
}

/// The policies as YAML documents separated by `---`, in order.
pub fn to_yaml(policies: &[AuthorizationPolicy]) -> Result<String, SuggestYamlError> {
    serde_saphyr::to_string_multiple(policies).map_err(|e| SuggestYamlError(e.to_string()))
}
