//! Tool tests: path generalization table, suggest round trip through the real loader and
//! evaluator, diff on the shipped example policies, test-case outcome lines.

use std::path::Path;

use meshgate_spiffe::SpiffeId;

use crate::diff::{diff_flows, diff_sets};
use crate::flows::ObservedFlow;
use crate::suggest::{SuggestOptions, generalize_paths, suggest, to_yaml};
use crate::test_cases::{parse_cases, run_cases};
use meshgate_policy::authz::{AuthzRequest, DecisionKind, PolicySnapshot};
use meshgate_policy::load::{PolicySet, load_dir};

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://mesh.local/ns/shop/sa/orders";

fn examples() -> PolicySet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    load_dir(&dir).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

#[test]
fn path_generalization_table() {
    // (observed paths, suggested patterns)
    let cases: &[(&[&str], &[&str])] = &[
        (&["/orders/1"], &["/orders/1"]),
        (&["/orders/1", "/orders/2"], &["/orders/*"]),
        (&["/orders/1", "/orders/1"], &["/orders/1"]),
        (
            &["/orders", "/orders/1", "/orders/2"],
            &["/orders", "/orders/*"],
        ),
        // Never `/*`: distinct top-level paths stay exact.
        (&["/a", "/b"], &["/a", "/b"]),
        (&["/"], &["/"]),
        (&["/", "/a"], &["/", "/a"]),
        // A single branch is followed down to where it forks.
        (
            &["/api/v1/users/1", "/api/v1/users/2"],
            &["/api/v1/users/*"],
        ),
        (&["/api/v1/x", "/api/v2/y"], &["/api/*"]),
        (&["/a/b", "/a/b/c"], &["/a/b", "/a/b/c"]),
        (&["/a/b/c", "/a/b/d", "/a/b"], &["/a/b", "/a/b/*"]),
        // A trailing slash is a segment of its own (`/a/*` matches `/a/`).
        (&["/a/"], &["/a/"]),
        (&["/a/", "/a/x"], &["/a/*"]),
        (&["/x.json", "/y.json"], &["/x.json", "/y.json"]),
        (&[], &[]),
    ];
    for (observed, want) in cases {
        let got = generalize_paths(observed.iter().copied());
        assert_eq!(got, *want, "{observed:?}");
    }
}

fn flow(workload: &str, peer: &str, method: &str, path: &str, d: DecisionKind) -> ObservedFlow {
    ObservedFlow {
        count: 1,
        pattern: false,
        workload: id(workload),
        peer: id(peer),
        method: method.to_string(),
        path: path.to_string(),
        decision: d,
    }
}

#[test]
fn suggested_policies_load_and_allow_every_learned_flow() {
    use DecisionKind::*;
    let pay = "spiffe://mesh.local/ns/shop/sa/payments";
    let flows = vec![
        flow(ORDERS, WEB, "GET", "/orders/1", Allow),
        flow(ORDERS, WEB, "GET", "/orders/2", DryRunDeny),
        flow(ORDERS, WEB, "HEAD", "/orders/2", Audit),
        flow(ORDERS, WEB, "GET", "/orders", Allow),
        flow(ORDERS, pay, "POST", "/orders/1/paid", Allow),
        flow(pay, ORDERS, "POST", "/charge", Allow),
        flow(pay, ORDERS, "POST", "/charge", Allow),
        flow(pay, WEB, "DELETE", "/charge", Deny),
    ];
    let s = suggest(&flows, SuggestOptions::default());
    assert_eq!((s.learned, s.denied, s.below_min_count), (6, 1, 0));
    assert!(s.unusable.is_empty());
    let yaml = to_yaml(&s.policies).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("observed.yaml"), &yaml).unwrap();
    let set = load_dir(tmp.path()).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(set.policies.len(), 2, "{yaml}");
    for f in flows.iter().filter(|f| f.decision != Deny) {
        let snap = PolicySnapshot::compile(&set, &f.workload);
        let d = snap.evaluate(&AuthzRequest {
            peer: &f.peer,
            method: Some(&f.method),
            path: Some(&f.path),
            port: 8080,
            headers: None,
        });
        assert!(d.allowed, "{f:?} not allowed: {}\n{yaml}", d.reason);
    }
    // Least privilege: the denied flow and unseen callers/methods stay denied.
    let snap = PolicySnapshot::compile(&set, &id(pay));
    for (peer, method) in [(WEB, "DELETE"), (ORDERS, "GET"), (WEB, "POST")] {
        let d = snap.evaluate(&AuthzRequest {
            peer: &id(peer),
            method: Some(method),
            path: Some("/charge"),
            port: 8080,
            headers: None,
        });
        assert!(!d.allowed, "{peer} {method}");
    }
    // Deterministic output.
    assert_eq!(
        to_yaml(&suggest(&flows, SuggestOptions::default()).policies).unwrap(),
        yaml
    );
}

#[test]
fn min_count_drops_rare_flows() {
    let flows = vec![
        flow(ORDERS, WEB, "GET", "/a", DecisionKind::Allow),
        flow(ORDERS, WEB, "GET", "/a", DecisionKind::Allow),
        flow(ORDERS, WEB, "GET", "/b", DecisionKind::Allow),
    ];
    let s = suggest(
        &flows,
        SuggestOptions {
            min_count: 2,
            include_denied: false,
        },
    );
    assert_eq!((s.learned, s.below_min_count), (1, 1));
    assert_eq!(
        s.policies[0].spec.rules[0].to[0].paths,
        vec!["/a".to_string()]
    );
}

#[test]
fn diff_of_identical_sets_is_empty_and_a_removed_rule_shows() {
    let old = examples();
    let (classes, changes) = diff_sets(&old, &old);
    assert!(classes > 0);
    assert!(changes.is_empty(), "{changes:?}");

    let mut new = old.clone();
    new.policies.retain(|p| p.metadata.name != "orders-readers");
    new.update_version();
    let (_, changes) = diff_sets(&old, &new);
    let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
    let want = format!(
        "ALLOW→DENY from={WEB} to={ORDERS} method=GET path=/orders/x  \
         (old: shop/orders-readers rule 0, new: mesh default: deny)"
    );
    assert!(lines.contains(&want), "{lines:#?}");
    assert!(changes.iter().all(|c| c.old.allowed && !c.new.allowed));

    let flows = vec![
        flow(ORDERS, WEB, "GET", "/orders/1", DecisionKind::Allow),
        flow(ORDERS, WEB, "GET", "/orders/1", DecisionKind::Allow),
        flow(ORDERS, WEB, "GET", "/admin", DecisionKind::Deny),
    ];
    let fd = diff_flows(&old, &new, &flows, 8080);
    assert_eq!(fd.distinct, 2);
    assert_eq!(fd.newly_denied.len(), 1);
    assert_eq!(fd.newly_denied[0].1, 2);
    assert!(fd.newly_allowed.is_empty());
}

#[test]
fn test_case_lines() {
    let cases = parse_cases(&format!(
        r#"
cases:
  - {{ name: reads, from: "{WEB}", to: "{ORDERS}", method: GET, path: /orders/./1, expect: allow, policy: shop/orders-readers, rule: 0 }}
  - {{ name: admin, from: "{WEB}", to: "{ORDERS}", method: GET, path: /ADMIN, expect: allow }}
  - {{ name: encoded slash, from: "{WEB}", to: "{ORDERS}", method: GET, path: /orders%2f1, expect: deny }}
  - {{ name: wrong rule, from: "{WEB}", to: "{ORDERS}", method: GET, path: /orders, expect: allow, rule: 1 }}
"#
    ))
    .unwrap();
    let results = run_cases(&examples(), &cases).unwrap();
    let lines: Vec<String> = results.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "PASS reads",
            "FAIL admin: expected allow, got deny (policy shop/orders-internal rule 0): \
             denied by DENY policy shop/orders-internal rule 0",
            "PASS encoded slash",
            "FAIL wrong rule: expected allow (rule 1), got allow (policy shop/orders-readers \
             rule 0): allowed by ALLOW policy shop/orders-readers rule 0",
        ]
    );
}

#[test]
fn invalid_cases_are_refused() {
    let bad = [
        "cases: [{ name: x, from: a, to: b, method: GET, path: /, expect: allow }]",
        "cases: [{ name: x, from: a, to: b, method: GET, path: /, expect: maybe }]",
        "cases: [{ name: x, from: a, to: b, method: GET, path: /, expect: allow, typo: 1 }]",
    ];
    let set = examples();
    for text in bad {
        let refused = parse_cases(text).map(|c| run_cases(&set, &c).is_err());
        assert!(!matches!(refused, Ok(false)), "{text}");
    }
}
