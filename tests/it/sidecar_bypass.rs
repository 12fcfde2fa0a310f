//! Path-normalization bypasses through a real sidecar: with a policy that allows `/public/*` and
//! denies `/admin/*`, no hostile spelling of an admin path may reach the app as an admin path.

use crate::support::mesh::TestMesh;
use meshgate_ca::tls::{self};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: public, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ paths: ["/public/*"] }]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: shop }
spec:
  selector: { account: orders }
  action: DENY
  rules:
    - to: [{ paths: ["/admin", "/admin/*"] }]
"#;

const HOSTILE: &[&str] = &[
    "/admin",
    "/admin/users",
    "/public/../admin/users",
    "/public/./../admin/users",
    "/public/../../admin/users",
    "/public/%2e%2e/admin/users",
    "/public/%2E%2E/admin/users",
    "/public/%2e%2E/admin/users",
    "/public/.%2e/admin/users",
    "/public/%2e./admin/users",
    "/public/..%2fadmin/users",
    "/public%2f..%2fadmin/users",
    "/public/..%2Fadmin/users",
    "/public/..%5cadmin/users",
    "/public/..%5Cadmin/users",
    "/public/..\\admin/users",
    "/public\\..\\admin\\users",
    "//admin/users",
    "///admin/users",
    "/./admin/users",
    "/public/..//admin/users",
    "/admin;x=1/users",
    "/public/..;/admin/users",
    "/public;/../admin/users",
    "/%61dmin/users",
    "/%61%64%6d%69%6e/users",
    "/ADMIN/users",
    "/Admin/users",
    "/admin%00/users",
    "/public/%00/../admin/users",
    "/public/%252e%252e/admin/users",
    "/public/%2e%2e%2fadmin/users",
    "/public/..%00/admin/users",
    "/admin/",
    "/admin#frag",
    "/public/../admin?x=/public/y",
    "/public/%2e%2e/%2e%2e/admin/users",
    "/public/.../admin/users",
    "/public/%u002e%u002e/admin/users",
    "/public/..%c0%afadmin/users",
];

/// Sends one raw HTTP/1.1 request over mTLS (so the path goes out exactly as written) and
/// returns the status and body.
async fn raw_get(
    connector: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    path: &str,
) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status for {path:?}: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The orders sidecar under [`POLICY`], and a TLS connector holding web's SVID.
async fn orders_and_web_client() -> (TestMesh, std::net::SocketAddr, tokio_rustls::TlsConnector) {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", POLICY);
    mesh.add("orders").await;
    mesh.converge().await;
    let addr = mesh.workload("orders").sidecar.inbound_addr;
    let config = mesh.client_as("web", TestMesh::id_of("orders"), &[b"http/1.1"]);
    (mesh, addr, tokio_rustls::TlsConnector::from(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hostile_path_reaches_the_app_as_an_admin_path() {
    let (_mesh, addr, connector) = orders_and_web_client().await;

    // The control: a plain public path passes.
    let (status, body) = raw_get(&connector, addr, "/public/ok").await;
    assert_eq!(status, 200, "{body}");

    assert!(HOSTILE.len() >= 30);
    let mut outcomes = Vec::new();
    for path in HOSTILE {
        let (status, body) = raw_get(&connector, addr, path).await;
        if status == 200 {
            let echoed: serde_json::Value =
                serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {body}"));
            let seen = echoed["path"].as_str().unwrap().to_ascii_lowercase();
            assert!(
                !seen.starts_with("/admin"),
                "{path:?} reached the app as {seen:?}"
            );
            assert!(
                seen.starts_with("/public/"),
                "{path:?} reached the app as {seen:?}, outside the allowed prefix"
            );
        } else {
            assert!(
                matches!(status, 400 | 403),
                "{path:?}: unexpected status {status}: {body}"
            );
        }
        outcomes.push(format!("{status} {path}"));
    }
    eprintln!("bypass table outcomes:\n{}", outcomes.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off() {
    let (_mesh, addr, connector) = orders_and_web_client().await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /public/x HTTP/1.1\r\nHost: or")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tls.read_to_end(&mut rest),
    )
    .await;
    assert!(
        closed.is_ok(),
        "the connection must be closed when headers do not arrive in time"
    );
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(8),
        "closed too early ({waited:?}): the limit is 10 s"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
}
