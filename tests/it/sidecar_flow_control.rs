//! Request bodies between two sidecars share one HTTP/2 connection and its flow-control window.
//! What one request's body does there must not hold up the others: an app that answers before
//! it has read the body (nginx's `return`, an early 401 or 413, Go's `net/http`), and an app
//! that does not read a body at all. Through the real mesh path: web's app → web's sidecar →
//! mTLS/HTTP/2 → orders' sidecar → a raw HTTP/1.1 app that counts what it receives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use meshgate_proxy::outbound::MeshProtocol;

use crate::support::mesh::{EchoApp, TestMesh, WEB_TO_ORDERS};
use crate::support::next_request_head;

const KIB: usize = 1024;

/// An HTTP/1.1 app that reads request bodies three ways, by path: `/early` answers as soon as
/// it has the head, then reads the body and throws it away (as nginx does with `return 200`);
/// `/hold` never reads the body nor answers; anything else reads the whole body, then answers.
/// `GET /download/<n>` answers `n` bytes.
/// Keeps connections open; counts body bytes received and bodies received whole.
#[derive(Clone)]
struct BodyApp {
    addr: SocketAddr,
    body_bytes: Arc<AtomicU64>,
    bodies: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
}

impl BodyApp {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = Self {
            addr: listener.local_addr().unwrap(),
            body_bytes: Arc::default(),
            bodies: Arc::default(),
            held: Arc::default(),
        };
        let me = app.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(me.clone().serve(tcp));
            }
        });
        app
    }

    async fn serve(self, mut tcp: tokio::net::TcpStream) {
        let mut buf = Vec::new();
        loop {
            let Some(head) = next_request_head(&mut tcp, &mut buf).await else {
                return;
            };
            let head = head.to_ascii_lowercase();
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            if let Some(n) = path.strip_prefix("/download/") {
                let n: usize = n.parse().expect("/download/<bytes>");
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
                if tcp.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'y'; 64 * KIB];
                let mut left = n;
                while left > 0 {
                    let len = chunk.len().min(left);
                    if tcp.write_all(&chunk[..len]).await.is_err() {
                        return;
                    }
                    left -= len;
                }
                continue;
            }
            let length: u64 = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("the sidecar sends uploads with a content-length");
            const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
            match path.as_str() {
                "/hold" => {
                    self.held.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                "/early" => {
                    if tcp.write_all(OK).await.is_err() {
                        return;
                    }
                    if !self.read_body(&mut tcp, &mut buf, length).await {
                        return;
                    }
                }
                _ => {
                    if !self.read_body(&mut tcp, &mut buf, length).await
                        || tcp.write_all(OK).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Reads (and counts) `length` body bytes, some of them already in `buf`.
    async fn read_body(
        &self,
        tcp: &mut tokio::net::TcpStream,
        buf: &mut Vec<u8>,
        length: u64,
    ) -> bool {
        let mut left = length;
        let take = (buf.len() as u64).min(left) as usize;
        buf.drain(..take);
        left -= take as u64;
        self.body_bytes.fetch_add(take as u64, Ordering::SeqCst);
        let mut chunk = vec![0u8; 64 * KIB];
        while left > 0 {
            let want = (chunk.len() as u64).min(left) as usize;
            match tcp.read(&mut chunk[..want]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    left -= n as u64;
                    self.body_bytes.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
        }
        self.bodies.fetch_add(1, Ordering::SeqCst);
        true
    }
}

async fn mesh_in_front_of(app: &BodyApp) -> TestMesh {
    mesh_carrying(app, MeshProtocol::default()).await
}

/// web → orders in front of `app`, web's sidecar carrying requests as `protocol` says; orders
/// allows web everywhere but `/denied`.
async fn mesh_carrying(app: &BodyApp, protocol: MeshProtocol) -> TestMesh {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", WEB_TO_ORDERS);
    mesh.write_policy("orders-denied.yaml", DENIED_PATH);
    mesh.add_configured("web", EchoApp::start().await, |config| {
        config.mesh_protocol = protocol;
    })
    .await;
    mesh.add_in_front_of("orders", EchoApp { addr: app.addr }, &[], &[])
        .await;
    mesh.write_services();
    mesh.converge().await;
    mesh
}

const DENIED_PATH: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: orders-denied, namespace: shop }
spec:
  selector: { account: orders }
  action: DENY
  rules:
    - to: [{ paths: ["/denied"] }]
"#;

/// A new HTTP/1.1 connection from web's app to its sidecar's outbound listener.
async fn app_connection(
    outbound: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// web's app POSTs `size` bytes to `http://orders<path>` on a connection of its own; the status
/// and body of the answer.
async fn upload(outbound: SocketAddr, path: &str, size: usize) -> (u16, String) {
    let mut sender = app_connection(outbound).await;
    let req = http::Request::post(path)
        .header("host", "orders")
        .body(Full::new(Bytes::from(vec![b'x'; size])))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `n` uploads of `size` bytes at once; every one must be answered within 30 s.
async fn uploads_at_once(outbound: SocketAddr, path: &'static str, n: usize, size: usize) {
    let calls: Vec<_> = (0..n)
        .map(|_| tokio::spawn(upload(outbound, path, size)))
        .collect();
    let answered = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(calls),
    )
    .await
    .unwrap_or_else(|_| {
        panic!("{n} concurrent uploads of {size} bytes to {path} were not all answered in 30 s: the connection between the sidecars stalled")
    });
    for answer in answered {
        assert_eq!(answer.unwrap(), (200, "ok\n".to_string()));
    }
}

/// `counter` once it reaches `want` (or after 10 s).
async fn settled(counter: &AtomicU64, want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = counter.load(Ordering::SeqCst);
        if now >= want || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The app answers each upload before reading its body, then reads the body: the inbound
/// sidecar's connection to the app is busy until the body is through even though the answer
/// has ended. Given to the next request at that moment, that request's body waited behind the
/// first, unread, holding flow-control window the first needed: with enough uploads at once,
/// every upload between the two sidecars stopped (3 answered in 2 s, then none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_answered_before_their_body_is_read_all_go_through() {
    let app = BodyApp::start().await;
    let mesh = mesh_in_front_of(&app).await;
    let outbound = mesh.workload("web").sidecar.outbound_addr;
    let (n, size, rounds) = (64, 1024 * KIB, 3);
    for _ in 0..rounds {
        uploads_at_once(outbound, "/early", n, size).await;
    }
    let want = (rounds * n * size) as u64;
    assert_eq!(
        settled(&app.body_bytes, want).await,
        want,
        "every byte of every body reached the app"
    );
}

/// Uploads whose bodies the app never reads sit in the connection between the sidecars (the
/// socket buffers to the app full, then what HTTP/2 lets one stream have in flight). Other
/// uploads on that connection still go through: a few such streams may not take the whole
/// connection's window (with hyper's defaults one stream could: 1 MiB each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_app_never_reads_does_not_hold_up_the_others() {
    let app = BodyApp::start().await;
    let mesh = mesh_in_front_of(&app).await;
    let outbound = mesh.workload("web").sidecar.outbound_addr;
    let held = 4;
    let stuck: Vec<_> = (0..held)
        .map(|_| tokio::spawn(upload(outbound, "/hold", 64 * KIB * KIB)))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.held.load(Ordering::SeqCst) < held {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held uploads never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Time for the held bodies to fill everything they can between the sidecars.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (n, size) = (16, 256 * KIB);
    uploads_at_once(outbound, "/upload", n, size).await;
    assert_eq!(
        app.bodies.load(Ordering::SeqCst),
        n,
        "each upload's body reached the app whole"
    );
    for stuck in stuck {
        assert!(
            !stuck.is_finished(),
            "a held upload is still waiting, as its app wants"
        );
        stuck.abort();
    }
}

/// web's app GETs `http://orders/download/<size>` on a connection of its own and reads the
/// answer whole; its length.
async fn download(outbound: SocketAddr, size: usize) -> usize {
    let mut sender = app_connection(outbound).await;
    let req = http::Request::get(format!("/download/{size}"))
        .header("host", "orders")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap().to_bytes().len()
}

/// The other direction: callers that stop reading their downloads leave them in the connection
/// between the sidecars (what HTTP/2 lets one stream have in flight toward web's sidecar).
/// Other downloads on that connection still go through (with hyper's client defaults, three
/// such streams took the whole window: 2 MiB each of 5 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_their_callers_stop_reading_do_not_hold_up_the_others() {
    let app = BodyApp::start().await;
    let mesh = mesh_in_front_of(&app).await;
    let outbound = mesh.workload("web").sidecar.outbound_addr;
    // Callers that take the answer's head and never read its body.
    let mut unread = Vec::new();
    for _ in 0..4 {
        let mut sender = app_connection(outbound).await;
        let req = http::Request::get(format!("/download/{}", 64 * KIB * KIB))
            .header("host", "orders")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .expect("an unread download's head arrives")
            .unwrap();
        unread.push((sender, resp));
    }
    // Time for the unread bodies to fill everything they can between the sidecars.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (n, size) = (16, 1024 * KIB);
    let calls: Vec<_> = (0..n)
        .map(|_| tokio::spawn(download(outbound, size)))
        .collect();
    let lengths = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(calls))
        .await
        .unwrap_or_else(|_| {
            panic!("{n} concurrent downloads of {size} bytes were not all answered in 30 s: the connection between the sidecars stalled")
        });
    for length in lengths {
        assert_eq!(length.unwrap(), size, "every download arrived whole");
    }
    drop(unread);
}

/// The same class from the sidecar's side: a refused upload is answered `403` by the inbound
/// sidecar before any of its body is read, and that body must not hold up anything either —
/// not the HTTP/2 connection between the sidecars, and not, with `--mesh-protocol preserve`,
/// the kept-alive HTTP/1.1 connection the answer came back on (it may go back to the pool only
/// once the body is through or the connection is dropped). Refused uploads of 1 MiB beside
/// allowed ones, twice over the same connections: every one answered, no refused byte at the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_uploads_do_not_hold_up_allowed_ones() {
    for protocol in [MeshProtocol::Http2, MeshProtocol::Preserve] {
        let app = BodyApp::start().await;
        let mesh = mesh_carrying(&app, protocol).await;
        let outbound = mesh.workload("web").sidecar.outbound_addr;
        let (refused, allowed, rounds) = (32, 16, 2);
        for round in 1..=rounds {
            let calls: Vec<_> = (0..refused)
                .map(|_| (403, "/denied", 1024 * KIB))
                .chain((0..allowed).map(|_| (200, "/upload", 256 * KIB)))
                .map(|(want, path, size)| {
                    tokio::spawn(async move { (want, upload(outbound, path, size).await.0) })
                })
                .collect();
            let answers = tokio::time::timeout(
                Duration::from_secs(30),
                futures_util::future::join_all(calls),
            )
            .await
            .unwrap_or_else(|_| {
                panic!("{protocol:?}, round {round}: refused and allowed uploads at once were not all answered in 30 s")
            });
            for answer in answers {
                let (want, got) = answer.unwrap();
                assert_eq!(got, want, "{protocol:?}, round {round}");
            }
            assert_eq!(
                app.bodies.load(Ordering::SeqCst),
                round * allowed,
                "{protocol:?}: every allowed body reached the app whole, and no refused one"
            );
        }
        assert_eq!(
            app.body_bytes.load(Ordering::SeqCst),
            (rounds * allowed * 256 * KIB) as u64,
            "{protocol:?}: not one byte of a refused body reached the app"
        );
    }
}

/// The same on the app's side of its own sidecar: an upload the outbound sidecar refuses
/// itself (no Service for the host: `502`) before reading the body. Each of them, 1 MiB, sent at
/// once by callers that write the whole body as hyper's client does: every caller gets the
/// answer (not a reset), told that the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_the_outbound_sidecar_refuses_are_answered() {
    let app = BodyApp::start().await;
    let mesh = mesh_in_front_of(&app).await;
    let outbound = mesh.workload("web").sidecar.outbound_addr;
    let calls: Vec<_> = (0..32)
        .map(|_| {
            tokio::spawn(async move {
                let mut sender = app_connection(outbound).await;
                let req = http::Request::post("/upload")
                    .header("host", "nowhere.example")
                    .body(Full::new(Bytes::from(vec![b'x'; 1024 * KIB])))
                    .unwrap();
                let resp = sender
                    .send_request(req)
                    .await
                    .expect("the refusal arrives, not a reset");
                (
                    resp.status().as_u16(),
                    resp.headers().get("connection").cloned(),
                )
            })
        })
        .collect();
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("every refused upload answered within 30 s");
    for answer in answers {
        let (status, connection) = answer.unwrap();
        assert_eq!(status, 502);
        assert_eq!(
            connection.as_ref().map(|v| v.as_bytes()),
            Some(&b"close"[..])
        );
    }
    assert_eq!(app.body_bytes.load(Ordering::SeqCst), 0);
}
