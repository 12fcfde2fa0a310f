//! `meshgate demo`, README's "run it" command: the whole scripted scenario and its decisions, and
//! the clear failure when a port is taken.

use crate::support::*;

/// Runs `meshgate demo --once`, retrying on another port range if one happens to be busy.
fn demo_output() -> String {
    for attempt in 0..10 {
        // Below the kernel's ephemeral range (32768 and up by default), where other tests'
        // client sockets would otherwise take the demo's ports.
        let base = 20000 + (free_port() % 12000) / 100 * 100 + attempt;
        // Default log level: the parts' INFO lines go to the log file, not the terminal.
        let out = run(meshgate()
            .args(["demo", "--once", "--base-port", &base.to_string()])
            .env_remove("MESHGATE_LOG"));
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

/// One expected row of the decision table: who → whom, method, path as judged, decision, and
/// something the row must name (policy/rule or reason).
type ExpectedRow = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

fn assert_decision_rows(shown: &str, rows: &[ExpectedRow]) {
    for &(who, method, path, decision, mention) in rows {
        let line = row(shown, who, method, path);
        assert!(
            line.split_whitespace().nth(5) == Some(decision),
            "{who} {method} {path}: expected {decision}: {line}"
        );
        assert!(line.contains(mention), "{line} should mention {mention}");
    }
}

#[test]
fn demo_runs_the_scenario_and_prints_the_decisions() {
    let _heavy = crate::support::heavy();
    let shown = demo_output();
    // A quiet terminal: no log lines between the table's rows, not even at shutdown; the full
    // log is in a file the demo names and that still exists after it exited.
    for level in [" INFO ", " WARN ", " ERROR "] {
        assert!(
            !shown.contains(level),
            "log lines on the terminal:\n{shown}"
        );
    }
    // The console's URL, on a line that says so (the control plane's admin listener).
    let console = shown
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("console "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("the demo prints no console line:\n{shown}"));
    assert!(
        console.starts_with("http://127.0.0.1:") && console.ends_with("/console"),
        "{console}"
    );
    let log = shown
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("log "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("the demo names no log file:\n{shown}"));
    let logged = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{log}: {e}"));
    assert!(logged.contains("event=\"authz.decision\""), "{logged}");
    assert!(
        !logged
            .lines()
            .any(|l| l.contains("trace_id= ") || l.ends_with("trace_id=")),
        "empty trace_id in {log}"
    );
    let _ = std::fs::remove_file(log);
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
    assert_decision_rows(&shown, &cases);
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

/// Names of what the eBPF demo creates that still exist: netns, pins, cgroups.
fn ebpf_demo_leftovers() -> Vec<String> {
    let mut left = Vec::new();
    for dir in ["/run/netns", meshgate_ebpf::PIN_ROOT] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("mgdemo-") || name.starts_with("mgdemo_") {
                    left.push(format!("{dir}/{name}"));
                }
            }
        }
    }
    for m in meshgate_ebpf::preflight().cgroup2_mounts {
        if m.join("mgdemo").exists() {
            left.push(m.join("mgdemo").display().to_string());
        }
    }
    left
}

/// `meshgate demo --with-ebpf --once`: the workloads run in network namespaces with the eBPF
/// redirect on their app cgroups and call each other by plain URL. The scripted decisions appear
/// (from the sidecars' logs), the eBPF counters prove the apps' connections were redirected into
/// their sidecars (the ingress guard would drop any direct connection to an app port), and
/// nothing is left behind.
#[test]
fn demo_with_ebpf_redirects_the_apps_and_cleans_up() {
    let _heavy = crate::support::heavy();
    let pre = meshgate_ebpf::preflight();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return crate::support::privileged::EBPF.skip_or_fail("`demo --with-ebpf` needs root");
    }
    if let Some(problem) = pre.problem() {
        return crate::support::privileged::EBPF.skip_or_fail(&problem.to_string());
    }
    if !std::process::Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return crate::support::privileged::EBPF
            .skip_or_fail("`ip` not found (apt-get install iproute2)");
    }
    let started = std::time::Instant::now();
    let out = run(meshgate()
        .args(["demo", "--with-ebpf", "--once"])
        .env("MESHGATE_LOG", "warn"));
    let elapsed = started.elapsed();
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    let cases: [ExpectedRow; 6] = [
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
            "web → payments",
            "POST",
            "/charge",
            "deny",
            "no ALLOW policy matched",
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
    ];
    assert_decision_rows(&shown, &cases);
    // The apps named no proxy: plain URLs.
    assert!(
        shown.contains("↳ web GET http://orders:8080/orders/42 → HTTP 200"),
        "{shown}"
    );
    assert!(
        shown.contains("↳ web POST http://payments:8080/charge → HTTP 403"),
        "{shown}"
    );
    // Every scripted call (8 from web) and the checkout's call to payments went through the
    // redirect, and each sidecar got the original destination from the eBPF getsockopt.
    let counters = |w: &str| -> (u64, u64) {
        let line = shown
            .lines()
            .find(|l| l.trim_start().starts_with(w) && l.contains("redirected"))
            .unwrap_or_else(|| panic!("no eBPF counters for {w}:\n{shown}"));
        let num = |k: &str| -> u64 {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let i = cols.iter().position(|c| *c == k).expect(k);
            cols[i + 1].parse().expect(k)
        };
        (num("redirected"), num("origdst_hit"))
    };
    assert_eq!(counters("web"), (8, 8), "{shown}");
    assert_eq!(counters("orders"), (1, 1), "{shown}");
    assert!(shown.contains("stopped. removed everything"), "{shown}");
    let left = ebpf_demo_leftovers();
    assert!(left.is_empty(), "left behind: {left:?}\n{shown}");
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!(
            "demo --with-ebpf figures: whole run {:.1} s\n",
            elapsed.as_secs_f64()
        ),
    );
}
