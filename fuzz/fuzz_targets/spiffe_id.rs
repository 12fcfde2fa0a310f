//! `SpiffeId::parse` never panics, agrees with an independent reading of the rules documented in
//! ca/src/spiffe.rs, and what it accepts round-trips (Display, serde, accessors).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_ca::spiffe::{MAX_ID_LEN, MAX_TRUST_DOMAIN_LEN};
use meshgate_ca::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    check(s);
    // Most random strings die at the scheme; also try them as the part after it.
    if !s.starts_with("spiffe://") {
        check(&format!("spiffe://{s}"));
    }
});

fn td_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn segment_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// The module documentation's rules, written independently of the parser.
fn reference_accepts(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return false;
    }
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((td, path)) = rest.split_once('/') else {
        return false; // no path: a trust domain is not a workload ID
    };
    let td_ok = !td.is_empty() && td.len() <= MAX_TRUST_DOMAIN_LEN && td.bytes().all(td_char);
    td_ok
        && path.split('/').all(|seg| {
            !seg.is_empty() && seg != "." && seg != ".." && seg.bytes().all(segment_char)
        })
}

fn check(s: &str) {
    let parsed = SpiffeId::parse(s);
    assert_eq!(
        parsed.is_ok(),
        reference_accepts(s),
        "parse and the documented rules disagree on {s:?}: {parsed:?}"
    );
    let id = match parsed {
        Ok(id) => id,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    // The accepted string is kept verbatim and parses to the same value again.
    assert_eq!(id.as_str(), s);
    assert_eq!(id.to_string(), s);
    assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
    assert_eq!(s.parse::<SpiffeId>().as_ref(), Ok(&id));

    // Trust domain and path are the two halves of the string.
    let td = id.trust_domain_name();
    let path = id.path();
    assert_eq!(format!("spiffe://{td}{path}"), s);
    assert!(!td.is_empty() && td.len() <= MAX_TRUST_DOMAIN_LEN && td.bytes().all(td_char));
    let domain = TrustDomain::new(td).expect("the trust domain of a valid ID is valid");
    assert_eq!(id.trust_domain(), domain);
    assert!(id.is_member_of(&domain));
    assert_eq!(domain.id_uri(), format!("spiffe://{td}"));
    assert!(path.starts_with('/') && path.len() > 1);
    assert!(!path.contains("//") && !path.ends_with('/'));
    for seg in path[1..].split('/') {
        assert!(
            seg != "." && seg != ".." && seg.bytes().all(segment_char),
            "{s:?}"
        );
    }

    // serde agrees with parse.
    let json = serde_json::to_string(&id).expect("serializes");
    assert_eq!(
        serde_json::from_str::<SpiffeId>(&json).ok().as_ref(),
        Some(&id)
    );

    // The Kubernetes shape rebuilds the same ID.
    if let Some((ns, sa)) = id.namespace_and_account() {
        assert_eq!(path, format!("/ns/{ns}/sa/{sa}"));
        assert_eq!(domain.workload_id(ns, sa).as_ref(), Ok(&id));
    }
}
