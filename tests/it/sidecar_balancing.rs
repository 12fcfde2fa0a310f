//! How the outbound sidecar spreads a Service's requests over its endpoints: per request, round
//! robin, over one HTTP/2 connection per endpoint, and past a dead endpoint without dialling it
//! on every request. Each endpoint is a byte-counting TCP forwarder in front of the same real
//! orders sidecar (the mTLS is end to end through it), so what each endpoint carried is seen
//! without trusting the sidecar's own account.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::support::mesh::{TestMesh, WEB_TO_ORDERS};

/// A TCP forwarder to `target` counting the connections it accepted and the bytes the caller
/// sent through it; with no target it accepts and at once closes (a broken endpoint).
#[derive(Clone)]
struct Forwarder {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

impl Forwarder {
    async fn start(target: Option<SocketAddr>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let me = Self {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::default(),
            sent: Arc::default(),
        };
        let f = me.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                f.accepted.fetch_add(1, Ordering::SeqCst);
                let Some(target) = target else { continue };
                let sent = f.sent.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            sent.fetch_add(n as u64, Ordering::SeqCst);
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

/// web and orders, with web's sidecar knowing no Service yet.
async fn shop() -> TestMesh {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", WEB_TO_ORDERS);
    mesh.add("web").await;
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
/// its first connection (as a pool keyed by host does) leaves one of them idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_spread_over_the_services_endpoints() {
    let mesh = shop().await;
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
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let (da, db) = (a.sent() - a0, b.sent() - b0);
    let total = (da + db) as f64;
    assert!(
        da as f64 > 0.3 * total && db as f64 > 0.3 * total,
        "each endpoint should carry a fair share of the requests: {da} and {db} bytes"
    );
    assert_eq!(
        (
            a.accepted.load(Ordering::SeqCst),
            b.accepted.load(Ordering::SeqCst)
        ),
        (1, 1),
        "one HTTP/2 connection per endpoint, shared by every request"
    );
}

/// A Service endpoint that accepts and drops every connection (a sidecar crash-looping, a
/// stale address) costs no request and is not dialled on every request: after its first
/// failure it rests while the healthy endpoint serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_endpoint_is_skipped_while_it_rests() {
    let broken = Forwarder::start(None).await;
    let mesh = shop().await;
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
