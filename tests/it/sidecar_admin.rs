//! The sidecar's admin endpoint and policy lifecycle: not ready without a valid policy, an invalid
//! update refused with file:line while the last good policy keeps enforcing, `POST /shutdown`,
//! and `SIGHUP` reloading a real `meshgate proxy` process at once.

use std::process::Command;
use std::time::Duration;

use crate::support::mesh::{TestMesh, admin};
use crate::support::*;

fn allow(path: &str) -> String {
    format!(
        r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: readers, namespace: shop }}
spec:
  selector: {{ account: orders }}
  action: ALLOW
  rules:
    - from: [{{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }}]
      to: [{{ paths: ["{path}"] }}]
"#
    )
}

const INVALID: &str = r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: broken, namespace: shop }
spec:
  action: ALLOW
  rules:
    - to: [{ paths: ["no-leading-slash"] }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_invalid_updates_and_shutdown() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("broken.yaml", INVALID);
    mesh.add("orders").await;
    mesh.add("web").await;
    mesh.write_services();
    let orders_admin = mesh.workload("orders").sidecar.admin_addr;

    // An invalid policy from the start: not ready, and everything is denied (fail closed).
    let (status, body) = admin(orders_admin, "GET", "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("broken.yaml:7"),
        "the reason names file:line: {body}"
    );
    // web reads the same invalid directory, so it has no routes either: both sides fail closed.
    let status = mesh.call("web", "GET", "orders", "/a").await.status;
    assert!(matches!(status, 403 | 502), "{status}");
    let (status, body) = admin(orders_admin, "GET", "/live").await;
    assert_eq!((status, body.as_str()), (200, "live\n"));

    // Fixed: ready, enforcing.
    std::fs::remove_file(mesh.policy_dir.join("broken.yaml")).unwrap();
    mesh.write_policy("readers.yaml", &allow("/a"));
    let good = mesh.converge().await;
    assert_eq!(admin(orders_admin, "GET", "/ready").await.0, 200);
    assert_eq!(mesh.call("web", "GET", "orders", "/a").await.status, 200);
    let (_, identity) = admin(orders_admin, "GET", "/identity").await;
    let identity: serde_json::Value = serde_json::from_str(&identity).unwrap();
    assert_eq!(identity["id"], TestMesh::id_of("orders").as_str());
    assert!(identity["serial"].as_str().is_some_and(|s| s.len() == 32));
    let (_, config) = admin(orders_admin, "GET", "/config").await;
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["policy_version"], good.as_str());
    assert!(config["routes"].as_array().is_some_and(|r| r.len() == 2));

    // An invalid update is refused; the last good policy stays in force and the sidecar ready.
    let rejected_before = mesh
        .metric("orders", "meshgate_policy_rejected_total", &[])
        .await;
    mesh.write_policy("readers.yaml", &allow("/b").replace("ALLOW", "PERMIT"));
    for _ in 0..100 {
        if mesh
            .metric("orders", "meshgate_policy_rejected_total", &[])
            .await
            > rejected_before
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        mesh.metric("orders", "meshgate_policy_rejected_total", &[])
            .await
            > rejected_before
    );
    assert_eq!(
        mesh.call("web", "GET", "orders", "/a").await.status,
        200,
        "old rule still enforced"
    );
    assert_eq!(
        mesh.call("web", "GET", "orders", "/b").await.status,
        403,
        "new rule not applied"
    );
    assert_eq!(admin(orders_admin, "GET", "/ready").await.0, 200);
    let (_, config) = admin(orders_admin, "GET", "/config").await;
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["policy_version"], good.as_str());
    let rejected = config["last_rejected_update"].as_str().unwrap();
    assert!(rejected.contains("readers.yaml:"), "{rejected}");

    // POST /shutdown stops the sidecar.
    let (status, _) = admin(orders_admin, "POST", "/shutdown").await;
    assert_eq!(status, 202);
    let orders = mesh.workloads.remove("orders").unwrap();
    tokio::time::timeout(Duration::from_secs(5), orders.sidecar.wait())
        .await
        .expect("sidecar stopped after POST /shutdown");
    assert!(
        tokio::net::TcpStream::connect(orders_admin).await.is_err(),
        "admin port closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_at_once() {
    require_tool("curl");
    let ca = TestCa::init();
    let base = ca.tmp.path().to_path_buf();
    issue_files(
        &ca,
        "spiffe://mesh.local/ns/shop/sa/orders",
        &base.join("orders"),
    );
    let policies = base.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("p.yaml"), allow("/a")).unwrap();
    let proxy = ProxyProcess::spawn(
        &base.join("orders"),
        &policies,
        "127.0.0.1:9",
        &["--poll-interval", "1h"],
    );
    let admin_port = proxy.admin;
    let version = || {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{admin_port}/config")])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .map(|c| c["policy_version"].as_str().unwrap().to_string())
    };
    let mut first = None;
    for _ in 0..100 {
        first = version();
        if first.as_deref().is_some_and(|v| v != "none") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.expect("sidecar answers /config");
    std::fs::write(policies.join("p.yaml"), allow("/b")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        version().unwrap(),
        first,
        "with a 1 h poll interval nothing changes by itself"
    );
    proxy.signal("HUP");
    let mut reloaded = false;
    for _ in 0..50 {
        if version().is_some_and(|v| v != first) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "SIGHUP reloads the policy directory at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_command_reports_readiness() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("broken.yaml", INVALID);
    mesh.add("orders").await;
    let ready = format!(
        "http://{}/ready",
        mesh.workload("orders").sidecar.admin_addr
    );
    let mut cmd = meshgate();
    cmd.args(["health", &ready]);
    let out = run_async(cmd).await;
    assert!(
        !out.status.success(),
        "not ready while the policy is invalid: {}",
        text(&out)
    );
    assert!(text(&out).contains("503"), "{}", text(&out));
    std::fs::remove_file(mesh.policy_dir.join("broken.yaml")).unwrap();
    mesh.write_policy("readers.yaml", &allow("/a"));
    mesh.converge().await;
    let mut cmd = meshgate();
    cmd.args(["health", &ready]);
    let out = run_async(cmd).await;
    assert!(out.status.success(), "{}", text(&out));
    let mut cmd = meshgate();
    cmd.args([
        "health",
        &format!("http://127.0.0.1:{}/ready", free_port()),
        "--timeout",
        "1s",
    ]);
    let out = run_async(cmd).await;
    assert!(
        !out.status.success() && text(&out).contains("unhealthy"),
        "{}",
        text(&out)
    );
}

/// `meshgate proxy` with static files refuses a key others can read (as every command that reads
/// a key does), and a key that is not the certificate's says so in terms of the files.
#[test]
fn static_identity_files_are_checked_and_errors_name_them() {
    let ca = TestCa::init();
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    issue_files(&ca, "spiffe://mesh.local/ns/shop/sa/orders", &a);
    issue_files(&ca, "spiffe://mesh.local/ns/shop/sa/other", &b);
    let policies = work.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let proxy = |cert: &std::path::Path, key: &std::path::Path| {
        let mut cmd = meshgate();
        cmd.args(["proxy", "--app", "127.0.0.1:9"])
            .arg("--svid-cert")
            .arg(cert)
            .arg("--svid-key")
            .arg(key)
            .arg("--trust-bundle")
            .arg(a.join("bundle.pem"))
            .arg("--policy-dir")
            .arg(&policies)
            .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0"]);
        let out = run(&mut cmd);
        assert!(!out.status.success(), "started: {}", text(&out));
        text(&out)
    };

    use std::os::unix::fs::PermissionsExt;
    let open_key = a.join("key.pem");
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let said = proxy(&a.join("svid.pem"), &open_key);
    assert!(
        said.contains("must not be readable by group or others"),
        "{said}"
    );
    assert!(
        said.contains(&format!("chmod 600 {}", open_key.display())),
        "{said}"
    );
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let said = proxy(&a.join("svid.pem"), &b.join("key.pem"));
    assert!(!said.contains("CA returned"), "{said}");
    assert!(
        said.contains(&format!(
            "{} must hold the private key of the first certificate in {}",
            b.join("key.pem").display(),
            a.join("svid.pem").display()
        )),
        "{said}"
    );
}
