//! `meshgate policy explain`: why one request gets its decision. An operator debugging a 403 needs
//! the deciding policy and rule *as written*, the version, and the path as the policy saw it
//! (after normalization), all in one place, without reading sidecar logs.

use std::fmt;

use crate::probe::{Judgement, Probe};
use meshgate_policy::authz::Decision;
use meshgate_policy::load::PolicySet;
use meshgate_policy::model::{Action, Mode, Rule};

/// The deciding rule, as written in its policy.
#[derive(Debug, Clone)]
pub struct DecidingRule {
    pub action: Action,
    pub mode: Mode,
    pub rule: Rule,
}

/// Everything `explain` prints.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub probe: Probe,
    pub judgement: Judgement,
    pub deciding_rule: Option<DecidingRule>,
    /// The Service (`namespace/name`) that declares the probe's port `protocol: tcp` for the
    /// workload, when the probe is an HTTP request: such a request never reaches L7 rules.
    pub tcp_service: Option<String>,
    /// No policy selects the workload and no Service declares it: probably a mistyped `--to`.
    pub unknown_workload: bool,
}

/// Judges `probe` against `set` and looks up the rule that decided.
pub fn explain(set: &PolicySet, probe: &Probe) -> Explanation {
    let judgement = probe.judge(set);
    let deciding_rule = find_rule(set, &judgement.decision);
    let tcp_service = probe.http.as_ref().and_then(|_| {
        set.services
            .iter()
            .find(|s| {
                s.spec.identity == probe.workload
                    && s.spec.ports.iter().any(|p| {
                        p.port == probe.port && p.protocol == meshgate_policy::model::Protocol::Tcp
                    })
            })
            .map(|s| s.metadata.key())
    });
    let unknown_workload = !set
        .policies
        .iter()
        .any(|p| meshgate_policy::scope::applies_to(p, &probe.workload))
        && !set
            .services
            .iter()
            .any(|s| s.spec.identity == probe.workload);
    Explanation {
        probe: probe.clone(),
        judgement,
        deciding_rule,
        tcp_service,
        unknown_workload,
    }
}

fn find_rule(set: &PolicySet, d: &Decision) -> Option<DecidingRule> {
    let (name, index) = (d.policy.as_deref()?, d.rule?);
    let policy = set.policies.iter().find(|p| p.metadata.key() == name)?;
    Some(DecidingRule {
        action: policy.spec.action,
        mode: policy.spec.mode,
        rule: policy.spec.rules.get(index)?.clone(),
    })
}

fn action_str(a: Action) -> &'static str {
    match a {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
        Action::Audit => "AUDIT",
    }
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Enforce => "enforce",
        Mode::DryRun => "dry-run",
    }
}

/// A rule field as one line of YAML flow syntax (JSON is valid YAML flow).
fn flow<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.probe;
        let d = &self.judgement.decision;
        writeln!(f, "workload: {}", p.workload)?;
        if self.unknown_workload {
            writeln!(
                f,
                "note: no policy selects this workload and no Service declares it: is --to right? (the mesh default decides for it)"
            )?;
        }
        match &p.http {
            Some((method, raw_path)) => {
                writeln!(
                    f,
                    "request: {method} {raw_path} port {} from {}",
                    p.port, p.peer
                )?;
                writeln!(f, "path: {raw_path}")?;
            }
            None => writeln!(
                f,
                "request: TCP connection (L4) to port {} from {} — ALLOW rules with method/path/header conditions do not match it; DENY rules match on identity and port alone",
                p.port, p.peer
            )?,
        }
        if let Some(service) = &self.tcp_service {
            writeln!(
                f,
                "note: Service {service} declares port {} `protocol: tcp`: the sidecar carries it as an opaque L4 tunnel, so no method/path/header rule applies there",
                p.port
            )?;
        }
        match &self.judgement.normalized {
            Some(Ok(n)) => writeln!(f, "normalized path: {}", n.path)?,
            Some(Err(e)) => writeln!(f, "normalized path: refused ({e}): the sidecar answers 400")?,
            None => {}
        }
        writeln!(f, "decision: {}", d.kind.as_str())?;
        match (&d.policy, d.rule, &self.deciding_rule) {
            (Some(name), Some(ix), Some(r)) => {
                writeln!(
                    f,
                    "policy: {name} rule {ix} ({}, {})",
                    action_str(r.action),
                    mode_str(r.mode)
                )?;
                if !r.rule.from.is_empty() {
                    writeln!(f, "  from: {}", flow(&r.rule.from))?;
                }
                if !r.rule.to.is_empty() {
                    writeln!(f, "  to: {}", flow(&r.rule.to))?;
                }
                if !r.rule.when.is_empty() {
                    writeln!(f, "  when: {}", flow(&r.rule.when))?;
                }
                if r.rule == Rule::default() {
                    writeln!(f, "  (empty rule: matches every request)")?;
                }
            }
            (Some(name), ix, _) => writeln!(
                f,
                "policy: {name}{}",
                ix.map(|i| format!(" rule {i}")).unwrap_or_default()
            )?,
            (None, _, _) => writeln!(f, "policy: none")?,
        }
        writeln!(f, "version: {}", d.version)?;
        writeln!(f, "reason: {}", d.reason)?;
        writeln!(f, "audit: {}", d.audit_policy.as_deref().unwrap_or("none"))?;
        write!(
            f,
            "dry-run: {}",
            d.dry_run_policy.as_deref().unwrap_or("none")
        )
    }
}
