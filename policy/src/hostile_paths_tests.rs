//! Known path-confusion bypasses against "allow `/public/*`, deny `/admin/*`": normalization alone,
//! then normalization + a real compiled snapshot.

use meshgate_spiffe::SpiffeId;

use crate::authz::{AuthzRequest, PolicySnapshot};
use crate::load::load_dir;
use crate::path::{PathError, normalize_path};

/// Expected outcome of normalization: the path, or the refusal.
enum Want {
    Path(&'static str),
    Refused(PathError),
}

fn hostile_cases() -> Vec<(&'static str, Want)> {
    use PathError::*;
    use Want::{Path, Refused};
    vec![
        ("/public/../admin/x", Path("/admin/x")),
        ("/public/%2e%2e/admin/x", Path("/admin/x")),
        ("/public/%2E%2e/admin", Path("/admin")),
        ("/public/.%2e/admin", Path("/admin")),
        ("/public/%2e./admin/", Path("/admin/")),
        ("//admin/x", Path("/admin/x")),
        ("///admin//x", Path("/admin/x")),
        ("/./admin/x", Path("/admin/x")),
        ("/public/./../admin/", Path("/admin/")),
        ("/public/x/../../admin/x", Path("/admin/x")),
        ("/%61dmin/x", Path("/admin/x")),
        ("/%41DMIN/x", Path("/ADMIN/x")),
        ("/ADMIN/x", Path("/ADMIN/x")),
        ("/Admin/x", Path("/Admin/x")),
        ("/public/%252e%252e/admin", Path("/public/%252e%252e/admin")),
        (
            "/public/%25%32%65%25%32%65/admin",
            Path("/public/%252e%252e/admin"),
        ),
        ("/admin?/public/x", Path("/admin")),
        ("/public/..%2fadmin", Refused(EncodedSlash)),
        ("/public%2f..%2fadmin", Refused(EncodedSlash)),
        ("/public/%2F../admin", Refused(EncodedSlash)),
        ("/public/..%5cadmin", Refused(EncodedBackslash)),
        ("/public/..%5Cadmin", Refused(EncodedBackslash)),
        ("/public\\..\\admin", Refused(Backslash)),
        ("/public/..\\admin", Refused(Backslash)),
        ("/admin;x=1/y", Refused(Semicolon)),
        ("/public/..;/admin", Refused(Semicolon)),
        ("/admin;/x", Refused(Semicolon)),
        ("/admin%3bx/y", Refused(EncodedSemicolon)),
        ("/admin%00/x", Refused(EncodedNul)),
        ("/admin\0/x", Refused(Nul)),
        ("/admin%0d%0a/x", Refused(EncodedControl(0x0d))),
        ("/admin\r\n/x", Refused(ControlCharacter(b'\r'))),
        ("/public/../../admin", Refused(AboveRoot)),
        ("/../admin/x", Refused(AboveRoot)),
        ("/public/%2e%2e/%2e%2e/admin", Refused(AboveRoot)),
        ("/admin#/public/x", Refused(Fragment)),
        ("/public/%", Refused(MalformedEscape)),
        ("/public/%2", Refused(MalformedEscape)),
        ("/public/%zz/../../admin", Refused(MalformedEscape)),
        ("admin/x", Refused(NotOriginForm)),
        ("http://evil/admin/x", Refused(NotOriginForm)),
        ("/\u{0430}dmin/x", Refused(NonAscii)),
    ]
}

#[test]
fn hostile_paths_normalize_or_are_refused() {
    let cases = hostile_cases();
    assert!(cases.len() >= 30);
    for (target, want) in cases {
        match (normalize_path(target), want) {
            (Ok(n), Want::Path(p)) => assert_eq!(n.path, p, "{target:?}"),
            (Err(e), Want::Refused(w)) => assert_eq!(e, w, "{target:?}"),
            (got, _) => panic!("{target:?}: unexpected {got:?}"),
        }
    }
}

const POLICIES: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: allow-public, namespace: shop }
spec:
  action: ALLOW
  rules: [{ to: [{ paths: ["/public/*"] }] }]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: deny-admin, namespace: shop }
spec:
  action: DENY
  rules: [{ to: [{ paths: ["/admin", "/admin/*"] }] }]
---
# Web may do anything but what the DENY forbids: only the DENY stands between it and /admin.
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: allow-web, namespace: shop }
spec:
  action: ALLOW
  rules: [{ from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }] }]
"#;

#[test]
fn hostile_paths_never_reach_admin_through_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), POLICIES).unwrap();
    let set = load_dir(dir.path()).unwrap();
    let snap = PolicySnapshot::compile(
        &set,
        &SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/api").unwrap(),
    );
    let web = SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web").unwrap();
    let other = SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/other").unwrap();
    let mut judged = 0;
    for (target, _) in hostile_cases() {
        let Ok(n) = normalize_path(target) else {
            continue; // refused with 400: never reaches the policy, never the app
        };
        let to_admin = n.path.to_ascii_lowercase().starts_with("/admin");
        for peer in [&web, &other] {
            let d = snap.evaluate(&AuthzRequest {
                peer,
                method: Some("GET"),
                path: Some(&n.path),
                port: 8080,
                headers: None,
            });
            assert!(
                !(to_admin && d.allowed),
                "{target:?} -> {:?} allowed for {peer}: {}",
                n.path,
                d.reason
            );
            judged += 1;
        }
    }
    assert!(judged > 0);
    // And the policies do what they say on benign paths.
    let judge = |peer: &SpiffeId, path: &str| {
        snap.evaluate(&AuthzRequest {
            peer,
            method: Some("GET"),
            path: Some(path),
            port: 8080,
            headers: None,
        })
        .allowed
    };
    assert!(judge(&other, "/public/x"));
    assert!(!judge(&other, "/private"));
    assert!(judge(&web, "/private"));
    assert!(!judge(&web, "/admin"));
    assert!(!judge(&web, "/admin/x"));
}

/// Random hostile inputs: normalization never panics, and whatever it accepts is canonical —
/// absolute, no empty/dot segments, no encoded separators, and stable (normalizing it again
/// changes nothing), so the path judged is exactly the path forwarded.
#[test]
fn normalization_is_total_and_its_output_canonical() {
    const ALPHABET: &[&str] = &[
        "/", "/", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%00", "%41", "%7e",
        "\\", ";", "a", "B", "admin", "?", "#", "%", "%g", "~", "-", "_", "%c0%af", "é", "\u{0}",
        "\t", " ",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut accepted = 0;
    for _ in 0..50_000 {
        let len = 1 + (next() % 12) as usize;
        let mut target = String::from("/");
        for _ in 0..len {
            target.push_str(ALPHABET[(next() % ALPHABET.len() as u64) as usize]);
        }
        let Ok(n) = crate::normalize_path(&target) else {
            continue;
        };
        accepted += 1;
        let p = &n.path;
        assert!(p.starts_with('/'), "{target:?} → {p:?}");
        assert!(!p.contains("//"), "{target:?} → {p:?}");
        for segment in p.split('/') {
            assert!(segment != "." && segment != "..", "{target:?} → {p:?}");
        }
        let lower = p.to_ascii_lowercase();
        for banned in ["%2f", "%5c", "%00", "\\", ";", "%2e"] {
            assert!(
                !lower.contains(banned),
                "{target:?} → {p:?} contains {banned}"
            );
        }
        let again = crate::normalize_path(&n.to_target()).expect("normalized output is accepted");
        assert_eq!(&again.path, p, "not idempotent for {target:?}");
    }
    assert!(
        accepted > 1000,
        "only {accepted} inputs accepted: the generator is too hostile to test the output"
    );
}
