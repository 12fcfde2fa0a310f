//! Table-driven policy tests (`meshgate policy test`), in the spirit of OPA's tests: a YAML file
//! of requests with the decision each must get, so a policy change that breaks an expectation
//! fails CI before it reaches a sidecar.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::probe::{DEFAULT_PORT, Probe, ProbeError, describe_hit};
use meshgate_policy::authz::{Decision, DecisionKind};
use meshgate_policy::load::PolicySet;

/// The cases file: `cases: [...]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesFile {
    pub cases: Vec<Case>,
}

/// One expectation: this request gets this decision (optionally from this policy/rule).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub from: String,
    /// The workload whose sidecar judges the request.
    pub to: String,
    /// With `path`, an HTTP request; without both, an L4 (TCP) connection to `port`.
    #[serde(default)]
    pub method: Option<String>,
    /// As sent by the caller; normalized before judging.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub expect: DecisionKind,
    /// Expected deciding policy, `namespace/name`.
    #[serde(default)]
    pub policy: Option<String>,
    /// Expected deciding rule index.
    #[serde(default)]
    pub rule: Option<usize>,
}

fn default_port() -> u16 {
    DEFAULT_PORT
}

/// Why a cases file cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum CasesError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("case {name:?}: {source}")]
    Case { name: String, source: ProbeError },
}

/// One case's outcome.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub case: Case,
    pub got: Decision,
}

impl CaseResult {
    /// True when the decision kind and any expected policy/rule match. `deny` is met by a
    /// `bad-request` too: both refuse the request (expect `bad-request` to insist on the 400).
    pub fn passed(&self) -> bool {
        (self.got.kind == self.case.expect
            || self.case.expect == DecisionKind::Deny && self.got.kind == DecisionKind::BadRequest)
            && self
                .case
                .policy
                .as_ref()
                .is_none_or(|p| self.got.policy.as_ref() == Some(p))
            && self.case.rule.is_none_or(|r| self.got.rule == Some(r))
    }
}

impl fmt::Display for CaseResult {
    /// `PASS name` or `FAIL name: expected X (policy P rule R), got Y (policy P' rule R'): reason`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.case;
        if self.passed() {
            return write!(f, "PASS {}", c.name);
        }
        write!(f, "FAIL {}: expected {}", c.name, c.expect.as_str())?;
        if c.policy.is_some() || c.rule.is_some() {
            write!(f, " ({})", describe_hit(c.policy.as_deref(), c.rule))?;
        }
        write!(
            f,
            ", got {} ({}): {}",
            self.got.kind.as_str(),
            describe_hit(self.got.policy.as_deref(), self.got.rule),
            self.got.reason
        )
    }
}

/// Reads and parses a cases file.
pub fn load_cases(path: &Path) -> Result<CasesFile, CasesError> {
    let text = std::fs::read_to_string(path).map_err(|source| CasesError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_cases(&text).map_err(|reason| CasesError::Parse {
        path: path.to_path_buf(),
        reason,
    })
}

/// Parses cases from YAML text.
pub fn parse_cases(text: &str) -> Result<CasesFile, String> {
    serde_saphyr::from_str(text).map_err(|e| e.to_string())
}

/// Runs every case against `set`. All cases are checked before any runs, so a typo in one case
/// is reported as an invalid file rather than as a failing test.
pub fn run_cases(set: &PolicySet, file: &CasesFile) -> Result<Vec<CaseResult>, CasesError> {
    let probes = file
        .cases
        .iter()
        .map(|c| {
            let headers: Vec<(String, String)> = c.headers.clone().into_iter().collect();
            Probe::new(
                &c.from,
                &c.to,
                c.method.as_deref(),
                c.path.as_deref(),
                c.port,
                &headers,
            )
            .map_err(|source| CasesError::Case {
                name: c.name.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(file
        .cases
        .iter()
        .zip(probes)
        .map(|(case, probe)| CaseResult {
            case: case.clone(),
            got: probe.judge(set).decision,
        })
        .collect())
}
