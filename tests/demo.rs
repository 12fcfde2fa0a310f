//! `meshgate demo`, README's "run it" command: the whole scripted scenario and its decisions, and
//! the clear failure when a port is taken.

mod support;

use support::*;

/// Runs `meshgate demo --once`, retrying on another port range if one happens to be busy.
fn demo_output() -> String {
    for attempt in 0..5 {
        let base = 20000 + (free_port() % 20000) / 100 * 100 + attempt;
        let out = run(meshgate()
            .args(["demo", "--once", "--base-port", &base.to_string()])
            .env("MESHGATE_LOG", "warn"));
        let shown = text(&out);
        if shown.contains("is taken") {
            continue;
        }
        assert!(out.status.success(), "{shown}");
        return shown;
    }
    panic!("no free port range for the demo");
}

fn row<'a>(shown: &'a str, who: &str, method: &str, path: &str) -> &'a str {
    shown
        .lines()
        .find(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 5
                && format!("{} {} {}", cols[0], cols[1], cols[2]) == who
                && cols[3] == method
                && cols[4] == path
        })
        .unwrap_or_else(|| panic!("no decision row for {who} {method} {path}:\n{shown}"))
}

#[test]
fn demo_runs_the_scenario_and_prints_the_decisions() {
    let shown = demo_output();
    let cases = [
        (
            "web → orders",
            "GET",
            "/orders/42",
            "allow",
            "shop/orders-readers #0",
        ),
        (
            "orders → payments",
            "POST",
            "/charge",
            "allow",
            "shop/payments-chargers #0",
        ),
        (
            "web → orders",
            "POST",
            "/orders/42",
            "deny",
            "no ALLOW policy matched",
        ),
        (
            "web → orders",
            "GET",
            "/orders/internal/stats",
            "deny",
            "shop/orders-internal #0",
        ),
        (
            "web → orders",
            "GET",
            "/admin",
            "deny",
            "shop/orders-internal #0",
        ),
        (
            "web → orders",
            "GET",
            "/orders/..%2fadmin",
            "bad-request",
            "encoded '/'",
        ),
        (
            "web → orders",
            "GET",
            "/orders/export",
            "dry-run-deny",
            "shop/orders-readers #0",
        ),
    ];
    for (who, method, path, decision, mention) in cases {
        let line = row(&shown, who, method, path);
        assert!(
            line.split_whitespace().nth(5) == Some(decision),
            "{who} {method} {path}: expected {decision}: {line}"
        );
        assert!(line.contains(mention), "{line} should mention {mention}");
    }
    // web may not call payments: payments' sidecar denies it by identity, and says so.
    assert!(shown.contains("↳ web POST /charge → HTTP 403"), "{shown}");
    let denied = row(&shown, "web → payments", "POST", "/charge");
    assert!(denied.contains("deny"), "{denied}");
    assert!(shown.contains("meshgate policy explain"), "{shown}");
    assert!(shown.contains("meshgate status --control-plane"), "{shown}");
    assert!(shown.contains("stopped."), "clean shutdown: {shown}");
}

#[test]
fn demo_names_a_taken_port_and_the_flag() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = run(meshgate().args(["demo", "--once", "--base-port", &port.to_string()]));
    assert!(!out.status.success());
    let shown = text(&out);
    assert!(
        shown.contains(&format!("port {port}")) && shown.contains("--base-port"),
        "{shown}"
    );
}
