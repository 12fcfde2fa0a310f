//! `meshgate policy …` as an operator or CI runs it: the real binary on the fixtures in
//! `tests/fixtures/policy/`, run from that directory so printed paths are stable.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use meshgate_ca::SpiffeId;
use meshgate_policy::{AuthzRequest, DecisionKind, PolicySnapshot, load_dir};
use meshgate_policy_tools::flows::read_flows;

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
const ORDERS: &str = "spiffe://mesh.local/ns/shop/sa/orders";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/policy")
}

/// Runs `meshgate policy ARGS` in the fixtures directory.
fn policy(args: &[&str]) -> Output {
    Command::new(crate::support::meshgate_bin())
        .arg("policy")
        .args(args)
        .current_dir(fixtures())
        .output()
        .expect("run meshgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn version_of(dir: &str) -> String {
    load_dir(&fixtures().join(dir)).unwrap().version
}

#[test]
fn check_valid_and_invalid() {
    let ok = policy(&["check", "valid"]);
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    assert_eq!(
        stdout(&ok).lines().next().unwrap(),
        format!(
            "ok: 4 policies, 1 services, 0 network policies, version {}",
            version_of("valid")
        )
    );

    let bad = policy(&["check", "invalid"]);
    assert_eq!(code(&bad), 1);
    assert_eq!(stdout(&bad), "");
    assert_eq!(
        stderr(&bad).lines().collect::<Vec<_>>(),
        [
            "invalid/bad.yaml:9: path pattern \"orders/*\" must start with '/' (or be '*' or '*suffix')",
            "invalid/bad.yaml:17: unknown field `notPath`, expected one of methods, notMethods, \
             paths, notPaths, ports, notPorts",
        ]
    );

    let missing = policy(&["check", "no-such-dir"]);
    assert_eq!(code(&missing), 1);
    assert!(
        stderr(&missing).starts_with("no-such-dir: policy directory does not exist; create it"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn test_passing_and_failing_cases() {
    let pass = policy(&["test", "valid", "cases-pass.yaml"]);
    assert_eq!(code(&pass), 0, "{}{}", stdout(&pass), stderr(&pass));
    let out = stdout(&pass);
    assert!(out.contains("PASS encoded slash is a bad path\n"), "{out}");
    assert!(out.ends_with("6 passed, 0 failed\n"), "{out}");

    let fail = policy(&["test", "valid", "cases-fail.yaml"]);
    assert_eq!(code(&fail), 1);
    assert_eq!(
        stdout(&fail),
        "PASS web reads orders\n\
         FAIL web deletes orders: expected allow (policy shop/orders-readers rule 0), got deny \
         (no policy): no ALLOW policy matched\n\
         1 passed, 1 failed\n"
    );

    // A cases file with an unknown field or a bad ID is an error, not a test failure.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "cases: [{ name: x, from: web, to: orders, method: GET, path: /, expect: allow }]",
    )
    .unwrap();
    let invalid = policy(&["test", "valid", bad.to_str().unwrap()]);
    assert_eq!(code(&invalid), 1);
    assert!(
        stderr(&invalid).contains("case \"x\": from \"web\" is not a SPIFFE ID"),
        "{}",
        stderr(&invalid)
    );
}

#[test]
fn explain_allow_and_deny() {
    let allow = policy(&[
        "explain",
        "valid",
        "--from",
        WEB,
        "--to",
        ORDERS,
        "--method",
        "GET",
        "--path",
        "/orders/./1",
    ]);
    assert_eq!(code(&allow), 0, "{}", stderr(&allow));
    let out = stdout(&allow);
    for line in [
        "path: /orders/./1".to_string(),
        "normalized path: /orders/1".to_string(),
        "decision: allow".to_string(),
        "policy: shop/orders-readers rule 0 (ALLOW, enforce)".to_string(),
        format!("  from: [{{\"principals\":[\"{WEB}\"]}}]"),
        "  to: [{\"methods\":[\"GET\",\"HEAD\"],\"paths\":[\"/orders\",\"/orders/*\"]}]"
            .to_string(),
        format!("version: {}", version_of("valid")),
        "reason: allowed by ALLOW policy shop/orders-readers rule 0".to_string(),
        "audit: none".to_string(),
        "dry-run: none".to_string(),
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }

    let deny = policy(&[
        "explain",
        "valid",
        "--from",
        WEB,
        "--to",
        ORDERS,
        "--method",
        "GET",
        "--path",
        "//Admin/x",
        "--header",
        "x-tenant=acme",
    ]);
    assert_eq!(
        code(&deny),
        0,
        "an explanation succeeds whatever the decision"
    );
    let out = stdout(&deny);
    for line in [
        "normalized path: /Admin/x",
        "decision: deny",
        "policy: shop/orders-internal rule 0 (DENY, enforce)",
        "reason: denied by DENY policy shop/orders-internal rule 0",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }

    let bad_path = policy(&[
        "explain",
        "valid",
        "--from",
        WEB,
        "--to",
        ORDERS,
        "--method",
        "GET",
        "--path",
        "/orders%2F1",
    ]);
    assert_eq!(code(&bad_path), 0);
    let out = stdout(&bad_path);
    assert!(out.contains("\ndecision: bad-request\n"), "{out}");
    assert!(out.contains("\npolicy: none\n"), "{out}");
    assert!(out.contains("\nreason: bad path: "), "{out}");

    let invalid = policy(&[
        "explain", "valid", "--from", "web", "--to", ORDERS, "--method", "GET", "--path", "/",
    ]);
    assert_eq!(code(&invalid), 1);
}

#[test]
fn diff_detects_a_narrowed_rule_and_nothing_else() {
    let same = policy(&["diff", "valid", "valid"]);
    assert_eq!(code(&same), 0, "{}{}", stdout(&same), stderr(&same));
    assert!(stdout(&same).starts_with("0 of "), "{}", stdout(&same));

    let changed = policy(&["diff", "valid", "changed"]);
    assert_eq!(code(&changed), 2, "{}", stderr(&changed));
    let out = stdout(&changed);
    let want = format!(
        "ALLOW→DENY from={WEB} to={ORDERS} method=GET path=/orders/x  \
         (old: shop/orders-readers rule 0, new: no ALLOW policy matched)"
    );
    assert!(out.lines().any(|l| l == want), "missing {want:?} in\n{out}");
    // `/orders` itself is still allowed: only the `/orders/*` classes change.
    assert!(!out.contains("path=/orders "), "{out}");
    assert!(out.contains("\n6 of "), "{out}");

    let err = policy(&["diff", "valid", "invalid"]);
    assert_eq!(code(&err), 1);
}

#[test]
fn diff_replays_observed_flows() {
    let out = policy(&["diff", "valid", "changed", "--flows", "flows.jsonl"]);
    assert_eq!(code(&out), 2);
    let text = stdout(&out);
    assert!(
        text.contains(
            "observed flows: 7 requests, 6 distinct; would start being denied: 3 (4 requests); \
             would start being allowed: 0 (0 requests)\n"
        ),
        "{text}"
    );
    let want = format!(
        "newly denied (2 requests): ALLOW→DENY from={WEB} to={ORDERS} method=GET \
         path=/orders/1  (old: shop/orders-readers rule 0, new: no ALLOW policy matched)"
    );
    assert!(
        text.lines().any(|l| l == want),
        "missing {want:?} in\n{text}"
    );
    assert_eq!(
        stderr(&out),
        "flows.jsonl: 7 decision lines used; skipped 1 malformed, 0 incomplete, 1 L4, 0 bad requests\n"
    );

    // The reverse change allows them again.
    let back = policy(&["diff", "changed", "valid", "--flows", "flows.jsonl"]);
    assert_eq!(code(&back), 2);
    assert!(
        stdout(&back).contains("would start being allowed: 3 (4 requests)"),
        "{}",
        stdout(&back)
    );
}

#[test]
fn suggest_round_trip_allows_every_observed_flow() {
    let out = policy(&["suggest", "--from", "flows.jsonl"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let yaml = stdout(&out);
    assert!(yaml.contains("name: orders-observed"), "{yaml}");
    assert!(
        yaml.contains("      - /orders\n      - /orders/*\n"),
        "{yaml}"
    );

    // Deterministic.
    assert_eq!(stdout(&policy(&["suggest", "--from", "flows.jsonl"])), yaml);

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("observed.yaml"), &yaml).unwrap();
    let check = policy(&["check", tmp.path().to_str().unwrap()]);
    assert_eq!(code(&check), 0, "{}\n{yaml}", stderr(&check));
    assert!(
        stdout(&check).starts_with("ok: 2 policies,"),
        "{}",
        stdout(&check)
    );

    let set = load_dir(tmp.path()).unwrap();
    let log = read_flows(&fixtures().join("flows.jsonl")).unwrap();
    let learned: Vec<_> = log
        .flows
        .iter()
        .filter(|f| f.decision != DecisionKind::Deny)
        .collect();
    assert_eq!(learned.len(), 6);
    for f in learned {
        let snap = PolicySnapshot::compile(&set, &f.workload);
        let d = snap.evaluate(&AuthzRequest {
            peer: &f.peer,
            method: Some(&f.method),
            path: Some(&f.path),
            port: 8080,
            headers: None,
        });
        assert!(d.allowed, "{f:?}: {}\n{yaml}", d.reason);
    }
    // The denied flow was not learned.
    let orders = SpiffeId::parse(ORDERS).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let d = PolicySnapshot::compile(&set, &orders).evaluate(&AuthzRequest {
        peer: &web,
        method: Some("GET"),
        path: Some("/admin"),
        port: 8080,
        headers: None,
    });
    assert!(!d.allowed);

    // --min-count 2 keeps only the flow seen twice.
    let rare = policy(&["suggest", "--from", "flows.jsonl", "--min-count", "2"]);
    assert_eq!(code(&rare), 0);
    let yaml = stdout(&rare);
    assert!(yaml.contains("      - /orders/1\n"), "{yaml}");
    assert!(!yaml.contains("payments-observed"), "{yaml}");
}

/// `explain` and `test` judge L4 (TCP) connections too (no method, no path), and explaining an
/// HTTP request on a port a Service declares `protocol: tcp` says L7 rules do not apply there.
#[test]
fn explain_and_test_handle_l4_connections() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("db.yaml"),
        r#"apiVersion: meshgate.dev/v1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  identity: spiffe://mesh.local/ns/shop/sa/db
  hosts: [db]
  ports: [{ port: 5432, protocol: tcp }]
  endpoints: ["127.0.0.1:5432"]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: db-clients, namespace: shop }
spec:
  selector: { account: db }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/orders"] }]
      to: [{ ports: [5432] }]
"#,
    )
    .unwrap();
    let db = "spiffe://mesh.local/ns/shop/sa/db";
    let explain = |from: &str, extra: &[&str]| {
        let mut args = vec![
            "explain",
            policies.to_str().unwrap(),
            "--from",
            from,
            "--to",
            db,
        ];
        args.extend_from_slice(extra);
        policy(&args)
    };
    let ok = explain(ORDERS, &["--port", "5432"]);
    assert_eq!(code(&ok), 0, "{}", stderr(&ok));
    let out = stdout(&ok);
    assert!(
        out.contains("request: TCP connection (L4) to port 5432"),
        "{out}"
    );
    assert!(out.lines().any(|l| l == "decision: allow"), "{out}");
    assert!(!out.contains("normalized path"), "{out}");
    let denied = stdout(&explain(WEB, &["--port", "5432"]));
    assert!(denied.lines().any(|l| l == "decision: deny"), "{denied}");
    let http = stdout(&explain(
        ORDERS,
        &["--port", "5432", "--method", "GET", "--path", "/"],
    ));
    assert!(
        http.contains("note: Service shop/db declares port 5432 `protocol: tcp`"),
        "{http}"
    );
    // Half an HTTP request is refused with the fix.
    let half = explain(ORDERS, &["--port", "5432", "--method", "GET"]);
    assert_eq!(code(&half), 2, "{}", stderr(&half));
    assert!(stderr(&half).contains("--path"), "{}", stderr(&half));

    let cases = dir.path().join("cases.yaml");
    std::fs::write(
        &cases,
        format!(
            "cases:\n  - {{ name: orders reaches the db, from: \"{ORDERS}\", to: \"{db}\", port: 5432, expect: allow, policy: shop/db-clients, rule: 0 }}\n  - {{ name: web does not, from: \"{WEB}\", to: \"{db}\", port: 5432, expect: deny }}\n"
        ),
    )
    .unwrap();
    let ran = policy(&["test", policies.to_str().unwrap(), cases.to_str().unwrap()]);
    assert_eq!(code(&ran), 0, "{}{}", stdout(&ran), stderr(&ran));
}

/// `suggest` reads `docker-compose logs` and `kubectl logs --prefix` output as it comes (a
/// collector prefix before each JSON line), and never exits 0 having read no decision.
#[test]
fn suggest_reads_collector_logs_and_refuses_input_without_decisions() {
    let plain = std::fs::read_to_string(fixtures().join("flows.jsonl")).unwrap();
    let want = stdout(&policy(&["suggest", "--from", "flows.jsonl"]));
    let tmp = tempfile::tempdir().unwrap();
    for (name, prefix) in [
        ("compose.log", "orders-proxy_1  | "),
        ("kubectl.log", "[pod/orders-7d9/meshgate-proxy] "),
    ] {
        let prefixed: String = plain.lines().map(|l| format!("{prefix}{l}\n")).collect();
        let file = tmp.path().join(name);
        std::fs::write(&file, prefixed).unwrap();
        let out = policy(&["suggest", "--from", file.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{name}: {}", stderr(&out));
        assert_eq!(stdout(&out), want, "{name}");
    }
    let text_log = tmp.path().join("text.log");
    std::fs::write(
        &text_log,
        "2026-12-01T10:00:00Z  INFO meshgate_proxy::inbound::authz: event=\"authz.decision\" decision=allow\n",
    )
    .unwrap();
    let out = policy(&["suggest", "--from", text_log.to_str().unwrap()]);
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(
        stderr(&out).contains("no decision found"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("MESHGATE_LOG_FORMAT=json"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
}

/// `check` warns (exit 0) about rules that load but cannot do what they look like: principals
/// in another trust domain or naming no workload, and a DENY with only HTTP conditions that
/// would also deny a workload's TCP ports; `explain` notes a `--to` nothing knows.
#[test]
fn check_warns_about_rules_that_cannot_do_what_they_look_like() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        r#"apiVersion: meshgate.dev/v1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  identity: spiffe://mesh.local/ns/shop/sa/db
  hosts: [db]
  ports: [{ port: 8080, protocol: http }, { port: 5432, protocol: tcp }]
  endpoints: ["127.0.0.1:15006"]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: no-debug, namespace: shop }
spec:
  selector: { account: db }
  action: DENY
  rules:
    - to: [{ paths: ["/debug/*"] }]
    - from: [{ principals: ["spiffe://other.td/ns/shop/sa/web", "spiffe://mesh.local/web"] }]
"#,
    )
    .unwrap();
    let out = policy(&["check", dir.path().to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let warned = stderr(&out);
    for expected in [
        "warning: policy shop/no-debug rule 0: this DENY rule has method/path/header conditions and no `ports`",
        "warning: policy shop/no-debug rule 1: principal \"spiffe://other.td/ns/shop/sa/web\" is in trust domain \"other.td\"",
        "warning: policy shop/no-debug rule 1: principal \"spiffe://mesh.local/web\" names no workload",
    ] {
        assert!(
            warned.contains(expected),
            "missing {expected:?} in\n{warned}"
        );
    }
    assert_eq!(warned.lines().count(), 3, "{warned}");
    // The shipped fixtures draw no warning.
    assert!(stderr(&policy(&["check", "valid"])).is_empty());

    let typo = policy(&[
        "explain",
        "valid",
        "--from",
        WEB,
        "--to",
        "spiffe://mesh.local/ns/shop/sa/ordres",
        "--method",
        "GET",
        "--path",
        "/",
    ]);
    assert!(
        stdout(&typo).contains("note: no policy selects this workload and no Service declares it"),
        "{}",
        stdout(&typo)
    );
    let known = policy(&[
        "explain", "valid", "--from", WEB, "--to", ORDERS, "--method", "GET", "--path", "/",
    ]);
    assert!(
        !stdout(&known).contains("note: no policy selects"),
        "{}",
        stdout(&known)
    );
}

/// An error names its cause once ("… (os error 2)", not "… (os error 2): … (os error 2)").
#[test]
fn errors_do_not_repeat_their_cause() {
    let out = policy(&["test", "valid", "no-such-cases.yaml"]);
    assert_eq!(code(&out), 1);
    let said = stderr(&out);
    assert!(said.contains("cannot read no-such-cases.yaml"), "{said}");
    assert_eq!(said.matches("(os error 2)").count(), 1, "{said}");
}
