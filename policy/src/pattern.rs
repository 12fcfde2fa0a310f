//! The one string-pattern language of policies: exact, `*` (any), `prefix*`, `*suffix`.
//!
//! Principals, paths and header values all use it (Istio's habit), so one small, well-tested
//! matcher decides all three. A `*` anywhere else is refused at load time rather than treated
//! literally, because a user writing `/api/*/admin` means a glob we do not offer.

use serde::Serialize;

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

/// Why a pattern string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("pattern is empty")]
    Empty,
    #[error("'*' may appear only once, at the start or the end of a pattern")]
    StarInMiddle,
}

impl Pattern {
    /// Parses `s`. Exactly one `*` at either end, or none.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s == "*" {
            return Ok(Self::Any);
        }
        let stars = s.matches('*').count();
        if stars == 1 {
            if let Some(p) = s.strip_suffix('*') {
                return Ok(Self::Prefix(p.to_string()));
            }
            if let Some(p) = s.strip_prefix('*') {
                return Ok(Self::Suffix(p.to_string()));
            }
        }
        if stars == 0 {
            return Ok(Self::Exact(s.to_string()));
        }
        Err(PatternError::StarInMiddle)
    }

    /// The same pattern, ASCII-lowercased, to be matched with [`Pattern::matches_ignore_case`].
    pub fn to_ascii_lowercase(&self) -> Self {
        match self {
            Self::Exact(s) => Self::Exact(s.to_ascii_lowercase()),
            Self::Prefix(s) => Self::Prefix(s.to_ascii_lowercase()),
            Self::Suffix(s) => Self::Suffix(s.to_ascii_lowercase()),
            Self::Any => Self::Any,
        }
    }

    /// Case-sensitive match.
    pub fn matches(&self, v: &[u8]) -> bool {
        match self {
            Self::Exact(s) => v == s.as_bytes(),
            Self::Prefix(s) => v.starts_with(s.as_bytes()),
            Self::Suffix(s) => v.ends_with(s.as_bytes()),
            Self::Any => true,
        }
    }

    /// ASCII-case-insensitive match; `self` must be lowercased already.
    pub fn matches_ignore_case(&self, v: &[u8]) -> bool {
        match self {
            Self::Exact(s) => v.eq_ignore_ascii_case(s.as_bytes()),
            Self::Prefix(s) => {
                v.len() >= s.len() && v[..s.len()].eq_ignore_ascii_case(s.as_bytes())
            }
            Self::Suffix(s) => {
                v.len() >= s.len() && v[v.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
            Self::Any => true,
        }
    }

    /// The exact string, when the pattern has no wildcard (used to index principals).
    pub fn as_exact(&self) -> Option<&str> {
        match self {
            Self::Exact(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<Pattern, PatternError>)] = &[
            ("*", Ok(Pattern::Any)),
            ("/a", Ok(Pattern::Exact("/a".into()))),
            ("/a/*", Ok(Pattern::Prefix("/a/".into()))),
            ("*.json", Ok(Pattern::Suffix(".json".into()))),
            ("", Err(PatternError::Empty)),
            ("/a/*/b", Err(PatternError::StarInMiddle)),
            ("*a*", Err(PatternError::StarInMiddle)),
            ("**", Err(PatternError::StarInMiddle)),
        ];
        for (input, want) in cases {
            assert_eq!(&Pattern::parse(input), want, "{input:?}");
        }
    }

    #[test]
    fn match_table() {
        // (pattern, value, case-sensitive result, case-insensitive result)
        let cases = [
            ("/a", "/a", true, true),
            ("/a", "/A", false, true),
            ("/a", "/a/", false, false),
            ("/a/*", "/a/", true, true),
            ("/a/*", "/a/b/c", true, true),
            ("/a/*", "/a", false, false),
            ("/a/*", "/A/b", false, true),
            ("/a/*", "/ab", false, false),
            ("*.json", "/x.json", true, true),
            ("*.json", "/x.JSON", false, true),
            ("*.json", "/x.jsonp", false, false),
            ("*", "", true, true),
            ("*", "/anything", true, true),
        ];
        for (pat, v, cs, ci) in cases {
            let p = Pattern::parse(pat).unwrap();
            assert_eq!(p.matches(v.as_bytes()), cs, "{pat} ~ {v}");
            assert_eq!(
                p.to_ascii_lowercase().matches_ignore_case(v.as_bytes()),
                ci,
                "{pat} ~i {v}"
            );
        }
    }
}
