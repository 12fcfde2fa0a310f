//! `meshgate policy diff`: which requests change decision between two versions of a policy
//! directory, so a reviewer sees the effect of a change, not just its text.
//!
//! Requests are infinite, but a policy set only distinguishes the values it mentions. So the
//! diff evaluates a finite set of *request classes* built from both sets: every judging workload
//! (selected by a policy or named by a Service), every principal mentioned (wildcards replaced by
//! a matching example ID, plus one unknown caller), every method mentioned (plus one nobody
//! mentions), every path pattern mentioned (exact as-is; `/a/*` as `/a/` and `/a/x`; `*.json` as
//! `/x.json`; plus `/`), and every port mentioned (plus the default app port). Header conditions
//! are not explored: classes carry no headers. Each class is judged by both compiled sets with
//! the real evaluator; those whose decision changes are reported.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use meshgate_spiffe::SpiffeId;

use crate::flows::ObservedFlow;
use crate::probe::DEFAULT_PORT;
use meshgate_policy::authz::{AuthzRequest, Decision, DecisionKind, PolicySnapshot};
use meshgate_policy::load::PolicySet;
use meshgate_policy::model::{AuthorizationPolicy, ROOT_NAMESPACE};
use meshgate_policy::pattern::Pattern;

/// Methods tried when nobody mentions them, to catch "any method" rules changing.
const UNMENTIONED_METHODS: &[&str] = &["PATCH", "PROPFIND", "X-UNMENTIONED"];

/// One representative request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestClass {
    pub workload: SpiffeId,
    pub peer: SpiffeId,
    pub method: String,
    pub path: String,
    pub port: u16,
}

/// A class whose decision differs between the two sets.
#[derive(Debug, Clone)]
pub struct Change {
    pub class: RequestClass,
    pub old: Decision,
    pub new: Decision,
}

/// `ALLOW`, `DENY`, `AUDIT`, `DRY-RUN-DENY`.
fn label(kind: DecisionKind) -> String {
    kind.as_str().to_ascii_uppercase()
}

/// `namespace/name rule N`, or the reason when no rule decided (mesh default, no ALLOW matched).
fn blame(d: &Decision) -> String {
    match (&d.policy, d.rule) {
        (Some(p), Some(r)) => format!("{p} rule {r}"),
        (Some(p), None) => p.clone(),
        (None, _) => d.reason.clone(),
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.class;
        write!(
            f,
            "{}→{} from={} to={} method={} path={}",
            label(self.old.kind),
            label(self.new.kind),
            c.peer,
            c.workload,
            c.method,
            c.path
        )?;
        if c.port != DEFAULT_PORT {
            write!(f, " port={}", c.port)?;
        }
        write!(
            f,
            "  (old: {}, new: {})",
            blame(&self.old),
            blame(&self.new)
        )
    }
}

/// The values the classes are built from.
#[derive(Debug, Default)]
struct Mentioned {
    workloads: BTreeSet<SpiffeId>,
    principals: BTreeSet<SpiffeId>,
    methods: BTreeSet<String>,
    paths: BTreeSet<String>,
    ports: BTreeSet<u16>,
}

/// A valid SPIFFE ID or nothing.
fn id(s: &str) -> Option<SpiffeId> {
    SpiffeId::parse(s).ok()
}

/// An ID a principal pattern matches: the pattern itself, or an example completing it.
fn example_principal(pattern: &str, td: &str) -> Option<SpiffeId> {
    match Pattern::parse(pattern).ok()? {
        Pattern::Exact(s) => id(&s),
        Pattern::Any => None,
        Pattern::Prefix(p) if p.ends_with('/') => id(&format!("{p}sa/example")),
        Pattern::Prefix(p) => id(&format!("{p}x")),
        Pattern::Suffix(s) if s.starts_with('/') => id(&format!("spiffe://{td}/ns/example{s}")),
        Pattern::Suffix(s) => id(&format!("spiffe://{td}/ns/example/sa/x{s}")),
    }
}

/// Concrete paths that a path pattern matches.
fn example_paths(pattern: &str) -> Vec<String> {
    match Pattern::parse(pattern) {
        Ok(Pattern::Exact(p)) => vec![p],
        // `/a/*` → `/a/` and `/a/x`; `/a*` → `/a` and `/ax`.
        Ok(Pattern::Prefix(p)) => vec![p.clone(), format!("{p}x")],
        Ok(Pattern::Suffix(s)) => vec![format!("/x{s}")],
        Ok(Pattern::Any) | Err(_) => Vec::new(),
    }
}

/// The workload(s) a policy's scope names; a namespace-wide policy gets an example workload.
fn scoped_workloads(p: &AuthorizationPolicy, td: &str) -> Option<SpiffeId> {
    let ns = &p.metadata.namespace;
    match (&p.spec.selector, ns.as_str()) {
        (Some(s), ROOT_NAMESPACE) => id(&format!("spiffe://{td}/ns/example/sa/{}", s.account)),
        (Some(s), _) => id(&format!("spiffe://{td}/ns/{ns}/sa/{}", s.account)),
        (None, ROOT_NAMESPACE) => id(&format!("spiffe://{td}/ns/example/sa/example")),
        (None, _) => id(&format!("spiffe://{td}/ns/{ns}/sa/example")),
    }
}

impl Mentioned {
    fn collect(&mut self, set: &PolicySet) {
        let td = set.mesh_config.spec.trust_domain.as_str();
        for s in &set.services {
            self.workloads.insert(s.spec.identity.clone());
        }
        for p in &set.policies {
            self.workloads.extend(scoped_workloads(p, td));
            for rule in &p.spec.rules {
                for src in &rule.from {
                    for pr in src.principals.iter().chain(&src.not_principals) {
                        self.principals.extend(example_principal(pr, td));
                    }
                }
                for op in &rule.to {
                    self.methods
                        .extend(op.methods.iter().chain(&op.not_methods).cloned());
                    for path in op.paths.iter().chain(&op.not_paths) {
                        self.paths.extend(example_paths(path));
                    }
                    self.ports.extend(op.ports.iter().chain(&op.not_ports));
                }
            }
        }
    }

    fn finish(&mut self, td: &str) {
        // Workloads call each other; an unknown caller exercises "anyone else".
        self.principals.extend(self.workloads.iter().cloned());
        self.principals
            .extend(id(&format!("spiffe://{td}/ns/unknown/sa/unknown")));
        self.methods.insert("GET".to_string());
        if let Some(m) = UNMENTIONED_METHODS
            .iter()
            .find(|m| !self.methods.contains(**m))
        {
            self.methods.insert((*m).to_string());
        }
        self.paths.insert("/".to_string());
        self.ports.insert(DEFAULT_PORT);
    }
}

/// The request classes both sets distinguish (sorted, deduplicated).
pub fn request_classes(old: &PolicySet, new: &PolicySet) -> Vec<RequestClass> {
    let mut m = Mentioned::default();
    m.collect(old);
    m.collect(new);
    m.finish(&new.mesh_config.spec.trust_domain);
    let mut out = Vec::new();
    for w in &m.workloads {
        for p in &m.principals {
            for method in &m.methods {
                for path in &m.paths {
                    for &port in &m.ports {
                        out.push(RequestClass {
                            workload: w.clone(),
                            peer: p.clone(),
                            method: method.clone(),
                            path: path.clone(),
                            port,
                        });
                    }
                }
            }
        }
    }
    out
}

/// Both sets compiled per workload, compiled once per workload on first use.
struct Judges<'a> {
    old: &'a PolicySet,
    new: &'a PolicySet,
    compiled: BTreeMap<SpiffeId, (PolicySnapshot, PolicySnapshot)>,
}

impl<'a> Judges<'a> {
    fn new(old: &'a PolicySet, new: &'a PolicySet) -> Self {
        Self {
            old,
            new,
            compiled: BTreeMap::new(),
        }
    }

    fn judge(&mut self, c: &RequestClass) -> (Decision, Decision) {
        let (old, new) = (self.old, self.new);
        let (o, n) = self.compiled.entry(c.workload.clone()).or_insert_with(|| {
            (
                PolicySnapshot::compile(old, &c.workload),
                PolicySnapshot::compile(new, &c.workload),
            )
        });
        let req = AuthzRequest {
            peer: &c.peer,
            method: Some(&c.method),
            path: Some(&c.path),
            port: c.port,
            headers: None,
        };
        (o.evaluate(&req), n.evaluate(&req))
    }
}

/// Classes whose decision kind (and so possibly allow/deny) changes.
pub fn diff_sets(old: &PolicySet, new: &PolicySet) -> (usize, Vec<Change>) {
    let classes = request_classes(old, new);
    let mut judges = Judges::new(old, new);
    let changes = classes
        .iter()
        .filter_map(|c| {
            let (o, n) = judges.judge(c);
            (o.kind != n.kind).then(|| Change {
                class: c.clone(),
                old: o,
                new: n,
            })
        })
        .collect();
    (classes.len(), changes)
}

/// Observed flows (grouped) whose outcome flips.
#[derive(Debug, Clone, Default)]
pub struct FlowDiff {
    /// Allowed by the old set, denied by the new one, with how often each was seen.
    pub newly_denied: Vec<(Change, usize)>,
    pub newly_allowed: Vec<(Change, usize)>,
    /// Distinct flows judged.
    pub distinct: usize,
}

impl FlowDiff {
    pub fn is_empty(&self) -> bool {
        self.newly_denied.is_empty() && self.newly_allowed.is_empty()
    }
}

/// Replays observed flows (on app port `port`: L7 log lines do not carry it) against both sets.
/// Both sides are evaluated, rather than trusting the logged decision, because the log may come
/// from yet another version.
pub fn diff_flows(old: &PolicySet, new: &PolicySet, flows: &[ObservedFlow], port: u16) -> FlowDiff {
    let mut counts: BTreeMap<RequestClass, usize> = BTreeMap::new();
    for f in flows {
        let class = RequestClass {
            workload: f.workload.clone(),
            peer: f.peer.clone(),
            method: f.method.clone(),
            path: f.path.clone(),
            port,
        };
        *counts.entry(class).or_default() += f.count;
    }
    let mut judges = Judges::new(old, new);
    let mut out = FlowDiff {
        distinct: counts.len(),
        ..FlowDiff::default()
    };
    for (class, n) in counts {
        let (o, nw) = judges.judge(&class);
        let list = match (o.allowed, nw.allowed) {
            (true, false) => &mut out.newly_denied,
            (false, true) => &mut out.newly_allowed,
            _ => continue,
        };
        list.push((
            Change {
                class,
                old: o,
                new: nw,
            },
            n,
        ));
    }
    out
}
