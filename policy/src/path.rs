//! Request-path normalization.
//!
//! Policies match paths, apps route on paths, and every gap between what the two see is an
//! authorization bypass (Istio/Envoy advisories: `%2F` and `\` treated as separators by the app,
//! `..` hidden behind percent-encoding, `;` path parameters stripped by Tomcat, `//` merged by
//! the app, decoding done twice). This module makes one canonical form that the policy judges
//! *and* the sidecar forwards, and refuses (400) anything whose meaning differs between common
//! servers instead of guessing:
//!
//! 1. the target must be origin-form (`/…`), at most [`MAX_TARGET_LEN`] bytes;
//! 2. raw NUL, control characters, space, non-ASCII, `#` anywhere, and `\` or `;` in the path
//!    are refused;
//! 3. percent-escapes are decoded exactly once: unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!    decoded, everything else stays encoded with uppercase hex; encoded `/`, `\`, `;`, NUL and
//!    control characters, and malformed escapes, are refused (so `%252e` stays `%252e`);
//! 4. runs of `/` are merged, `.` and `..` segments resolved (`..` above `/` is refused), and a
//!    trailing slash is kept.
//!
//! Case is left alone (paths are case-sensitive); DENY rules compensate by matching paths
//! case-insensitively (see [`crate::authz`]).

/// Longest request target accepted, in bytes.
pub const MAX_TARGET_LEN: usize = 8192;

/// A path safe to judge and to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// The normalized path (starts with `/`, no query).
    pub path: String,
    /// The query, unchanged, without the `?`.
    pub query: Option<String>,
    /// True when `path` differs from the original path part.
    pub changed: bool,
}

impl NormalizedPath {
    /// Path and query as they should be forwarded to the app.
    pub fn to_target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Why a path was refused (the request gets 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is not in origin form")]
    NotOriginForm,
    #[error("request target is longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
    #[error("request target contains a NUL byte")]
    Nul,
    #[error("request target contains a control character or space (byte {0:#04x})")]
    ControlCharacter(u8),
    #[error("request target contains a non-ASCII byte; it must be percent-encoded")]
    NonAscii,
    #[error("request target contains '#': fragments are never sent to a server")]
    Fragment,
    #[error("path contains a backslash, which some servers treat as '/'")]
    Backslash,
    #[error("path contains ';' (path parameters), which some servers strip before routing")]
    Semicolon,
    #[error("path has a malformed percent-escape (expected '%' and two hex digits)")]
    MalformedEscape,
    #[error("path contains an encoded '/' (%2F), which some servers decode into a separator")]
    EncodedSlash,
    #[error("path contains an encoded '\\' (%5C), which some servers decode into a separator")]
    EncodedBackslash,
    #[error("path contains an encoded ';' (%3B), which some servers treat as a path parameter")]
    EncodedSemicolon,
    #[error("path contains an encoded NUL (%00)")]
    EncodedNul,
    #[error("path contains an encoded control character (%{0:02X})")]
    EncodedControl(u8),
    #[error("path climbs above the root with '..'")]
    AboveRoot,
}

/// Normalizes a request target's path-and-query.
pub fn normalize_path(target: &str) -> Result<NormalizedPath, PathError> {
    if target.len() > MAX_TARGET_LEN {
        return Err(PathError::TooLong);
    }
    check_raw_bytes(target)?;
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    if !raw_path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if raw_path.contains('\\') {
        return Err(PathError::Backslash);
    }
    if raw_path.contains(';') {
        return Err(PathError::Semicolon);
    }
    let decoded = decode_once(raw_path)?;
    let path = resolve_segments(&decoded)?;
    let changed = path != raw_path;
    Ok(NormalizedPath {
        path,
        query,
        changed,
    })
}

/// Refuses bytes that must never appear raw in a request target.
fn check_raw_bytes(target: &str) -> Result<(), PathError> {
    for &b in target.as_bytes() {
        match b {
            0 => return Err(PathError::Nul),
            0x01..=0x20 | 0x7f => return Err(PathError::ControlCharacter(b)),
            b'#' => return Err(PathError::Fragment),
            0x80.. => return Err(PathError::NonAscii),
            _ => {}
        }
    }
    Ok(())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One pass of percent-decoding, limited to unreserved characters (RFC 3986 §6.2.2.2). A path
/// without `%` is its own decoding (every other byte is copied as it is), and is borrowed.
fn decode_once(path: &str) -> Result<std::borrow::Cow<'_, str>, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if !path.contains('%') {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex_value),
            bytes.get(i + 2).copied().and_then(hex_value),
        ) else {
            return Err(PathError::MalformedEscape);
        };
        let c = hi << 4 | lo;
        match c {
            b'/' => return Err(PathError::EncodedSlash),
            b'\\' => return Err(PathError::EncodedBackslash),
            b';' => return Err(PathError::EncodedSemicolon),
            0 => return Err(PathError::EncodedNul),
            0x01..=0x1f | 0x7f => return Err(PathError::EncodedControl(c)),
            _ if is_unreserved(c) => out.push(char::from(c)),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(hi)]));
                out.push(char::from(HEX[usize::from(lo)]));
            }
        }
        i += 3;
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// Merges `//`, resolves `.` and `..`, keeps a trailing slash. Built in the output string
/// itself: each kept segment is `/` and its text (never empty, never containing `/`), so `..`
/// removes back to the last `/`, and an empty output means no segment is left to remove.
fn resolve_segments(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let mut segments = path[1..].split('/').peekable();
    let mut trailing_slash = false;
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "" | "." => {}
            ".." => match out.rfind('/') {
                Some(start) => out.truncate(start),
                None => return Err(PathError::AboveRoot),
            },
            _ => {
                out.push('/');
                out.push_str(seg);
            }
        }
        // `/a/`, `/a/.` and `/a/b/..` all name a directory: keep the slash.
        trailing_slash = last && matches!(seg, "" | "." | "..");
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`resolve_segments`] against a plain model of it (a stack of segments), on every path of
    /// up to five segments drawn from the cases that matter: empty, `.`, `..`, names, names
    /// with dots.
    #[test]
    fn segments_resolve_as_a_stack_of_segments_would() {
        fn model(path: &str) -> Result<String, PathError> {
            let mut kept: Vec<&str> = Vec::new();
            let segments: Vec<&str> = path[1..].split('/').collect();
            let mut trailing_slash = false;
            for (i, &seg) in segments.iter().enumerate() {
                match seg {
                    "" | "." => {}
                    ".." => {
                        kept.pop().ok_or(PathError::AboveRoot)?;
                    }
                    _ => kept.push(seg),
                }
                trailing_slash = i + 1 == segments.len() && matches!(seg, "" | "." | "..");
            }
            let mut out: String = kept.iter().map(|s| format!("/{s}")).collect();
            if trailing_slash || kept.is_empty() {
                out.push('/');
            }
            Ok(out)
        }
        let parts = ["", ".", "..", "a", "bc", "..a", "a."];
        let mut paths = vec![String::new()];
        let mut checked = 0;
        for _ in 0..5 {
            paths = paths
                .iter()
                .flat_map(|p| parts.iter().map(move |s| format!("{p}/{s}")))
                .collect();
            for path in &paths {
                assert_eq!(resolve_segments(path), model(path), "{path}");
                checked += 1;
            }
        }
        assert!(checked > 19_000, "{checked}");
    }

    #[test]
    fn benign_paths() {
        // (target, path, query, changed)
        let cases: &[(&str, &str, Option<&str>, bool)] = &[
            ("/", "/", None, false),
            ("/a/b", "/a/b", None, false),
            ("/a/b/", "/a/b/", None, false),
            ("/a?x=1&y=%2F", "/a", Some("x=1&y=%2F"), false),
            ("/a?", "/a", Some(""), false),
            ("/%7Euser/%41", "/~user/A", None, true),
            ("/caf%c3%a9", "/caf%C3%A9", None, true),
            ("/a%20b", "/a%20b", None, false),
            ("/a//b///c", "/a/b/c", None, true),
            ("/a/./b/.", "/a/b/", None, true),
            ("/a/b/..", "/a/", None, true),
            ("/a/..", "/", None, true),
            ("/..a/b..", "/..a/b..", None, false),
            ("/a/%252e", "/a/%252e", None, false),
            ("/a/%2e%2E/b", "/b", None, true),
        ];
        for &(target, path, query, changed) in cases {
            let n = normalize_path(target).unwrap_or_else(|e| panic!("{target}: {e}"));
            assert_eq!(n.path, path, "{target}");
            assert_eq!(n.query.as_deref(), query, "{target}");
            assert_eq!(n.changed, changed, "{target}");
        }
    }

    #[test]
    fn refused_paths() {
        use PathError::*;
        let long = format!("/{}", "a".repeat(MAX_TARGET_LEN));
        let cases: &[(&str, PathError)] = &[
            ("", NotOriginForm),
            ("a/b", NotOriginForm),
            ("*", NotOriginForm),
            ("http://h/a", NotOriginForm),
            ("?x", NotOriginForm),
            (&long, TooLong),
            ("/a\0b", Nul),
            ("/a\tb", ControlCharacter(b'\t')),
            ("/a b", ControlCharacter(b' ')),
            ("/a\x7f", ControlCharacter(0x7f)),
            ("/a?x=\n", ControlCharacter(b'\n')),
            ("/caf\u{e9}", NonAscii),
            ("/a#b", Fragment),
            ("/a?b#c", Fragment),
            ("/a\\b", Backslash),
            ("/a;b", Semicolon),
            ("/a%", MalformedEscape),
            ("/a%2", MalformedEscape),
            ("/a%zz", MalformedEscape),
            ("/a%2g", MalformedEscape),
            ("/a%2fb", EncodedSlash),
            ("/a%2Fb", EncodedSlash),
            ("/a%5cb", EncodedBackslash),
            ("/a%3bb", EncodedSemicolon),
            ("/a%00", EncodedNul),
            ("/a%0a", EncodedControl(0x0a)),
            ("/a%7F", EncodedControl(0x7f)),
            ("/..", AboveRoot),
            ("/a/../..", AboveRoot),
        ];
        for (target, want) in cases {
            assert_eq!(normalize_path(target).as_ref(), Err(want), "{target:?}");
        }
    }
}
