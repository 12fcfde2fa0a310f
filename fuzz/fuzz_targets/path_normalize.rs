//! `normalize_path` is total and idempotent, and what it returns has the canonical form that
//! xds-lite/src/path.rs documents: origin-form, no dot-segments, no `//`, percent-escapes only
//! for characters that are not unreserved, in uppercase hex, never for `/ \ ;` NUL or controls.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_policy::path::{MAX_TARGET_LEN, normalize_path};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    check(s);
    if !s.starts_with('/') {
        check(&format!("/{s}"));
    }
});

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn check(target: &str) {
    let n = match normalize_path(target) {
        Ok(n) => n,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let (raw_path, raw_query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let p = n.path.as_str();

    // Shape of the canonical path.
    assert!(p.starts_with('/'), "{target:?} -> {p:?}");
    assert!(!p.contains("//"), "{target:?} -> {p:?}");
    assert!(
        !p.contains("/./") && !p.contains("/../"),
        "{target:?} -> {p:?}"
    );
    assert!(
        !p.ends_with("/.") && !p.ends_with("/.."),
        "{target:?} -> {p:?}"
    );
    assert!(
        p.len() <= raw_path.len() && p.len() <= MAX_TARGET_LEN,
        "{target:?} -> {p:?}"
    );
    for b in p.bytes() {
        assert!(
            b.is_ascii_graphic() && !matches!(b, b'?' | b'#' | b'\\' | b';'),
            "{target:?} -> {p:?}: byte {b:#04x}"
        );
    }
    // Escapes were decoded once: what is left is uppercase hex for a byte that must stay encoded.
    let bytes = p.as_bytes();
    for (i, _) in p.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3).expect("complete escape");
        assert!(
            hex.iter()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
            "{target:?} -> {p:?}: escape at {i} is not uppercase hex"
        );
        let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
        assert!(
            !is_unreserved(v) && !matches!(v, b'/' | b'\\' | b';' | 0x00..=0x1f | 0x7f),
            "{target:?} -> {p:?}: %{v:02X} should have been decoded or refused"
        );
    }

    // The query is passed through untouched; `changed` says whether the path part changed.
    assert_eq!(n.query.as_deref(), raw_query);
    assert_eq!(n.changed, p != raw_path, "{target:?} -> {p:?}");

    // Idempotent: the output is a fixed point, with and without its query.
    let again = normalize_path(p).unwrap_or_else(|e| panic!("{target:?} -> {p:?} refused: {e}"));
    assert_eq!(again.path, p, "{target:?}: not idempotent");
    assert!(
        !again.changed,
        "{target:?} -> {p:?}: changed on second pass"
    );
    assert_eq!(again.query, None);
    let forwarded = n.to_target();
    let again = normalize_path(&forwarded)
        .unwrap_or_else(|e| panic!("{target:?} -> {forwarded:?} refused: {e}"));
    assert_eq!(
        (again.path.as_str(), again.query.as_deref()),
        (p, raw_query)
    );
    assert!(!again.changed);
}
