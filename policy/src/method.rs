//! Request methods as the sidecar accepts them.
//!
//! HTTP methods are case-sensitive tokens (RFC 9110 §9.1), but application frameworks are not:
//! many route `delete` and `Delete` to their DELETE handler. A rule `DENY methods: [DELETE]`
//! compared case-sensitively would let `delete` through to such an app. Rather than guess which
//! spellings an app folds together, the sidecar refuses every method that is not in canonical
//! form (no lowercase letters) before any policy is consulted, so a method that reaches the app
//! is always spelled the way policies spell it. Policy validation refuses lowercase methods for
//! the same reason (such a rule could never match).
//!
//! `CONNECT` is refused too: the sidecar never opens tunnels on a caller's behalf over HTTP
//! (L4 tunnels are their own mTLS connection with ALPN `meshgate-tcp`), and a `CONNECT`
//! forwarded to an app that honours it would carry bytes no rule judges.

/// Why a method is refused before policy evaluation (the sidecar answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    #[error(
        "method {0:?} is not in canonical form (uppercase); apps may fold it into another method"
    )]
    NonCanonical(String),
    #[error("method CONNECT is not forwarded: HTTP tunnels would bypass per-request authorization")]
    Connect,
}

/// Checks a request method (already known to be an RFC 9110 token by the HTTP parser).
pub fn check_method(method: &str) -> Result<(), MethodError> {
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(MethodError::NonCanonical(method.to_string()));
    }
    if method == "CONNECT" {
        return Err(MethodError::Connect);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_methods_pass_and_other_spellings_are_refused() {
        for (method, ok) in [
            ("GET", true),
            ("DELETE", true),
            ("PATCH", true),
            ("PROPFIND", true),
            ("M-SEARCH", true),
            ("X1", true),
            ("delete", false),
            ("Delete", false),
            ("dELETE", false),
            ("get", false),
            ("purge", false),
            ("CONNECT", false),
        ] {
            assert_eq!(check_method(method).is_ok(), ok, "{method}");
        }
    }
}
