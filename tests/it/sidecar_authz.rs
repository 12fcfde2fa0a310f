//! Scenarios through real sidecars: web → orders with identity/method/path policy, DENY over
//! ALLOW, dry-run, default deny, and outbound verification of the server's SPIFFE ID.

use crate::support::mesh::TestMesh;

const POLICIES: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: orders-readers, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ methods: ["GET", "HEAD"], paths: ["/orders", "/orders/*"] }]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: orders-secret, namespace: shop }
spec:
  selector: { account: orders }
  action: DENY
  rules:
    - to: [{ paths: ["/orders/secret/*"] }]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: orders-beta-trial, namespace: shop }
spec:
  selector: { account: orders }
  action: DENY
  mode: dry-run
  rules:
    - to: [{ paths: ["/orders/beta/*"] }]
"#;

async fn shop() -> TestMesh {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", POLICIES);
    for name in ["web", "orders", "payments", "intruder"] {
        mesh.add(name).await;
    }
    mesh.write_services();
    mesh.converge().await;
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_reads_orders_and_the_app_learns_who_called() {
    let mesh = shop().await;
    let answer = mesh
        .call_with(
            "web",
            "GET",
            "orders",
            "/orders/42?x=1",
            bytes::Bytes::new(),
            &[("x-meshgate-peer", "spiffe://mesh.local/ns/shop/sa/admin")],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let echoed = answer.echoed();
    assert_eq!(echoed["path"], "/orders/42?x=1");
    assert_eq!(echoed["method"], "GET");
    // The spoofed header from the caller was replaced by the verified identity.
    assert_eq!(
        echoed["headers"]["x-meshgate-peer"],
        TestMesh::id_of("web").as_str()
    );
    assert_eq!(
        echoed["headers"]["x-forwarded-client-cert"],
        format!(
            "By={};URI={}",
            TestMesh::id_of("orders"),
            TestMesh::id_of("web")
        )
    );
    // HTTP/1.1 from the app stays HTTP/1.1 at the far app, though sidecars speak HTTP/2.
    assert_eq!(echoed["version"], "HTTP/1.1");
    assert!(echoed["headers"].get("x-meshgate-orig-proto").is_none());
    assert_eq!(echoed["headers"]["host"], "orders");

    assert!(
        mesh.metric(
            "orders",
            "meshgate_requests_total",
            &[
                r#"direction="inbound""#,
                r#"decision="allow""#,
                r#"policy="shop/orders-readers""#
            ]
        )
        .await
            >= 1.0
    );
    assert!(
        mesh.metric(
            "web",
            "meshgate_requests_total",
            &[r#"direction="outbound""#, r#"decision="forwarded""#]
        )
        .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_identity_deny_dry_run_and_default_deny() {
    let mesh = shop().await;
    let cases = [
        (
            "web",
            "GET",
            "orders",
            "/orders",
            200,
            "allowed by orders-readers",
        ),
        ("web", "HEAD", "orders", "/orders/1", 200, "HEAD allowed"),
        (
            "web",
            "POST",
            "orders",
            "/orders/1",
            403,
            "POST is not in the rule",
        ),
        (
            "web",
            "DELETE",
            "orders",
            "/orders",
            403,
            "DELETE is not in the rule",
        ),
        (
            "web",
            "GET",
            "orders",
            "/order",
            403,
            "path outside the rule",
        ),
        (
            "web",
            "GET",
            "orders",
            "/ordersX",
            403,
            "prefix must end at a segment",
        ),
        (
            "intruder",
            "GET",
            "orders",
            "/orders/1",
            403,
            "another identity",
        ),
        (
            "web",
            "GET",
            "orders",
            "/orders/secret/plans",
            403,
            "DENY overrides ALLOW",
        ),
        (
            "web",
            "GET",
            "orders",
            "/orders/beta/x",
            200,
            "dry-run DENY does not block",
        ),
        (
            "web",
            "GET",
            "payments",
            "/anything",
            403,
            "no ALLOW policy: mesh default deny",
        ),
        (
            "orders",
            "GET",
            "web",
            "/",
            403,
            "no ALLOW policy: mesh default deny",
        ),
    ];
    for (from, method, host, path, want, why) in cases {
        let answer = mesh.call(from, method, host, path).await;
        assert_eq!(
            answer.status, want,
            "{from} {method} {host}{path}: {why}: {}",
            answer.body
        );
        if want == 403 {
            assert_eq!(
                answer.body, "forbidden\n",
                "denials carry no reason to the caller"
            );
        }
    }
    let dry_run = mesh
        .metric(
            "orders",
            "meshgate_requests_total",
            &[r#"decision="dry-run-deny""#],
        )
        .await;
    assert_eq!(dry_run, 1.0, "the dry-run denial is counted");
    let denied = mesh
        .metric(
            "orders",
            "meshgate_requests_total",
            &[r#"direction="inbound""#, r#"decision="deny""#],
        )
        .await;
    assert_eq!(
        denied, 6.0,
        "the six denials judged at orders (payments and web judge their own)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_a_server_with_another_identity_and_unknown_hosts() {
    let mesh = shop().await;
    // A Service that claims to be `orders` but whose endpoint is the payments sidecar.
    let impostor = format!(
        "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: {{ name: impostor, namespace: shop }}\nspec:\n  identity: {}\n  hosts: [impostor]\n  ports: [{{ port: 8080, protocol: http }}]\n  endpoints: [\"{}\"]\n",
        TestMesh::id_of("orders"),
        mesh.workload("payments").sidecar.inbound_addr
    );
    mesh.write_policy("impostor.yaml", &impostor);
    mesh.converge().await;
    let answer = mesh.call("web", "GET", "impostor", "/orders/1").await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    let refused = mesh
        .metric(
            "web",
            "meshgate_tls_handshake_failures_total",
            &[r#"direction="outbound""#, r#"reason="wrong_server_id""#],
        )
        .await;
    assert!(refused >= 1.0, "the wrong identity is counted");

    let unknown = mesh.call("web", "GET", "nowhere.example", "/").await;
    assert_eq!(unknown.status, 502);
    assert!(unknown.body.contains("no Service"), "{}", unknown.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_reach_the_app_despite_default_deny_and_nothing_else_does() {
    use http_body_util::{BodyExt, Full};
    let mesh = shop().await;
    // payments has no ALLOW policy: every mesh request to it is denied ...
    assert_eq!(
        mesh.call("web", "GET", "payments", "/healthz").await.status,
        403
    );
    // ... but its probe path answers on the plaintext probe port.
    let probe = mesh
        .workload("payments")
        .sidecar
        .probe_addr
        .expect("probe listener");
    let send = |method: &'static str, path: &'static str, body: &'static str| async move {
        let tcp = tokio::net::TcpStream::connect(probe).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "payments")
            .header("x-meshgate-peer", "spiffe://mesh.local/ns/shop/sa/admin")
            .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let (status, body) = send("GET", "/healthz", "").await;
    assert_eq!(status, 200, "{body}");
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["path"], "/healthz");
    assert!(
        echoed["headers"].get("x-meshgate-peer").is_none(),
        "no identity header via the probe port: {body}"
    );
    assert_eq!(send("HEAD", "/healthz", "").await.0, 200);
    assert_eq!(send("GET", "/orders", "").await.0, 404, "only probe paths");
    assert_eq!(
        send("GET", "/healthz/../orders", "").await.0,
        404,
        "exact paths only"
    );
    assert_eq!(send("POST", "/healthz", "").await.0, 405);
    assert_eq!(send("GET", "/healthz", "payload").await.0, 400);
    // The sidecar's own readiness for kubelet probes (`--probe-self`), without details.
    assert_eq!(
        send("GET", "/meshgate/ready", "").await,
        (200, "ready\n".into())
    );
    assert_eq!(send("GET", "/meshgate/live", "").await.0, 200);
}

/// Sends an HTTP/1.1 Upgrade through `from`'s outbound port; returns the response head and,
/// when switched, what came back for "ping".
async fn upgrade(mesh: &TestMesh, from: &str, path: &str) -> (String, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(mesh.workload(from).sidecar.outbound_addr)
        .await
        .unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: orders\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.unwrap(),
            1,
            "connection closed in the response head"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    if !head.starts_with("HTTP/1.1 101") {
        let mut rest = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_millis(500), tcp.read(&mut rest))
            .await
            .map_or(0, |r| r.unwrap_or(0));
        return (
            format!("{head}{}", String::from_utf8_lossy(&rest[..n])),
            None,
        );
    }
    tcp.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tcp.read_exact(&mut echoed),
    )
    .await
    .unwrap()
    .unwrap();
    (head, Some(String::from_utf8_lossy(&echoed).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_crosses_both_sidecars_when_allowed() {
    let mesh = shop().await;
    let (head, echoed) = upgrade(&mesh, "web", "/orders/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    assert!(
        head.contains(TestMesh::id_of("web").as_str()),
        "the app saw the verified caller: {head}"
    );
    assert_eq!(echoed.as_deref(), Some("ping"));

    let (head, echoed) = upgrade(&mesh, "intruder", "/orders/ws").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(echoed.is_none());
}
