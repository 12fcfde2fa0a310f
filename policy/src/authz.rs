//! Compiled, indexed authorization for one workload.
//!
//! Semantics (docs/policy.md, "Evaluation order"):
//! 1. enforce-mode DENY policies first: any matching rule denies;
//! 2. then enforce-mode ALLOW: if any selects the workload, the request must match one of them;
//! 3. otherwise the mesh default applies (`MeshConfig.defaultAction`, DENY unless configured);
//! 4. AUDIT policies never change the outcome; a match marks the decision (`audit`);
//! 5. dry-run policies (any action) are evaluated as if they were enforced alongside the
//!    enforce-mode ones, and never change the outcome: an allowed request that they would have
//!    denied is marked `dry-run-deny`.
//!
//! Paths in DENY policies (enforce or dry-run) match ASCII-case-insensitively: fail closed
//! against apps that route case-insensitively. Everything else is case-sensitive.
//!
//! When several rules match, the "first" is the earliest by policy `namespace/name`, then rule
//! index, so a decision never depends on file order or hash order.

use std::sync::Arc;

use meshgate_spiffe::SpiffeId;

use crate::index::{RuleIndex, RuleRef};
use crate::matcher::{PathCase, RuleMatcher};
use crate::model::{Action, AuthorizationPolicy, DefaultAction, Mode};
pub use crate::request::AuthzRequest;
use crate::scope::applies_to;
use crate::set::PolicySet;

/// The decision label used in logs, metrics and traces (and read back from test cases and access
/// logs by the policy tools, hence `Deserialize`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionKind {
    Allow,
    Deny,
    /// Allowed, and an AUDIT policy matched.
    Audit,
    /// Allowed, but a dry-run policy would have denied it.
    DryRunDeny,
    /// Refused before any policy was consulted: a method or a path the sidecar does not forward
    /// (see [`crate::judge()`]; the sidecar answers 400).
    BadRequest,
}

impl DecisionKind {
    /// Every kind.
    pub const ALL: [DecisionKind; 5] = [
        Self::Allow,
        Self::Deny,
        Self::Audit,
        Self::DryRunDeny,
        Self::BadRequest,
    ];

    /// `allow` | `deny` | `audit` | `dry-run-deny` | `bad-request`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
            Self::DryRunDeny => "dry-run-deny",
            Self::BadRequest => "bad-request",
        }
    }

    /// A refusal or a would-be refusal (`deny`, `dry-run-deny`, `bad-request`): the decisions
    /// whose traces the sidecar exports whatever the trace sampler says.
    pub fn is_refusal(self) -> bool {
        matches!(self, Self::Deny | Self::DryRunDeny | Self::BadRequest)
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
    /// `namespace/name` of the first enforce-mode AUDIT policy that matched, whatever the outcome.
    pub audit_policy: Option<String>,
    /// Set when the request was allowed but the dry-run policies would have denied it: the
    /// `namespace/name` of the dry-run DENY policy that matched, or
    /// [`DRY_RUN_NO_ALLOW`] when dry-run ALLOW policies exist and none matched.
    pub dry_run_policy: Option<String>,
}

/// [`Decision::dry_run_policy`] when the would-be denial comes from no dry-run ALLOW matching.
pub const DRY_RUN_NO_ALLOW: &str = "dry-run: no ALLOW matched";

/// One applicable policy, compiled.
#[derive(Debug)]
struct CompiledPolicy {
    /// `namespace/name`.
    name: Arc<str>,
    rules: Vec<RuleMatcher>,
    /// Per rule, the reason its match gives (`allowed by ALLOW policy shop/p rule 2`), written
    /// once here: formatting it cost ≈ 600 instructions on every request. Empty for AUDIT
    /// policies, whose matches never decide.
    reasons: Vec<Box<str>>,
    source: AuthorizationPolicy,
}

/// The rules of the applicable policies, grouped by what a match does.
#[derive(Debug, Default)]
struct Groups {
    deny: RuleIndex,
    allow: RuleIndex,
    audit: RuleIndex,
    dry_run_deny: RuleIndex,
    dry_run_allow: RuleIndex,
    /// Some enforce-mode ALLOW policy selects the workload (even one without rules).
    has_allow: bool,
    /// Some dry-run ALLOW policy selects the workload.
    has_dry_run_allow: bool,
}

/// The policies that apply to one workload, compiled and indexed.
#[derive(Debug)]
pub struct PolicySnapshot {
    version: Arc<str>,
    /// The version as a header value, made once: the inbound sidecar tells the app the version
    /// that allowed each request (`x-meshgate-policy-version`). None if it is no valid header
    /// value (a content hash always is).
    version_header: Option<http::HeaderValue>,
    workload: SpiffeId,
    /// False only for [`PolicySnapshot::deny_all`].
    loaded: bool,
    default_action: DefaultAction,
    /// Sorted by `namespace/name`; [`RuleRef::policy`] indexes this.
    policies: Vec<CompiledPolicy>,
    groups: Groups,
}

impl CompiledPolicy {
    fn compile(policy: &AuthorizationPolicy) -> Self {
        let path_case = match policy.spec.action {
            Action::Deny => PathCase::Insensitive,
            Action::Allow | Action::Audit => PathCase::Sensitive,
        };
        let rules = policy
            .spec
            .rules
            .iter()
            .filter_map(|r| match RuleMatcher::compile(r, path_case) {
                Ok(m) => Some(m),
                // Only reachable for sets built without validation: fail closed.
                Err(_) if policy.spec.action == Action::Deny => Some(RuleMatcher::everything()),
                Err(_) => None,
            })
            .collect::<Vec<_>>();
        let name: Arc<str> = Arc::from(policy.metadata.key());
        let verb = match policy.spec.action {
            Action::Deny => "denied by DENY",
            Action::Allow => "allowed by ALLOW",
            Action::Audit => "",
        };
        let reasons = (0..rules.len())
            .map(|i| match verb {
                "" => Box::default(),
                verb => format!("{verb} policy {name} rule {i}").into(),
            })
            .collect();
        Self {
            name,
            rules,
            reasons,
            source: policy.clone(),
        }
    }
}

impl Groups {
    fn add(&mut self, at: u32, policy: &CompiledPolicy) {
        let spec = &policy.source.spec;
        let index = match (spec.mode, spec.action) {
            (Mode::Enforce, Action::Deny) => &mut self.deny,
            (Mode::Enforce, Action::Allow) => {
                self.has_allow = true;
                &mut self.allow
            }
            (Mode::Enforce, Action::Audit) => &mut self.audit,
            (Mode::DryRun, Action::Deny) => &mut self.dry_run_deny,
            (Mode::DryRun, Action::Allow) => {
                self.has_dry_run_allow = true;
                &mut self.dry_run_allow
            }
            // A dry-run AUDIT would only mark, and marking is what AUDIT already does.
            (Mode::DryRun, Action::Audit) => return,
        };
        for (i, rule) in policy.rules.iter().enumerate() {
            let rule_ix = u32::try_from(i).unwrap_or(u32::MAX);
            index.add(
                RuleRef {
                    policy: at,
                    rule: rule_ix,
                },
                rule,
            );
        }
    }
}

/// The decision under construction.
struct Outcome {
    kind: DecisionKind,
    hit: Option<RuleRef>,
    reason: String,
}

impl PolicySnapshot {
    /// Compiles the policies of `set` that apply to `workload`.
    pub fn compile(set: &PolicySet, workload: &SpiffeId) -> Self {
        let mut applicable: Vec<&AuthorizationPolicy> = set
            .policies
            .iter()
            .filter(|p| applies_to(p, workload))
            .collect();
        applicable.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        let policies: Vec<CompiledPolicy> = applicable
            .into_iter()
            .map(CompiledPolicy::compile)
            .collect();
        let mut groups = Groups::default();
        for (i, p) in policies.iter().enumerate() {
            groups.add(u32::try_from(i).unwrap_or(u32::MAX), p);
        }
        Self {
            version: Arc::from(set.version.as_str()),
            version_header: http::HeaderValue::from_str(&set.version).ok(),
            workload: workload.clone(),
            loaded: true,
            default_action: set.mesh_config.spec.default_action,
            policies,
            groups,
        }
    }

    /// The snapshot in force before any policy was loaded: denies everything.
    pub fn deny_all(workload: &SpiffeId) -> Self {
        Self {
            version: Arc::from("none"),
            version_header: Some(http::HeaderValue::from_static("none")),
            workload: workload.clone(),
            loaded: false,
            default_action: DefaultAction::Deny,
            policies: Vec::new(),
            groups: Groups::default(),
        }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// [`PolicySnapshot::version`] as a header value (cloning it costs a reference count).
    pub fn version_header(&self) -> Option<&http::HeaderValue> {
        self.version_header.as_ref()
    }

    /// The workload this snapshot was compiled for.
    pub fn workload(&self) -> &SpiffeId {
        &self.workload
    }

    /// Number of applicable policies.
    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    fn first_match(&self, index: &RuleIndex, req: &AuthzRequest<'_>) -> Option<RuleRef> {
        if index.is_empty() {
            return None;
        }
        index.first_match(req.peer.as_str(), |r| {
            self.policies[r.policy as usize].rules[r.rule as usize].matches(req)
        })
    }

    fn policy_name(&self, r: RuleRef) -> &str {
        &self.policies[r.policy as usize].name
    }

    /// Why the matched enforce-mode ALLOW or DENY rule `r` decides.
    fn reason(&self, r: RuleRef) -> String {
        let policy = &self.policies[r.policy as usize];
        match policy.reasons.get(r.rule as usize) {
            Some(reason) => reason.to_string(),
            None => format!("matched policy {} rule {}", policy.name, r.rule),
        }
    }

    /// Steps 1-3: DENY, ALLOW, mesh default.
    fn enforce(&self, req: &AuthzRequest<'_>) -> Outcome {
        let g = &self.groups;
        if !self.loaded {
            return Outcome {
                kind: DecisionKind::Deny,
                hit: None,
                reason: "no policy loaded yet".to_string(),
            };
        }
        if let Some(r) = self.first_match(&g.deny, req) {
            return Outcome {
                kind: DecisionKind::Deny,
                hit: Some(r),
                reason: self.reason(r),
            };
        }
        if g.has_allow {
            return match self.first_match(&g.allow, req) {
                Some(r) => Outcome {
                    kind: DecisionKind::Allow,
                    hit: Some(r),
                    reason: self.reason(r),
                },
                None => Outcome {
                    kind: DecisionKind::Deny,
                    hit: None,
                    reason: "no ALLOW policy matched".to_string(),
                },
            };
        }
        let (kind, reason) = match self.default_action {
            DefaultAction::Deny => (DecisionKind::Deny, "mesh default: deny"),
            DefaultAction::Allow => (DecisionKind::Allow, "mesh default: allow"),
        };
        Outcome {
            kind,
            hit: None,
            reason: reason.to_string(),
        }
    }

    /// Step 5: would the dry-run policies, enforced, deny this allowed request? Returns the
    /// dry-run policy to blame.
    fn dry_run_denial(&self, req: &AuthzRequest<'_>) -> Option<String> {
        let g = &self.groups;
        if let Some(r) = self.first_match(&g.dry_run_deny, req) {
            return Some(self.policy_name(r).to_string());
        }
        // With enforce-mode ALLOW policies, the request matched one of them (it was allowed),
        // and it would still match with the dry-run ALLOWs added. Without any, the dry-run
        // ALLOWs would replace the mesh default: the request must match one of them.
        if !g.has_allow && g.has_dry_run_allow && self.first_match(&g.dry_run_allow, req).is_none()
        {
            return Some(DRY_RUN_NO_ALLOW.to_string());
        }
        None
    }

    /// Judges one request.
    pub fn evaluate(&self, req: &AuthzRequest<'_>) -> Decision {
        let mut outcome = self.enforce(req);
        let allowed = outcome.kind == DecisionKind::Allow;
        let audit_policy = self
            .first_match(&self.groups.audit, req)
            .map(|r| self.policy_name(r).to_string());
        let dry_run_policy = if allowed {
            self.dry_run_denial(req)
        } else {
            None
        };
        if let Some(dry) = &dry_run_policy {
            outcome.kind = DecisionKind::DryRunDeny;
            outcome.reason = format!("{}; dry-run would deny ({dry})", outcome.reason);
        } else if allowed && let Some(audit) = &audit_policy {
            outcome.kind = DecisionKind::Audit;
            outcome.reason = format!("{}; audited by {audit}", outcome.reason);
        }
        Decision {
            kind: outcome.kind,
            allowed,
            policy: outcome.hit.map(|r| self.policy_name(r).to_string()),
            rule: outcome.hit.map(|r| r.rule as usize),
            version: self.version.clone(),
            reason: outcome.reason,
            audit_policy,
            dry_run_policy,
        }
    }

    /// JSON view of the compiled policy for the admin `/config` endpoint.
    pub fn dump(&self) -> serde_json::Value {
        let policies: Vec<&AuthorizationPolicy> = self.policies.iter().map(|p| &p.source).collect();
        serde_json::json!({
            "version": &*self.version,
            "workload": self.workload.as_str(),
            "loaded": self.loaded,
            "defaultAction": self.default_action,
            "policies": policies,
        })
    }
}
