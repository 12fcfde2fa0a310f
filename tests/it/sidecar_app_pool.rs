//! The inbound sidecar's kept-alive HTTP/1.1 connections to its app, seen by a raw HTTP/1.1
//! app that counts the connections it accepts and can drop each one once it has answered (as an
//! app's keep-alive timeout does while the sidecar holds the connection idle). Through the real
//! mesh path: web's app → web's sidecar → mTLS/HTTP/2 → orders' sidecar → this app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::AsyncWriteExt;

use crate::support::mesh::{EchoApp, TestMesh, WEB_TO_ORDERS};
use crate::support::next_request_head;

/// A minimal HTTP/1.1 server: answers every request head (no request bodies) with `hello`,
/// `HEAD` without a body and `/empty` with 204, keeps connections open unless told to drop
/// each one after its first answer.
#[derive(Clone)]
struct CountingApp {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    drop_after_answer: Arc<AtomicBool>,
    /// Closes a connection on its second request, unanswered: the race of an app's keep-alive
    /// timeout with a request already on the wire, made certain.
    drop_second_request: Arc<AtomicBool>,
    /// ... and closes it with a reset (`SO_LINGER` 0) rather than a FIN, as a socket closed
    /// with unread data does.
    reset_not_close: Arc<AtomicBool>,
}

impl CountingApp {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = Self {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::default(),
            received: Arc::default(),
            answered: Arc::default(),
            drop_after_answer: Arc::default(),
            drop_second_request: Arc::default(),
            reset_not_close: Arc::default(),
        };
        let me = app.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                me.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(me.clone().serve(tcp));
            }
        });
        app
    }

    async fn serve(self, mut tcp: tokio::net::TcpStream) {
        let mut buf = Vec::new();
        for nth in 1.. {
            let Some(head) = next_request_head(&mut tcp, &mut buf).await else {
                return;
            };
            self.received.fetch_add(1, Ordering::SeqCst);
            if nth == 2 && self.drop_second_request.load(Ordering::SeqCst) {
                if self.reset_not_close.load(Ordering::SeqCst) {
                    let _ = tcp.set_zero_linger();
                }
                return;
            }
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let answer: &[u8] = match (method, path) {
                ("HEAD", _) => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                (_, "/empty") => b"HTTP/1.1 204 No Content\r\n\r\n",
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            };
            if tcp.write_all(answer).await.is_err() {
                return;
            }
            self.answered.fetch_add(1, Ordering::SeqCst);
            if self.drop_after_answer.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

/// `counter` once it reaches `want` (or after 5 s): the app counts an answer after writing it,
/// so the caller can read the response before the count moves (CI read 19 of 20 so).
async fn settled(counter: &AtomicUsize, want: usize) -> usize {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = counter.load(Ordering::SeqCst);
        if now >= want || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn mesh_in_front_of(app: &CountingApp) -> TestMesh {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", WEB_TO_ORDERS);
    mesh.add("web").await;
    mesh.add_in_front_of("orders", EchoApp { addr: app.addr }, &[], &[])
        .await;
    mesh.write_services();
    mesh.converge().await;
    mesh
}

/// Requests one after another share one connection to the app, whatever the shape of the
/// answer: a body, no body (`HEAD`), or 204. A connection the pool failed to take back after
/// one of them would show as a second accepted connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_app_connection() {
    let app = CountingApp::start().await;
    let mesh = mesh_in_front_of(&app).await;
    for (i, (method, path, body)) in [
        ("GET", "/a", "hello"),
        ("HEAD", "/b", ""),
        ("GET", "/empty", ""),
        ("POST", "/c", "hello"),
    ]
    .iter()
    .cycle()
    .take(24)
    .enumerate()
    {
        let answer = mesh.call("web", method, "orders", path).await;
        assert_eq!(
            answer.status / 100,
            2,
            "request {i}: {method} {path}: {answer:?}"
        );
        assert_eq!(answer.body, *body, "request {i}: {method} {path}");
    }
    assert_eq!(settled(&app.answered, 24).await, 24);
    assert_eq!(
        app.accepted.load(Ordering::SeqCst),
        1,
        "every request after the first should reuse the kept-alive app connection"
    );
}

/// An app that drops connections once they are idle (its keep-alive timeout) costs no
/// request: a pooled connection the app closed is not reused, the request goes on a new one.
/// (The narrower race, a close arriving while the request is being written, is retried by the
/// pool too, but no test here can time it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_dropping_idle_connections_costs_no_request() {
    let app = CountingApp::start().await;
    app.drop_after_answer.store(true, Ordering::SeqCst);
    let mesh = mesh_in_front_of(&app).await;
    for i in 0..20 {
        let answer = mesh.call("web", "GET", "orders", "/a").await;
        assert_eq!(answer.status, 200, "request {i}: {answer:?}");
        assert_eq!(answer.body, "hello");
        // Half the time straight on, half after the close has surely arrived.
        if i % 2 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert_eq!(settled(&app.answered, 20).await, 20);
    assert_eq!(app.accepted.load(Ordering::SeqCst), 20);
}

/// A kept-alive connection the app closes (FIN) or resets (RST) as the next request arrives:
/// an idempotent bodiless request is sent again on a new connection (the caller never sees the
/// race), a POST is not (the app may have acted on it) and the caller gets 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_requests_are_sent_again_after_a_crossed_close() {
    for (method, replayed, reset) in [
        ("GET", true, false),
        ("HEAD", true, false),
        ("DELETE", true, false),
        ("POST", false, false),
        ("GET", true, true),
        ("POST", false, true),
    ] {
        let app = CountingApp::start().await;
        app.drop_second_request.store(true, Ordering::SeqCst);
        app.reset_not_close.store(reset, Ordering::SeqCst);
        let mesh = mesh_in_front_of(&app).await;
        let first = mesh.call("web", "GET", "orders", "/first").await;
        assert_eq!(first.status, 200, "{first:?}");
        let second = mesh.call("web", method, "orders", "/second").await;
        let received = app.received.load(Ordering::SeqCst);
        let accepted = app.accepted.load(Ordering::SeqCst);
        if replayed {
            assert_eq!(
                second.status / 100,
                2,
                "{method} (reset: {reset}): {second:?}"
            );
            assert_eq!(
                (received, accepted),
                (3, 2),
                "{method}: sent again once, on a new connection"
            );
        } else {
            assert_eq!(second.status, 502, "{method} (reset: {reset}): {second:?}");
            assert_eq!(
                (received, accepted),
                (2, 1),
                "{method} must never be sent twice"
            );
        }
    }
}
