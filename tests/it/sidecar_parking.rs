//! Idle HTTP/1.1 connections are parked (hyper's buffers given back) and resume on their next
//! bytes, through real sidecars: the app's pooled connection to its outbound listener and a
//! peer's mTLS connection to the inbound listener. What a client sees must not change: the same
//! connection keeps answering, a request head split across the quiet period arrives whole,
//! pipelined requests are answered in order, a slow answer is neither cut nor followed by
//! `Connection: close`, a WebSocket upgrade still works after a park, and a parked connection
//! still obeys the idle limit and the drain. A peer without ALPN is served by what it sends.

use std::time::Duration;

use meshgate_ca::tls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::support::mesh::{TestMesh, WEB_TO_ORDERS};

/// Short enough for tests; the default is one second.
const PARK: Duration = Duration::from_millis(200);

/// One HTTP/1.1 response read off a kept-alive connection: status, head, body.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    /// The echo app's view of the request.
    fn echoed(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not an echo ({e}): {self:?}"))
    }

    fn keeps_alive(&self) -> bool {
        !self.head.to_ascii_lowercase().contains("connection: close")
    }
}

/// Reads one response (Content-Length or chunked) and nothing more.
async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> Reply {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("no response within 10 s")
            .unwrap();
        assert!(
            n == 1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap())
    {
        body.resize(len, 0);
        s.read_exact(&mut body).await.unwrap();
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                s.read_exact(&mut byte).await.unwrap();
                line.push(byte[0]);
            }
            let size = usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16).unwrap();
            let mut chunk = vec![0u8; size + 2];
            s.read_exact(&mut chunk).await.unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    Reply {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, path: &str) -> Reply {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: orders\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_reply(s).await
}

/// The parked-connection gauge of `workload`'s `listener`.
async fn parked(mesh: &TestMesh, workload: &str, listener: &str) -> f64 {
    let label = format!(r#"listener="{listener}""#);
    mesh.metric(workload, "meshgate_http_connections_parked", &[&label])
        .await
}

/// Waits until the gauge reads `want`; panics with what it read after 5 s.
async fn wait_parked(mesh: &TestMesh, workload: &str, listener: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = parked(mesh, workload, listener).await;
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{workload}'s {listener} listener has {now} parked connections, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// web and orders with `limits`, web allowed to call orders.
async fn mesh_with(limits: meshgate_proxy::serve::Limits) -> TestMesh {
    let mut mesh = TestMesh::new().await;
    mesh.limits = limits;
    mesh.write_policy("web.yaml", WEB_TO_ORDERS);
    mesh.add("orders").await;
    mesh.add("web").await;
    mesh.write_services();
    mesh.converge().await;
    mesh
}

fn parking() -> meshgate_proxy::serve::Limits {
    meshgate_proxy::serve::Limits {
        park: PARK,
        ..Default::default()
    }
}

/// An mTLS connection to orders' inbound listener as web, offering `alpn`.
async fn inbound_as_web(
    mesh: &TestMesh,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = mesh.client_as("web", TestMesh::id_of("orders"), alpn);
    let tcp = tokio::net::TcpStream::connect(mesh.workload("orders").sidecar.inbound_addr)
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(tls::mesh_server_name(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_pooled_connection_parks_and_resumes_in_order() {
    let mesh = mesh_with(parking()).await;
    let mut app = tokio::net::TcpStream::connect(mesh.workload("web").sidecar.outbound_addr)
        .await
        .unwrap();
    let first = get(&mut app, "/api/first").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.keeps_alive(), "{first:?}");
    wait_parked(&mesh, "web", "outbound", 1.0).await;

    // The parked connection answers its next request, on the same socket.
    let second = get(&mut app, "/api/second").await;
    assert_eq!(second.status, 200, "{second:?}");
    assert_eq!(second.echoed()["path"], "/api/second");
    assert!(second.keeps_alive(), "{second:?}");
    wait_parked(&mesh, "web", "outbound", 1.0).await;

    // Two pipelined requests in one write wake it: both answered, in order.
    app.write_all(
        b"GET /api/third HTTP/1.1\r\nHost: orders\r\n\r\nGET /api/fourth HTTP/1.1\r\nHost: orders\r\n\r\n",
    )
    .await
    .unwrap();
    let third = read_reply(&mut app).await;
    let fourth = read_reply(&mut app).await;
    assert_eq!(third.echoed()["path"], "/api/third");
    assert_eq!(fourth.echoed()["path"], "/api/fourth");
    wait_parked(&mesh, "web", "outbound", 1.0).await;

    // The client closing a parked connection frees it.
    drop(app);
    wait_parked(&mesh, "web", "outbound", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_is_neither_parked_nor_followed_by_a_close() {
    let mesh = mesh_with(parking()).await;
    let mut app = tokio::net::TcpStream::connect(mesh.workload("web").sidecar.outbound_addr)
        .await
        .unwrap();
    // The app answers after five park delays: the connection is quiet but busy all along (a
    // long poll).
    let slow = get(&mut app, "/slow/1000").await;
    assert_eq!(slow.status, 200, "{slow:?}");
    assert!(
        slow.keeps_alive(),
        "a connection with a request in flight was shut down: {slow:?}"
    );
    // A streamed answer that stops halfway: the head and a first part are written, then the
    // connection is quiet for five park delays with the body unfinished.
    let paused = get(&mut app, "/pause/1000").await;
    assert_eq!(paused.status, 200, "{paused:?}");
    assert_eq!(paused.body, "first\nsecond\n");
    let next = get(&mut app, "/api/next").await;
    assert_eq!(next.echoed()["path"], "/api/next");
    assert!(next.keeps_alive(), "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_connection_parks_and_a_head_split_across_the_quiet_arrives_whole() {
    let mesh = mesh_with(parking()).await;
    let mut peer = inbound_as_web(&mesh, &[b"http/1.1"]).await;
    let first = get(&mut peer, "/api/first").await;
    assert_eq!(first.status, 200, "{first:?}");
    wait_parked(&mesh, "orders", "inbound", 1.0).await;

    // Half a request head wakes the connection; it does not park again while the rest is
    // missing, so the head is not cut in two.
    peer.write_all(b"GET /api/split HTTP/1.1\r\nHo")
        .await
        .unwrap();
    wait_parked(&mesh, "orders", "inbound", 0.0).await;
    tokio::time::sleep(PARK * 4).await;
    assert_eq!(parked(&mesh, "orders", "inbound").await, 0.0);
    peer.write_all(b"st: orders\r\nX-Part: two\r\n\r\n")
        .await
        .unwrap();
    let split = read_reply(&mut peer).await;
    assert_eq!(split.status, 200, "{split:?}");
    let echoed = split.echoed();
    assert_eq!(echoed["path"], "/api/split");
    assert_eq!(echoed["headers"]["x-part"], "two");
    assert!(split.keeps_alive(), "{split:?}");
    wait_parked(&mesh, "orders", "inbound", 1.0).await;

    // A WebSocket upgrade on a connection that was parked: switched, and bytes flow both ways.
    peer.write_all(
        b"GET /api/ws HTTP/1.1\r\nHost: orders\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let switched = read_reply(&mut peer).await;
    assert_eq!(switched.status, 101, "{switched:?}");
    peer.write_all(b"ping over the upgraded connection")
        .await
        .unwrap();
    let mut echoed = [0u8; 33];
    tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut echoed))
        .await
        .expect("no echo on the upgraded connection")
        .unwrap();
    assert_eq!(&echoed, b"ping over the upgraded connection");
    // An upgraded connection is not HTTP any more: it is never parked.
    tokio::time::sleep(PARK * 3).await;
    assert_eq!(parked(&mesh, "orders", "inbound").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_obeys_the_idle_limit_and_the_drain() {
    let mesh = mesh_with(meshgate_proxy::serve::Limits {
        park: PARK,
        idle: Duration::from_millis(1500),
        ..Default::default()
    })
    .await;
    // Inbound: parked, then closed at the idle limit, and counted.
    let mut peer = inbound_as_web(&mesh, &[b"http/1.1"]).await;
    assert_eq!(get(&mut peer, "/api/x").await.status, 200);
    wait_parked(&mesh, "orders", "inbound", 1.0).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), peer.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the parked connection outlived the idle limit"
    );
    assert_eq!(parked(&mesh, "orders", "inbound").await, 0.0);
    let idle_closed = mesh
        .metric(
            "orders",
            "meshgate_inbound_hygiene_total",
            &[r#"reason="idle_timeout""#],
        )
        .await;
    assert_eq!(idle_closed, 1.0);

    let idle_closed = |listener: &'static str| {
        let mesh = &mesh;
        async move {
            let label = format!(r#"listener="{listener}""#);
            let workload = if listener == "inbound" {
                "orders"
            } else {
                "web"
            };
            mesh.metric(
                workload,
                "meshgate_http_connections_idle_closed_total",
                &[label.as_str()],
            )
            .await
        }
    };
    assert_eq!(idle_closed("inbound").await, 1.0);

    // Outbound: the app's pooled connection, parked, then closed at the same idle limit.
    let outbound = mesh.workload("web").sidecar.outbound_addr;
    let mut app = tokio::net::TcpStream::connect(outbound).await.unwrap();
    assert_eq!(get(&mut app, "/api/y").await.status, 200);
    wait_parked(&mesh, "web", "outbound", 1.0).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the app's parked connection outlived the idle limit"
    );
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(parked(&mesh, "web", "outbound").await, 0.0);
    assert_eq!(idle_closed("outbound").await, 1.0);

    // A connection the app opens and never uses is closed at the idle limit as well.
    let mut unused = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), unused.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a connection that never sent a byte outlived the idle limit"
    );
    assert_eq!(idle_closed("outbound").await, 2.0);

    // The drain closes a parked connection at once, well before its idle limit.
    let mut app = tokio::net::TcpStream::connect(outbound).await.unwrap();
    assert_eq!(get(&mut app, "/api/z").await.status, 200);
    wait_parked(&mesh, "web", "outbound", 1.0).await;
    mesh.workload("web").sidecar.shutdown();
    let closed = tokio::time::timeout(Duration::from_millis(900), app.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the parked connection outlived the drain");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_alpn_is_served_by_what_it_sends() {
    let mesh = mesh_with(parking()).await;
    let mut h1 = inbound_as_web(&mesh, &[]).await;
    assert_eq!(h1.get_ref().1.alpn_protocol(), None);
    let first = get(&mut h1, "/api/h1").await;
    assert_eq!(first.echoed()["version"], "HTTP/1.1", "{first:?}");
    wait_parked(&mesh, "orders", "inbound", 1.0).await;
    assert_eq!(
        get(&mut h1, "/api/again").await.echoed()["path"],
        "/api/again"
    );

    let h2 = inbound_as_web(&mesh, &[]).await;
    let (mut client, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(h2),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://orders/api/h2")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
}

/// Without ALPN, what decides the protocol may arrive a byte at a time. The sidecar keeps only
/// how much of the HTTP/2 preface has matched, so the bytes of each read must still reach the
/// server whole: a `POST` whose `P` came alone (a prefix of `PRI`) is answered as a `POST`,
/// and a preface split across three reads still starts HTTP/2 (the sidecar's SETTINGS frame
/// answers, not an HTTP/1.1 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_alpn_whose_first_bytes_arrive_apart_is_detected_all_the_same() {
    let mesh = mesh_with(parking()).await;
    // Apart: each write is its own TLS record, and the pause lets the sidecar read it alone.
    async fn send_apart<S: AsyncWrite + Unpin>(s: &mut S, parts: &[&[u8]]) {
        for part in parts {
            s.write_all(part).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let mut h1 = inbound_as_web(&mesh, &[]).await;
    send_apart(
        &mut h1,
        &[
            b"P",
            b"OST /api/split HTTP/1.1\r\nHost: orders\r\nContent-Length: 2\r\n\r\nok",
        ],
    )
    .await;
    let reply = read_reply(&mut h1).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.echoed()["method"], "POST", "{reply:?}");
    assert_eq!(reply.echoed()["path"], "/api/split", "{reply:?}");

    let mut h2 = inbound_as_web(&mesh, &[]).await;
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let empty_settings: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    send_apart(&mut h2, &[&preface[..3], &preface[3..16], &preface[16..]]).await;
    send_apart(&mut h2, &[empty_settings]).await;
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), h2.read_exact(&mut frame))
        .await
        .expect("the sidecar answered nothing to a split HTTP/2 preface")
        .unwrap();
    assert_eq!(
        frame[3],
        4,
        "the first frame is not SETTINGS: {:?}",
        String::from_utf8_lossy(&frame)
    );
}

/// A connection whose protocol the sidecar has to find out by its first bytes — the app's
/// connection to the outbound listener, a peer's mTLS connection without ALPN — must send them
/// within the header timeout, as an HTTP/1.1 request head must: one that sends nothing, or stops
/// in the middle of the HTTP/2 preface, is closed after 10 s and counted, not kept until the
/// idle limit (ten minutes by default) in its slot under the listener's cap.
///
/// Before: the detection read had no deadline of its own, and hyper's header timer starts only
/// once the protocol is known, so these connections stayed open for the idle limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_first_bytes_are_cut_off_at_the_header_timeout() {
    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
    type Stream = Box<dyn Io>;
    let mesh = mesh_with(meshgate_proxy::serve::Limits::default()).await;
    let outbound = mesh.workload("web").sidecar.outbound_addr;
    let app = || async move {
        Box::new(tokio::net::TcpStream::connect(outbound).await.unwrap()) as Stream
    };
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n";
    let trickled_head: &[u8] = b"GET /api/x HTTP/1.1\r\nHost: or";
    let mut clients: Vec<(&str, &str, Stream, &[u8])> = vec![
        ("outbound", "nothing", app().await, b""),
        (
            "outbound",
            "a trickled HTTP/2 preface",
            app().await,
            preface,
        ),
        (
            "outbound",
            "a trickled request head",
            app().await,
            trickled_head,
        ),
        (
            "inbound",
            "nothing, without ALPN",
            Box::new(inbound_as_web(&mesh, &[]).await),
            b"",
        ),
        (
            "inbound",
            "a trickled HTTP/2 preface, without ALPN",
            Box::new(inbound_as_web(&mesh, &[]).await),
            preface,
        ),
        (
            "inbound",
            "a trickled request head over http/1.1",
            Box::new(inbound_as_web(&mesh, &[b"http/1.1"]).await),
            trickled_head,
        ),
    ];
    let started = std::time::Instant::now();
    for (_, _, stream, first) in &mut clients {
        stream.write_all(first).await.unwrap();
        stream.flush().await.unwrap();
    }
    let waits = clients
        .into_iter()
        .map(|(listener, kind, mut stream, _)| async move {
            let mut got = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(25), stream.read_to_end(&mut got)).await;
            (listener, kind, closed.is_ok(), got, started.elapsed())
        });
    for (listener, kind, closed, got, waited) in futures_util::future::join_all(waits).await {
        assert!(
            closed,
            "{listener}: a client sending {kind} was still connected after 25 s: no deadline"
        );
        assert!(
            waited >= Duration::from_secs(8),
            "{listener}: the client sending {kind} was closed after {waited:?}, before the 10 s header timeout"
        );
        let text = String::from_utf8_lossy(&got);
        assert!(
            !text.contains(" 200 "),
            "{listener}: a client sending {kind} was answered: {text}"
        );
    }
    for (workload, listener) in [("web", "outbound"), ("orders", "inbound")] {
        let label = format!(r#"listener="{listener}""#);
        let counted = mesh
            .metric(
                workload,
                "meshgate_http_header_timeouts_total",
                &[label.as_str()],
            )
            .await;
        assert_eq!(counted, 3.0, "{listener}: header timeouts counted");
    }
    let hygiene = mesh
        .metric(
            "orders",
            "meshgate_inbound_hygiene_total",
            &[r#"reason="header_timeout""#],
        )
        .await;
    assert_eq!(hygiene, 3.0, "inbound hygiene: header_timeout");
    // Nothing was closed as idle: the header timeout did it.
    assert_eq!(
        mesh.metric("web", "meshgate_http_connections_idle_closed_total", &[])
            .await,
        0.0
    );
}
