//! SPIFFE IDs: the one place where they are parsed and validated.
//!
//! Rules (SPIFFE ID standard §2): scheme `spiffe`, a trust domain of lowercase letters, digits,
//! `.`, `-` and `_`, path segments that are non-empty and not `.`/`..`, segment characters from
//! `[A-Za-z0-9._-]`, no query, fragment, port or userinfo, at most 2048 bytes in all. Everything
//! that names a workload (CSRs, certificates, tokens, policy principals) goes through
//! [`SpiffeId::parse`], so a malformed ID cannot slip in through a side door.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest SPIFFE ID accepted, in bytes (SPIFFE ID standard: URIs up to 2048 bytes).
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes (it is a DNS-like name).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    #[error(
        "trust domain {0:?} is invalid: use lowercase letters, digits, '.', '-' and '_' only (no port, no userinfo)"
    )]
    BadTrustDomain(String),
    #[error("SPIFFE ID must not contain a query or fragment")]
    QueryOrFragment,
    #[error("SPIFFE ID path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("SPIFFE ID path has a '.' or '..' segment")]
    DotSegment,
    #[error(
        "SPIFFE ID path segment {0:?} has a character outside [A-Za-z0-9._-] (percent-encoding is not allowed)"
    )]
    BadSegment(String),
    #[error(
        "SPIFFE ID names only a trust domain; a workload ID needs a path such as /ns/<ns>/sa/<sa>"
    )]
    NoPath,
}

/// A validated trust domain such as `mesh.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let valid_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
        if name.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN || !name.chars().all(valid_char) {
            return Err(SpiffeIdError::BadTrustDomain(name.to_string()));
        }
        Ok(Self(name.to_string()))
    }

    /// The trust domain name, e.g. `mesh.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<td>` (used as the URI SAN of CA certificates).
    pub fn id_uri(&self) -> String {
        format!("spiffe://{}", self.0)
    }

    /// The workload ID `spiffe://<td>/ns/<namespace>/sa/<account>`.
    pub fn workload_id(&self, namespace: &str, account: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(&format!("spiffe://{}/ns/{namespace}/sa/{account}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated workload SPIFFE ID (`spiffe://<trust-domain>/<path>`), with a non-empty path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Shared: an ID is cloned into every decision record, span and log line, and a clone must
    /// not cost an allocation per request.
    uri: Arc<str>,
    /// Byte length of `spiffe://<td>`, so the trust domain and path are slices of `uri`.
    td_end: usize,
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// Parses and validates a workload SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        // The scheme is case-insensitive in URIs, but SPIFFE requires the lowercase form.
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::QueryOrFragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::new(td)?;
        if path.is_empty() {
            return Err(SpiffeIdError::NoPath);
        }
        for segment in path[1..].split('/') {
            match segment {
                "" => return Err(SpiffeIdError::EmptySegment),
                "." | ".." => return Err(SpiffeIdError::DotSegment),
                _ if !segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) =>
                {
                    return Err(SpiffeIdError::BadSegment(segment.to_string()));
                }
                _ => {}
            }
        }
        Ok(Self {
            uri: Arc::from(s),
            td_end: SCHEME.len() + td.len(),
        })
    }

    /// The trust domain part, e.g. `mesh.local`.
    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    /// The trust domain as a validated value.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_string())
    }

    /// True when the ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }

    /// The path, starting with `/`, e.g. `/ns/shop/sa/web`.
    pub fn path(&self) -> &str {
        &self.uri[self.td_end..]
    }

    /// The whole ID as a URI string.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// `(namespace, service account)` when the path has the Kubernetes-style shape
    /// `/ns/<namespace>/sa/<account>`.
    pub fn namespace_and_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path()[1..].split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        let cases = [
            (
                "spiffe://mesh.local/ns/shop/sa/web",
                "mesh.local",
                "/ns/shop/sa/web",
            ),
            ("spiffe://example.org/workload", "example.org", "/workload"),
            ("spiffe://a_b-c.d/x/Y.z/_-9", "a_b-c.d", "/x/Y.z/_-9"),
            ("spiffe://td/...a/b..", "td", "/...a/b.."),
            ("spiffe://1.2.3.4/svc", "1.2.3.4", "/svc"),
        ];
        for (input, td, path) in cases {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.trust_domain_name(), td, "{input}");
            assert_eq!(id.path(), path, "{input}");
            assert_eq!(id.to_string(), input);
        }
    }

    #[test]
    fn invalid_ids() {
        use SpiffeIdError::*;
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let cases: Vec<(&str, SpiffeIdError)> = vec![
            ("", Empty),
            ("http://mesh.local/ns/a/sa/b", WrongScheme),
            ("SPIFFE://mesh.local/ns/a/sa/b", WrongScheme),
            ("spiffe:/mesh.local/a", WrongScheme),
            ("spiffe:///ns/a", MissingTrustDomain),
            ("spiffe://", MissingTrustDomain),
            (
                "spiffe://Mesh.Local/ns/a",
                BadTrustDomain("Mesh.Local".into()),
            ),
            (
                "spiffe://mesh.local:8443/ns/a",
                BadTrustDomain("mesh.local:8443".into()),
            ),
            (
                "spiffe://user@mesh.local/ns/a",
                BadTrustDomain("user@mesh.local".into()),
            ),
            ("spiffe://mesh.local", NoPath),
            ("spiffe://mesh.local/", EmptySegment),
            ("spiffe://mesh.local/ns//sa/b", EmptySegment),
            ("spiffe://mesh.local/ns/a/", EmptySegment),
            ("spiffe://mesh.local/ns/./sa", DotSegment),
            ("spiffe://mesh.local/ns/../admin", DotSegment),
            ("spiffe://mesh.local/ns/a?x=1", QueryOrFragment),
            ("spiffe://mesh.local/ns/a#frag", QueryOrFragment),
            ("spiffe://mesh.local/ns/%2e%2e", BadSegment("%2e%2e".into())),
            ("spiffe://mesh.local/ns/a b", BadSegment("a b".into())),
            (
                "spiffe://mesh.local/ns/caf\u{e9}",
                BadSegment("caf\u{e9}".into()),
            ),
            (long.as_str(), TooLong),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn namespace_and_account() {
        let id = SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.namespace_and_account(), Some(("shop", "web")));
        let other = SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web/extra").unwrap();
        assert_eq!(other.namespace_and_account(), None);
    }

    #[test]
    fn trust_domain_membership() {
        let td = TrustDomain::new("mesh.local").unwrap();
        assert!(
            SpiffeId::parse("spiffe://mesh.local/x")
                .unwrap()
                .is_member_of(&td)
        );
        assert!(
            !SpiffeId::parse("spiffe://mesh.localx/x")
                .unwrap()
                .is_member_of(&td)
        );
        assert_eq!(
            td.workload_id("shop", "web").unwrap().as_str(),
            "spiffe://mesh.local/ns/shop/sa/web"
        );
    }
}
