//! 1 GiB up and 1 GiB down through a real `meshgate proxy` process with curl; the sidecar's
//! peak memory (VmHWM) must stay flat, proving bodies stream and are never buffered whole.

use std::process::Command;

use crate::support::mesh::EchoApp;
use crate::support::*;

const GIB: u64 = 1024 * 1024 * 1024;

const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: bulk, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ methods: ["PUT", "GET"], paths: ["/upload/*", "/download/*"] }]
"#;

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_with_flat_memory() {
    let _heavy = crate::support::heavy_async().await;
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
    std::fs::write(policies.join("bulk.yaml"), POLICY).unwrap();
    ca.write_client_cert("spiffe://mesh.local/ns/shop/sa/web", &base, "web");

    let app = EchoApp::start().await;
    let proxy = ProxyProcess::spawn(&base.join("orders"), &policies, &app.addr.to_string(), &[]);
    proxy.ready().await;
    let (pid, inbound) = (proxy.pid(), proxy.inbound);
    let idle_kib = peak_rss_kib(pid);

    let tls = format!(
        "-sS -k --cert {0}/web.pem --key {0}/web.key",
        base.display()
    );
    let upload = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(format!("head -c {GIB} /dev/zero | curl {tls} --fail-with-body -T - https://127.0.0.1:{inbound}/upload/big"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(upload.status.success(), "{}", text(&upload));
    let echoed: serde_json::Value = serde_json::from_slice(&upload.stdout).unwrap();
    assert_eq!(
        echoed["body_bytes"], GIB,
        "every byte of the upload reached the app"
    );

    let tls = format!(
        "-sS -k --cert {0}/web.pem --key {0}/web.key",
        base.display()
    );
    let download = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(format!("curl {tls} --fail -o /dev/null -w '%{{size_download}}' https://127.0.0.1:{inbound}/download/{GIB}"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(download.status.success(), "{}", text(&download));
    assert_eq!(String::from_utf8_lossy(&download.stdout), GIB.to_string());

    let peak_kib = peak_rss_kib(pid);
    eprintln!(
        "streaming: 1 GiB up + 1 GiB down; sidecar peak RSS {} MiB (idle {} MiB)",
        peak_kib / 1024,
        idle_kib / 1024
    );
    assert!(
        peak_kib < 128 * 1024,
        "sidecar peak RSS {peak_kib} KiB: bodies are being buffered"
    );

    // SIGTERM drains and exits cleanly.
    proxy.signal("TERM");
    let status = proxy.wait().await;
    assert!(
        status.success(),
        "sidecar exit status after SIGTERM: {status:?}"
    );
}
