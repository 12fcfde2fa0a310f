//! The sidecar binary on one worker thread (`--worker-threads 1`, what a sidecar limited to one
//! CPU gets by default): tokio's current-thread scheduler must still serve requests side by
//! side. A request waiting on a slow app must not hold up the others, denials still come from
//! the sidecar, and SIGTERM still ends it within its drain.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

use crate::support::*;

const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: api, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ methods: ["GET"], paths: ["/api/*"] }]
"#;

/// An app that answers `/api/slow` after `delay` and everything else at once; `slow_arrived`
/// fires when a slow request reached it.
async fn app(delay: Duration, slow_arrived: Arc<tokio::sync::Notify>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let slow_arrived = slow_arrived.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let slow_arrived = slow_arrived.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        if path == "/api/slow" {
                            slow_arrived.notify_one();
                            tokio::time::sleep(delay).await;
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(format!("app saw {path}")),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// curl with web's certificate: (status, body).
fn curl(base: &std::path::Path, inbound: u16, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "30", "-w", "\n%{http_code}"])
        .arg("--cert")
        .arg(base.join("web.pem"))
        .arg("--key")
        .arg(base.join("web.key"))
        .arg(format!("https://127.0.0.1:{inbound}{path}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {path}: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_thread_serves_requests_side_by_side() {
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
    std::fs::write(policies.join("api.yaml"), POLICY).unwrap();
    ca.write_client_cert("spiffe://mesh.local/ns/shop/sa/web", &base, "web");

    let slow_arrived = Arc::new(tokio::sync::Notify::new());
    let app = app(Duration::from_secs(20), slow_arrived.clone()).await;
    let log = base.join("sidecar.log");
    let proxy = ProxyProcess::spawn_with(
        &base.join("orders"),
        &policies,
        &app.to_string(),
        &["--worker-threads", "1", "--drain", "2s"],
        &[],
        Some(&log),
    );
    proxy.ready().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("sidecar.runtime") && logged.contains("CurrentThread"),
        "the sidecar did not say it runs on the current-thread scheduler:\n{logged}"
    );
    let inbound = proxy.inbound;

    // A request the app holds for 20 s ...
    let slow = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || curl(&base, inbound, "/api/slow"))
    };
    tokio::time::timeout(Duration::from_secs(10), slow_arrived.notified())
        .await
        .expect("the slow request did not reach the app");
    // ... does not hold up others on other connections: allowed ones reach the app, denied
    // ones are refused by the sidecar, all while it is still waiting.
    for i in 0..10 {
        let path = format!("/api/fast/{i}");
        let (allowed, denied) = {
            let base = base.clone();
            tokio::task::spawn_blocking(move || {
                (curl(&base, inbound, &path), curl(&base, inbound, "/admin"))
            })
            .await
            .unwrap()
        };
        assert_eq!(allowed, (200, format!("app saw /api/fast/{i}")));
        assert_eq!(denied.0, 403, "a denied path reached the app: {denied:?}");
    }
    assert!(
        !slow.is_finished(),
        "the slow request ended before the others were served: the app's delay is too short for this test"
    );

    // SIGTERM: the process exits cleanly at the end of its drain (2 s), which cuts the slow
    // request off.
    proxy.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(15), proxy.wait())
        .await
        .expect("the sidecar did not exit within its drain");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let _ = slow.await;
}

/// `--worker-threads 0` is refused with a message that names the range.
#[test]
fn zero_worker_threads_are_refused() {
    let out = run(meshgate().args(["proxy", "--worker-threads", "0"]));
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("--worker-threads") && said.contains("1..=1024"),
        "{said}"
    );
}
