//! Meaning checks on parsed documents (shape is checked by serde in [`crate::model`]).
//!
//! Each check returns every [`Problem`] it finds, never just the first, and names the offending
//! value so the loader can point at its line. What is refused, and why:
//! - principals that are neither a SPIFFE ID, `*`, nor one with a single `*` at an end: a typo in
//!   an ID must not silently match nobody (ALLOW) or nobody (DENY, which is worse);
//! - path patterns that do not start with `/` (unless `*`/`*suffix`), carry a `*` in the middle,
//!   or are not in normalized form: requests are matched after [`crate::path::normalize_path`],
//!   so such a pattern could never match;
//! - methods that are not RFC 9110 tokens, header names that are not HTTP header names;
//! - port 0, CIDRs with host bits set, malformed endpoints, names that could not appear in a
//!   SPIFFE ID segment, a MeshConfig outside the root namespace or with a bad trust domain.

use meshgate_spiffe::{SpiffeId, TrustDomain};

use crate::model::{
    AuthorizationPolicy, MeshConfig, Metadata, NetworkPolicy, Operation, ROOT_NAMESPACE, Rule,
    Selector, Service, Source,
};
use crate::path::normalize_path;
use crate::pattern::Pattern;

/// One thing wrong with a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: String,
    /// Text to look for in the document to find the offending line (none = the document start).
    pub near: Option<String>,
}

impl Problem {
    fn at(near: &str, reason: String) -> Self {
        Self {
            reason,
            near: Some(near.to_string()),
        }
    }
}

/// Names, namespaces and accounts end up in SPIFFE ID segments: same character set.
fn check_name(what: &str, value: &str, out: &mut Vec<Problem>) {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !ok {
        out.push(Problem::at(
            value,
            format!("{what} {value:?} is invalid: use 1-253 characters from [A-Za-z0-9._-]"),
        ));
    }
}

fn check_metadata(m: &Metadata, out: &mut Vec<Problem>) {
    check_name("metadata.name", &m.name, out);
    check_name("metadata.namespace", &m.namespace, out);
}

fn check_selector(s: &Option<Selector>, out: &mut Vec<Problem>) {
    if let Some(s) = s {
        check_name("selector.account", &s.account, out);
    }
}

fn check_ports(what: &str, ports: &[u16], out: &mut Vec<Problem>) {
    if ports.contains(&0) {
        out.push(Problem::at(
            what,
            format!("{what}: port 0 is not a port (use 1-65535)"),
        ));
    }
}

/// A principal: a SPIFFE ID, `*`, `prefix*` or `*suffix`.
pub fn check_principal(p: &str) -> Result<(), String> {
    let pattern = Pattern::parse(p).map_err(|e| format!("principal {p:?}: {e}"))?;
    // Complete a partial pattern into an ID, so the literal part gets the SPIFFE checks too.
    let probe = match &pattern {
        Pattern::Any => return Ok(()),
        Pattern::Exact(id) => id.clone(),
        Pattern::Prefix(prefix) => format!("{prefix}x/x"),
        Pattern::Suffix(suffix) => format!("spiffe://td/x{suffix}"),
    };
    SpiffeId::parse(&probe)
        .map(|_| ())
        .map_err(|e| format!("principal {p:?} is not a valid SPIFFE ID or ID pattern: {e}"))
}

/// A path pattern: `/exact`, `/prefix*`, `*suffix` or `*`, in normalized form.
pub fn check_path_pattern(p: &str) -> Result<(), String> {
    let pattern = Pattern::parse(p).map_err(|e| format!("path pattern {p:?}: {e}"))?;
    let literal = match &pattern {
        Pattern::Any => return Ok(()),
        Pattern::Suffix(s) if s.contains(['?', '#']) => {
            return Err(format!("path pattern {p:?} must not contain '?' or '#'"));
        }
        Pattern::Suffix(_) => return Ok(()),
        Pattern::Exact(s) | Pattern::Prefix(s) => s,
    };
    if !literal.starts_with('/') {
        return Err(format!(
            "path pattern {p:?} must start with '/' (or be '*' or '*suffix')"
        ));
    }
    match normalize_path(literal) {
        Ok(n) if n.path == *literal && n.query.is_none() => Ok(()),
        Ok(n) => Err(format!(
            "path pattern {p:?} is not in normalized form (requests are matched after \
             normalization, so it could never match): did you mean {:?}?",
            n.path
        )),
        Err(e) => Err(format!(
            "path pattern {p:?} can never match a normalized request path: {e}"
        )),
    }
}

/// RFC 9110 §5.6.2: `token = 1*tchar`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

fn check_source(s: &Source, out: &mut Vec<Problem>) {
    for p in s.principals.iter().chain(&s.not_principals) {
        if let Err(reason) = check_principal(p) {
            out.push(Problem::at(p, reason));
        }
    }
}

fn check_operation(op: &Operation, out: &mut Vec<Problem>) {
    for m in op.methods.iter().chain(&op.not_methods) {
        if !is_token(m) {
            out.push(Problem::at(
                m,
                format!("method {m:?} is not an HTTP method token (RFC 9110), e.g. GET"),
            ));
        } else if m.bytes().any(|b| b.is_ascii_lowercase()) {
            out.push(Problem::at(
                m,
                format!(
                    "method {m:?} is not in canonical form: the sidecar refuses requests whose method has lowercase letters, so this rule could never match; write {:?}",
                    m.to_ascii_uppercase()
                ),
            ));
        }
    }
    for p in op.paths.iter().chain(&op.not_paths) {
        if let Err(reason) = check_path_pattern(p) {
            out.push(Problem::at(p, reason));
        }
    }
    check_ports("ports", &op.ports, out);
    check_ports("notPorts", &op.not_ports, out);
}

fn check_rule(rule: &Rule, out: &mut Vec<Problem>) {
    rule.from.iter().for_each(|s| check_source(s, out));
    rule.to.iter().for_each(|op| check_operation(op, out));
    for c in &rule.when {
        if http::HeaderName::from_bytes(c.header.as_bytes()).is_err() {
            out.push(Problem::at(
                &c.header,
                format!("header {:?} is not a valid HTTP header name", c.header),
            ));
        }
        for v in c.values.iter().chain(&c.not_values) {
            if let Err(e) = Pattern::parse(v) {
                out.push(Problem::at(v, format!("header value pattern {v:?}: {e}")));
            }
        }
    }
}

/// Checks an AuthorizationPolicy.
pub fn authorization_policy(p: &AuthorizationPolicy) -> Vec<Problem> {
    let mut out = Vec::new();
    check_metadata(&p.metadata, &mut out);
    check_selector(&p.spec.selector, &mut out);
    p.spec.rules.iter().for_each(|r| check_rule(r, &mut out));
    out
}

/// `host:port` (IPv6 as `[::1]:port`), port not 0.
fn check_endpoint(e: &str) -> Result<(), String> {
    let bad = || format!("endpoint {e:?} must be host:port with a port in 1-65535");
    let (host, port) = e.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = matches!(port.parse::<u16>(), Ok(p) if p != 0);
    let host_ok = !host.is_empty() && !host.contains(char::is_whitespace);
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Checks a Service.
pub fn service(s: &Service) -> Vec<Problem> {
    let mut out = Vec::new();
    check_metadata(&s.metadata, &mut out);
    for h in &s.spec.hosts {
        if h.is_empty() || h.contains(|c: char| c.is_whitespace() || matches!(c, '/' | ':')) {
            out.push(Problem::at(
                h,
                format!("host {h:?} must be a bare Host header value (no scheme, path or port)"),
            ));
        }
    }
    for p in &s.spec.ports {
        if p.port == 0 {
            out.push(Problem::at(
                "port",
                "ports: port 0 is not a port".to_string(),
            ));
        }
        if p.target_port == Some(0) {
            out.push(Problem::at(
                "targetPort",
                "ports: targetPort 0 is not a port; remove it to use `port`".to_string(),
            ));
        }
    }
    for e in &s.spec.endpoints {
        if let Err(reason) = check_endpoint(e) {
            out.push(Problem::at(e, reason));
        }
    }
    out
}

/// Checks a NetworkPolicy.
pub fn network_policy(n: &NetworkPolicy) -> Vec<Problem> {
    let mut out = Vec::new();
    check_metadata(&n.metadata, &mut out);
    check_selector(&n.spec.selector, &mut out);
    let rules = n
        .spec
        .egress
        .iter()
        .map(|r| ("egress", &r.to, &r.ports))
        .chain(
            n.spec
                .ingress
                .iter()
                .map(|r| ("ingress", &r.from, &r.ports)),
        );
    for (what, cidrs, ports) in rules {
        if cidrs.is_empty() {
            out.push(Problem::at(what, format!("{what} rule names no CIDR")));
        }
        for net in cidrs {
            if net.trunc() != *net {
                out.push(Problem::at(
                    &net.to_string(),
                    format!(
                        "CIDR {net} has host bits set: write {} (or the /{} host route)",
                        net.trunc(),
                        net.max_prefix_len()
                    ),
                ));
            }
        }
        check_ports(what, ports, &mut out);
    }
    out
}

/// Checks a MeshConfig.
pub fn mesh_config(m: &MeshConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    check_metadata(&m.metadata, &mut out);
    if m.metadata.namespace != ROOT_NAMESPACE {
        out.push(Problem::at(
            "namespace",
            format!(
                "MeshConfig must be in namespace {ROOT_NAMESPACE:?}, not {:?}",
                m.metadata.namespace
            ),
        ));
    }
    if let Err(e) = TrustDomain::new(&m.spec.trust_domain) {
        out.push(Problem::at("trustDomain", format!("trustDomain: {e}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_table() {
        let cases = [
            ("spiffe://mesh.local/ns/shop/sa/web", true),
            ("*", true),
            ("spiffe://mesh.local/ns/shop/*", true),
            ("spiffe://mesh.local/*", true),
            ("*/sa/web", true),
            ("*web", true),
            ("web", false),
            ("spiffe://Mesh.local/ns/a/sa/b", false),
            ("spiffe://mesh.local/ns//sa/b", false),
            ("spiffe://mesh.local/ns/*/sa/web", false),
            ("*/sa/*", false),
            ("spiffe://mesh.local/ns/../*", false),
            ("*/sa/we b", false),
            ("", false),
        ];
        for (p, ok) in cases {
            assert_eq!(
                check_principal(p).is_ok(),
                ok,
                "{p}: {:?}",
                check_principal(p)
            );
        }
    }

    #[test]
    fn path_pattern_table() {
        let cases = [
            ("/orders", true),
            ("/orders/*", true),
            ("/", true),
            ("*", true),
            ("*.json", true),
            ("/v1*", true),
            ("orders", false),
            ("orders/*", false),
            ("/a/*/b", false),
            ("/a//b", false),
            ("/a/../b", false),
            ("/a?x=1", false),
            ("/a;b", false),
            ("/%2e%2e/x", false),
            ("*.json?x", false),
        ];
        for (p, ok) in cases {
            assert_eq!(
                check_path_pattern(p).is_ok(),
                ok,
                "{p}: {:?}",
                check_path_pattern(p)
            );
        }
    }

    #[test]
    fn token_table() {
        let cases = [
            ("GET", true),
            ("get", true),
            ("M-SEARCH", true),
            ("X_Y.Z~!", true),
            ("", false),
            ("GET POST", false),
            ("GET,POST", false),
            ("GÉT", false),
            ("(GET)", false),
        ];
        for (m, ok) in cases {
            assert_eq!(is_token(m), ok, "{m}");
        }
    }

    #[test]
    fn endpoint_table() {
        let cases = [
            ("127.0.0.1:15006", true),
            ("orders.shop:15006", true),
            ("[::1]:15006", true),
            ("127.0.0.1", false),
            ("127.0.0.1:0", false),
            ("127.0.0.1:70000", false),
            (":15006", false),
        ];
        for (e, ok) in cases {
            assert_eq!(check_endpoint(e).is_ok(), ok, "{e}");
        }
    }
}
