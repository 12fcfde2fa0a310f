//! Short-lived identities under continuous traffic: a connection may not outlive the certificate
//! it was authenticated with (the receiving sidecar re-checks expiry per request), and sidecars
//! retire pooled connections when their SVID rotates, so legitimate traffic never sees a denial.

use std::time::Duration;

use crate::support::mesh::TestMesh;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use meshgate_ca::tls::{self};

const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: readers, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ paths: ["/orders/*"] }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cannot_outlive_its_certificate() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("p.yaml", POLICY);
    mesh.add("orders").await;
    mesh.converge().await;
    // A client certificate valid for 3 more seconds, on one long-lived HTTP/2 connection.
    let now = time::OffsetDateTime::now_utc();
    let web = mesh.ca.sign_leaf(
        &TestMesh::id_of("web"),
        now - time::Duration::minutes(1),
        now + time::Duration::seconds(3),
    );
    let config =
        crate::support::mesh_client(mesh.ca.bundle(), &web, TestMesh::id_of("orders"), &[b"h2"]);
    let tcp = tokio::net::TcpStream::connect(mesh.workload("orders").sidecar.inbound_addr)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let get = || {
        http::Request::get("https://orders/orders/1")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let first = sender.send_request(get()).await.unwrap();
    assert_eq!(first.status(), 200);
    let _ = first.into_body().collect().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = sender
        .send_request(get())
        .await
        .expect("the connection itself is still open");
    assert_eq!(
        after.status(),
        403,
        "a request on a connection whose certificate expired is denied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_svids_rotate_under_traffic_without_a_single_denial() {
    let mut mesh = TestMesh::with_svid_ttl(Duration::from_secs(10)).await;
    mesh.write_policy("p.yaml", POLICY);
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.converge().await;
    let first_serial = mesh
        .workload("web")
        .sidecar
        .identity
        .status()
        .unwrap()
        .serial
        .clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    let mut requests = 0;
    while tokio::time::Instant::now() < deadline {
        let answer = mesh.call("web", "GET", "orders", "/orders/1").await;
        requests += 1;
        assert_eq!(
            answer.status, 200,
            "request {requests} failed during rotation: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let web = mesh.workload("web").sidecar.identity.status().unwrap();
    assert!(web.renewals >= 2, "web renewed {} times", web.renewals);
    assert_ne!(web.serial, first_serial);
    eprintln!(
        "rotation under traffic: {requests} requests, web renewed {} times, 0 failures",
        web.renewals
    );
}
