//! One rule, compiled: patterns parsed once, header names resolved, DENY paths lowercased.
//!
//! A rule matches when (no source or any source matches) and (no operation or any operation
//! matches) and every condition matches; inside a source or operation every non-empty field must
//! match (`not*` = none-of).
//!
//! An L4 request (an opaque TCP connection: no method, no path, no headers) is judged by the
//! rule's kind ([`L4Http`]): an ALLOW rule's HTTP-only fields can never be satisfied, so the
//! rule does not match (it grants nothing it did not name); a DENY rule's HTTP-only fields are
//! dropped, so the rule matches on its identity and port fields alone (it refuses more, never
//! less). A DENY written for `/admin/*` therefore refuses a TCP connection from the same peers to
//! the same ports, as Istio does.

use http::HeaderName;

use crate::model::{Condition, Operation, Rule, Source};
use crate::pattern::{Pattern, PatternError};
use crate::request::AuthzRequest;

/// How paths are compared. DENY rules compare ASCII-case-insensitively so that an app that
/// routes case-insensitively (IIS, some Spring setups) cannot be reached at `/ADMIN` past a DENY
/// on `/admin/*`: for DENY, matching more is the safe side. ALLOW stays case-sensitive, so an
/// ALLOW never grants more than it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathCase {
    Sensitive,
    Insensitive,
}

/// What a rule's HTTP-only fields (methods, paths, headers) mean for an L4 (TCP) request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum L4Http {
    /// They cannot hold: the rule does not match (ALLOW and AUDIT rules).
    #[default]
    NeverMatch,
    /// They are ignored: the rule matches on its other fields (DENY rules: fail closed).
    Ignore,
}

impl PathCase {
    /// DENY rules match paths case-insensitively and drop HTTP-only fields at L4; see the module
    /// docs.
    pub fn l4_http(self) -> L4Http {
        match self {
            PathCase::Sensitive => L4Http::NeverMatch,
            PathCase::Insensitive => L4Http::Ignore,
        }
    }
}

/// Why a rule could not be compiled (only for sets that skipped validation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("bad pattern {0:?}: {1}")]
    Pattern(String, PatternError),
    #[error("bad header name {0:?}")]
    HeaderName(String),
}

/// A compiled `from` entry.
#[derive(Debug, Clone)]
pub struct SourceMatcher {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
}

/// A compiled `to` entry.
#[derive(Debug, Clone)]
pub struct OperationMatcher {
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<Pattern>,
    not_paths: Vec<Pattern>,
    path_case: PathCase,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

/// A compiled `when` entry.
#[derive(Debug, Clone)]
pub struct ConditionMatcher {
    l4: L4Http,
    header: HeaderName,
    values: Vec<Pattern>,
    not_values: Vec<Pattern>,
}

/// A compiled rule.
#[derive(Debug, Clone, Default)]
pub struct RuleMatcher {
    sources: Vec<SourceMatcher>,
    operations: Vec<OperationMatcher>,
    conditions: Vec<ConditionMatcher>,
}

/// Which peers a rule can match, for the principal index.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerScope<'a> {
    /// No `from`: every peer.
    Everyone,
    /// Only these exact IDs can match.
    Exact(Vec<&'a str>),
    /// Patterns or `notPrincipals`: must be checked for every peer.
    Wildcard,
}

fn patterns(list: &[String], case: PathCase) -> Result<Vec<Pattern>, CompileError> {
    list.iter()
        .map(|s| {
            let p = Pattern::parse(s).map_err(|e| CompileError::Pattern(s.clone(), e))?;
            Ok(match case {
                PathCase::Sensitive => p,
                PathCase::Insensitive => p.to_ascii_lowercase(),
            })
        })
        .collect()
}

fn any_of<T>(list: &[T], pred: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(pred)
}

fn none_of<T>(list: &[T], pred: impl Fn(&T) -> bool) -> bool {
    !list.iter().any(pred)
}

impl SourceMatcher {
    fn compile(s: &Source) -> Result<Self, CompileError> {
        Ok(Self {
            principals: patterns(&s.principals, PathCase::Sensitive)?,
            not_principals: patterns(&s.not_principals, PathCase::Sensitive)?,
        })
    }

    fn matches(&self, peer: &[u8]) -> bool {
        any_of(&self.principals, |p| p.matches(peer))
            && none_of(&self.not_principals, |p| p.matches(peer))
    }
}

impl OperationMatcher {
    fn compile(op: &Operation, path_case: PathCase) -> Result<Self, CompileError> {
        Ok(Self {
            methods: op.methods.clone(),
            not_methods: op.not_methods.clone(),
            paths: patterns(&op.paths, path_case)?,
            not_paths: patterns(&op.not_paths, path_case)?,
            path_case,
            ports: op.ports.clone(),
            not_ports: op.not_ports.clone(),
        })
    }

    fn path_matches(&self, pattern: &Pattern, path: &str) -> bool {
        match self.path_case {
            PathCase::Sensitive => pattern.matches(path.as_bytes()),
            PathCase::Insensitive => pattern.matches_ignore_case(path.as_bytes()),
        }
    }

    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        let l4_ignores_http = self.path_case.l4_http() == L4Http::Ignore;
        let method_ok = match req.method {
            Some(m) => any_of(&self.methods, |x| x == m) && none_of(&self.not_methods, |x| x == m),
            None => l4_ignores_http || (self.methods.is_empty() && self.not_methods.is_empty()),
        };
        let path_ok = match req.path {
            Some(path) => {
                any_of(&self.paths, |p| self.path_matches(p, path))
                    && none_of(&self.not_paths, |p| self.path_matches(p, path))
            }
            None => l4_ignores_http || (self.paths.is_empty() && self.not_paths.is_empty()),
        };
        method_ok
            && path_ok
            && any_of(&self.ports, |&p| p == req.port)
            && none_of(&self.not_ports, |&p| p == req.port)
    }
}

impl ConditionMatcher {
    fn compile(c: &Condition, l4: L4Http) -> Result<Self, CompileError> {
        Ok(Self {
            l4,
            header: HeaderName::from_bytes(c.header.as_bytes())
                .map_err(|_| CompileError::HeaderName(c.header.clone()))?,
            values: patterns(&c.values, PathCase::Sensitive)?,
            not_values: patterns(&c.not_values, PathCase::Sensitive)?,
        })
    }

    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        // L4 requests carry no headers: a header condition cannot hold (ALLOW) or is dropped
        // (DENY).
        let Some(headers) = req.headers.filter(|_| req.method.is_some()) else {
            return self.l4 == L4Http::Ignore;
        };
        let mut values = headers.get_all(&self.header).iter().peekable();
        if values.peek().is_none() {
            return false;
        }
        let mut some_matched = self.values.is_empty();
        for v in values {
            let v = v.as_bytes();
            if self.not_values.iter().any(|p| p.matches(v)) {
                return false;
            }
            some_matched = some_matched || self.values.iter().any(|p| p.matches(v));
        }
        some_matched
    }
}

impl RuleMatcher {
    /// Compiles `rule`; paths compared as `path_case` says.
    pub fn compile(rule: &Rule, path_case: PathCase) -> Result<Self, CompileError> {
        Ok(Self {
            sources: rule
                .from
                .iter()
                .map(SourceMatcher::compile)
                .collect::<Result<_, _>>()?,
            operations: rule
                .to
                .iter()
                .map(|op| OperationMatcher::compile(op, path_case))
                .collect::<Result<_, _>>()?,
            conditions: rule
                .when
                .iter()
                .map(|c| ConditionMatcher::compile(c, path_case.l4_http()))
                .collect::<Result<_, _>>()?,
        })
    }

    /// A rule that matches every request (the fail-closed stand-in for a DENY rule that could
    /// not be compiled).
    pub fn everything() -> Self {
        Self::default()
    }

    /// Judges one request against the rule.
    pub fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        let peer = req.peer.as_str().as_bytes();
        any_of(&self.sources, |s| s.matches(peer))
            && any_of(&self.operations, |op| op.matches(req))
            && self.conditions.iter().all(|c| c.matches(req))
    }

    /// Which peers can match, so the index can skip the rule for everyone else.
    pub fn peer_scope(&self) -> PeerScope<'_> {
        if self.sources.is_empty() {
            return PeerScope::Everyone;
        }
        let mut exact = Vec::new();
        for s in &self.sources {
            if s.principals.is_empty() {
                return PeerScope::Wildcard;
            }
            for p in &s.principals {
                match p.as_exact() {
                    Some(id) => exact.push(id),
                    None => return PeerScope::Wildcard,
                }
            }
        }
        exact.sort_unstable();
        exact.dedup();
        PeerScope::Exact(exact)
    }
}
