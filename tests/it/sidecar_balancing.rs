//! How the outbound sidecar spreads a Service's requests over its endpoints: per request, round
//! robin, over one HTTP/2 connection per endpoint (or, with `--mesh-protocol preserve`, kept-alive
//! HTTP/1.1 connections), and past a dead endpoint without dialling it on every request. Each
//! endpoint is a byte-counting TCP forwarder in front of the same real orders sidecar (the mTLS
//! is end to end through it), so what each endpoint carried is seen without trusting the
//! sidecar's own account; the protocol each connection asked for is read from its TLS
//! ClientHello (ALPN travels in the clear).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use meshgate_proxy::outbound::MeshProtocol;

use crate::support::mesh::{EchoApp, TestMesh, WEB_TO_ORDERS};

/// A TCP forwarder to `target` counting the connections it accepted and the bytes the caller
/// sent through it; with no target it accepts and at once closes (a broken endpoint).
#[derive(Clone)]
struct Forwarder {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    /// The protocols offered by ALPN in each connection's ClientHello.
    alpn: Arc<Mutex<Vec<&'static str>>>,
}

/// The application protocol a TLS ClientHello offers (its ALPN list, in the clear).
fn offered(hello: &[u8]) -> &'static str {
    let has = |needle: &[u8]| hello.windows(needle.len()).any(|w| w == needle);
    match (has(b"\x02h2"), has(b"\x08http/1.1")) {
        (true, false) => "h2",
        (false, true) => "http/1.1",
        (true, true) => "both",
        (false, false) => "other",
    }
}

impl Forwarder {
    async fn start(target: Option<SocketAddr>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let me = Self {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::default(),
            sent: Arc::default(),
            alpn: Arc::default(),
        };
        let f = me.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                f.accepted.fetch_add(1, Ordering::SeqCst);
                let Some(target) = target else { continue };
                let sent = f.sent.clone();
                let alpn = f.alpn.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut first = true;
                        loop {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            sent.fetch_add(n as u64, Ordering::SeqCst);
                            if std::mem::take(&mut first) {
                                alpn.lock().unwrap().push(offered(&buf[..n]));
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut sw).await;
                    };
                    let down = tokio::io::copy(&mut sr, &mut cw);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        me
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

/// web and orders, with web's sidecar knowing no Service yet and carrying requests as
/// `protocol` says.
async fn shop(protocol: MeshProtocol) -> TestMesh {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", WEB_TO_ORDERS);
    mesh.add_configured("web", EchoApp::start().await, |config| {
        config.mesh_protocol = protocol;
    })
    .await;
    mesh.add("orders").await;
    mesh
}

/// Publishes the orders Service with `endpoints` and waits until the sidecars run it.
async fn publish(mesh: &TestMesh, endpoints: &[String]) {
    let list = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    mesh.write_policy(
        "services.yaml",
        &format!(
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: {{ name: orders, namespace: shop }}\nspec:\n  identity: {}\n  hosts: [orders]\n  ports: [{{ port: 8080, protocol: http }}]\n  endpoints: [{list}]\n",
            mesh.workload("orders").id
        ),
    );
    mesh.converge().await;
}

/// Requests are balanced per request, not per connection: over 40 requests on warm
/// connections, each of two endpoints carries a fair share. A client that pins a Service to
/// its first connection (as a pool keyed by host does) leaves one of them idle. Sequential
/// requests share one connection per endpoint, HTTP/2 by default, HTTP/1.1 when the app's
/// HTTP/1.1 is preserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_spread_over_the_services_endpoints() {
    for (protocol, alpn) in [
        (MeshProtocol::Http2, "h2"),
        (MeshProtocol::Preserve, "http/1.1"),
    ] {
        let mesh = shop(protocol).await;
        let inbound = mesh.workload("orders").sidecar.inbound_addr;
        let (a, b) = (
            Forwarder::start(Some(inbound)).await,
            Forwarder::start(Some(inbound)).await,
        );
        publish(&mesh, &[a.addr.to_string(), b.addr.to_string()]).await;
        for _ in 0..4 {
            assert_eq!(mesh.call("web", "GET", "orders", "/warm").await.status, 200);
        }
        let (a0, b0) = (a.sent(), b.sent());
        for i in 0..40 {
            let answer = mesh.call("web", "GET", "orders", &format!("/r/{i}")).await;
            assert_eq!(answer.status, 200, "{protocol:?}: {answer:?}");
            assert_eq!(answer.echoed()["path"], format!("/r/{i}"), "{protocol:?}");
        }
        let (da, db) = (a.sent() - a0, b.sent() - b0);
        let total = (da + db) as f64;
        assert!(
            da as f64 > 0.3 * total && db as f64 > 0.3 * total,
            "{protocol:?}: each endpoint should carry a fair share of the requests: {da} and {db} bytes"
        );
        assert_eq!(
            (
                a.accepted.load(Ordering::SeqCst),
                b.accepted.load(Ordering::SeqCst)
            ),
            (1, 1),
            "{protocol:?}: one connection per endpoint, reused by every request in turn"
        );
        for endpoint in [&a, &b] {
            assert_eq!(
                *endpoint.alpn.lock().unwrap(),
                [alpn],
                "{protocol:?}: the protocol offered between the sidecars"
            );
        }
    }
}

/// With `--mesh-protocol preserve`, concurrent HTTP/1.1 requests each take a kept-alive
/// connection of their own and give it back: a second burst opens none, bodies cross in both
/// directions, the callee's app sees HTTP/1.1 with the caller's `Host`, and an HTTP/2 (gRPC)
/// request still rides HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserved_http1_reuses_its_connections_and_http2_stays_http2() {
    let mesh = shop(MeshProtocol::Preserve).await;
    let inbound = mesh.workload("orders").sidecar.inbound_addr;
    let endpoint = Forwarder::start(Some(inbound)).await;
    publish(&mesh, &[endpoint.addr.to_string()]).await;
    let burst = |round: usize| {
        let mesh = &mesh;
        futures_util::future::join_all((0..8).map(move |i| async move {
            mesh.call_with(
                "web",
                "POST",
                "orders:8080",
                &format!("/burst/{round}/{i}"),
                Bytes::from(vec![b'x'; 100_000 + i]),
                &[],
            )
            .await
        }))
    };
    for answer in burst(0).await {
        assert_eq!(answer.status, 200, "{answer:?}");
        let echoed = answer.echoed();
        assert_eq!(echoed["version"], "HTTP/1.1");
        assert_eq!(echoed["headers"]["host"], "orders:8080");
        let i: usize = echoed["path"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(echoed["body_bytes"], 100_000 + i);
    }
    let opened = endpoint.accepted.load(Ordering::SeqCst);
    assert!(
        (1..=8).contains(&opened),
        "{opened} connections for 8 concurrent requests"
    );
    for round in 1..4 {
        for answer in burst(round).await {
            assert_eq!(answer.status, 200, "{answer:?}");
        }
    }
    let after = endpoint.accepted.load(Ordering::SeqCst);
    assert!(
        after <= 8,
        "kept-alive connections are reused: {opened} after the first burst, {after} after four (8 requests at most at a time)"
    );
    assert!(
        endpoint
            .alpn
            .lock()
            .unwrap()
            .iter()
            .all(|p| *p == "http/1.1"),
        "HTTP/1.1 requests travel over HTTP/1.1: {:?}",
        endpoint.alpn.lock().unwrap()
    );
    // An HTTP/2 request from the app (prior knowledge, as gRPC clients speak) stays HTTP/2.
    let tcp = tokio::net::TcpStream::connect(mesh.workload("web").sidecar.outbound_addr)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            http::Request::get("http://orders/h2")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        endpoint.alpn.lock().unwrap().last().copied(),
        Some("h2"),
        "an HTTP/2 request opens the HTTP/2 connection"
    );
}

/// A Service endpoint that accepts and drops every connection (a sidecar crash-looping, a
/// stale address) costs no request and is not dialled on every request: after its first
/// failure it rests while the healthy endpoint serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_endpoint_is_skipped_while_it_rests() {
    let broken = Forwarder::start(None).await;
    let mesh = shop(MeshProtocol::default()).await;
    let inbound = mesh.workload("orders").sidecar.inbound_addr;
    publish(&mesh, &[broken.addr.to_string(), inbound.to_string()]).await;
    let started = std::time::Instant::now();
    for i in 0..30 {
        let answer = mesh.call("web", "GET", "orders", &format!("/r/{i}")).await;
        assert_eq!(answer.status, 200, "request {i}: {answer:?}");
    }
    let dialled = broken.accepted.load(Ordering::SeqCst);
    // Backoff 1 s then 2 s: within the first second one dial, at most a few if the requests
    // took seconds on a loaded machine.
    let allowed = 1 + started.elapsed().as_secs();
    assert!(
        (1..=allowed).contains(&dialled),
        "the broken endpoint was dialled {dialled} times in {:?} (expected 1..={allowed})",
        started.elapsed()
    );
}
