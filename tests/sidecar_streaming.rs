//! 1 GiB up and 1 GiB down through a real `meshgate proxy` process with curl; the sidecar's
//! peak memory (VmHWM) must stay flat, proving bodies stream and are never buffered whole.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::mesh::EchoApp;
use support::*;

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

/// Kills the child on drop so a failed assertion never leaves a sidecar running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
    require_tool("curl");
    let ca = TestCa::init();
    let base = ca.tmp.path().to_path_buf();
    let issued = run(meshgate()
        .args([
            "ca",
            "issue",
            "--id",
            "spiffe://mesh.local/ns/shop/sa/orders",
            "--dir",
        ])
        .arg(&ca.dir)
        .arg("--out")
        .arg(base.join("orders")));
    assert!(issued.status.success(), "{}", text(&issued));
    let policies = base.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("bulk.yaml"), POLICY).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let web = ca.sign_leaf(
        &id("spiffe://mesh.local/ns/shop/sa/web"),
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    );
    write_chain(&base.join("web.pem"), &web.chain);
    std::fs::write(base.join("web.key"), web.key.serialize_pem()).unwrap();

    let app = EchoApp::start().await;
    let (inbound, admin) = (free_port(), free_port());
    let proxy = Running(
        meshgate()
            .args(["proxy", "--app", &app.addr.to_string()])
            .arg("--svid-cert")
            .arg(base.join("orders/svid.pem"))
            .arg("--svid-key")
            .arg(base.join("orders/key.pem"))
            .arg("--trust-bundle")
            .arg(base.join("orders/bundle.pem"))
            .arg("--policy-dir")
            .arg(&policies)
            .args(["--inbound", &format!("127.0.0.1:{inbound}")])
            .args(["--outbound", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .env("MESHGATE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = proxy.0.id();
    let ready = format!("http://127.0.0.1:{admin}/ready");
    let mut up = false;
    for _ in 0..100 {
        if Command::new("curl")
            .args(["-sf", &ready])
            .output()
            .unwrap()
            .status
            .success()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "sidecar did not become ready");
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
    let mut proxy = proxy;
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || {
        let status = proxy.0.wait().unwrap();
        std::mem::forget(proxy);
        status
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "sidecar exit status after SIGTERM: {status:?}"
    );
}
