//! The plaintext listeners that answer locally — a sidecar's admin endpoint and its health-probe
//! listener (bound on every address by default, so reachable by any pod), the control plane's
//! admin listener (status, metrics, console), and the demo app (`meshgate demo-app`, bound on
//! every address of its pod as an app is) — hold the same line as the mesh listeners: a client
//! that sends nothing or trickles a request head is cut off, connections are capped per listener
//! and per source address, and a request answered without its body being read gets its answer
//! rather than a reset (the connection lingers, reading and discarding the body).
//!
//! Before: each of them ran hyper's connection without a timer (no header-read timeout at all on
//! the probe and control-plane listeners), with no cap, so a few thousand silent connections
//! from anywhere in the cluster held the sidecar's file descriptors for ever; the demo app did
//! the same until the twenty-eighth session.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::mesh::{TestMesh, admin};

/// `meshgate demo-app` as its own process (the binary under test), killed on drop.
struct DemoAppProcess(std::process::Child);

impl DemoAppProcess {
    /// Starts the demo app on a free loopback port; returns it once it accepts connections.
    async fn start() -> (Self, SocketAddr) {
        let addr: SocketAddr = format!("127.0.0.1:{}", crate::support::free_port())
            .parse()
            .unwrap();
        let child = crate::support::meshgate()
            .args(["demo-app", "--name", "web", "--listen", &addr.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("meshgate demo-app starts");
        let app = Self(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "meshgate demo-app did not listen on {addr} within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (app, addr)
    }
}

impl Drop for DemoAppProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mesh with a control plane and one workload; the harness gives the workload's sidecar a
/// probe listener (`--probe-path /healthz`); and a demo app. Returns the four local listeners,
/// named.
async fn local_listeners() -> (TestMesh, DemoAppProcess, Vec<(&'static str, SocketAddr)>) {
    let mut mesh = TestMesh::new().await;
    mesh.start_control_plane().await;
    mesh.add("orders").await;
    mesh.write_services();
    let (app, app_addr) = DemoAppProcess::start().await;
    let sidecar = &mesh.workload("orders").sidecar;
    let listeners = vec![
        ("sidecar admin", sidecar.admin_addr),
        (
            "sidecar probes",
            sidecar.probe_addr.expect("probe listener bound"),
        ),
        (
            "control-plane admin",
            mesh.control_plane.as_ref().expect("started").admin_addr,
        ),
        ("demo app", app_addr),
    ];
    (mesh, app, listeners)
}

/// A path each listener answers `200` to once the mesh is up.
fn live_path(name: &str) -> &'static str {
    match name {
        "sidecar probes" => "/meshgate/live",
        "demo app" => "/",
        _ => "/live",
    }
}

/// Waits until `tcp` is closed by the listener (at most `limit`); what it sent before closing.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    match tokio::time::timeout(limit, tcp.read_to_end(&mut got)).await {
        Ok(_) => Some(got),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_clients_are_cut_off() {
    let (mesh, _app, listeners) = local_listeners().await;
    let started = Instant::now();
    let mut clients = Vec::new();
    for &(name, addr) in &listeners {
        // One that never sends, one that stops in the middle of its request head.
        let silent = TcpStream::connect(addr).await.unwrap();
        let mut trickling = TcpStream::connect(addr).await.unwrap();
        trickling
            .write_all(format!("GET {} HTTP/1.1\r\nHost: lo", live_path(name)).as_bytes())
            .await
            .unwrap();
        // And one kept alive after an answer, then silent.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(format!("GET {} HTTP/1.1\r\nHost: lo\r\n\r\n", live_path(name)).as_bytes())
            .await
            .unwrap();
        let mut first = [0u8; 12];
        kept.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200", "{name}");
        clients.push((name, "silent", silent));
        clients.push((name, "trickling", trickling));
        clients.push((name, "kept-alive", kept));
        if name == "demo app" {
            // It also speaks h2c, so it decides by the first bytes: one that stops in the
            // middle of the HTTP/2 connection preface.
            let mut preface = TcpStream::connect(addr).await.unwrap();
            preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
            clients.push((name, "trickling HTTP/2 preface", preface));
        }
    }
    let waits = clients.into_iter().map(|(name, kind, mut tcp)| async move {
        let got = closed_within(&mut tcp, Duration::from_secs(25)).await;
        (name, kind, got, started.elapsed())
    });
    for (name, kind, got, waited) in futures_util::future::join_all(waits).await {
        let got = got.unwrap_or_else(|| {
            panic!("{name}: a {kind} client was still connected after 25 s: no header timeout")
        });
        assert!(
            waited >= Duration::from_secs(8),
            "{name}: the {kind} client was closed after {waited:?}, before the 10 s header timeout"
        );
        let text = String::from_utf8_lossy(&got);
        assert!(
            kind == "kept-alive" || !text.contains(" 200 "),
            "{name}: a {kind} client was answered: {text}"
        );
    }
    // Counted where they are made (the demo app has no metrics): the sidecar's per listener,
    // the control plane's with its admin listener's refusals. The silent and the trickling
    // client on each; the kept-alive one was answered and sent nothing more, an idle close (a
    // metrics scraper's kept-alive connection is not a silent client).
    for listener in ["admin", "probes"] {
        let label = format!(r#"listener="{listener}""#);
        let counted = mesh
            .metric(
                "orders",
                "meshgate_http_header_timeouts_total",
                &[label.as_str()],
            )
            .await;
        assert_eq!(
            counted, 2.0,
            "the sidecar's {listener} listener's header timeouts"
        );
    }
    let (_, text) = admin(listeners[2].1, "GET", "/metrics").await;
    let counted = crate::support::mesh::sum_metric(
        &text,
        "meshgate_control_plane_admin_connections_refused_total",
        &[r#"reason="header_timeout""#],
    );
    assert_eq!(
        counted, 2.0,
        "the control plane's admin listener's header timeouts"
    );
    // The listeners still serve.
    for &(name, addr) in &listeners {
        let (status, body) = admin(addr, "GET", live_path(name)).await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    drop(mesh);
}

/// The demo app, served as the local listeners are, still speaks both protocols: HTTP/1.1, and
/// h2c with prior knowledge (as its sidecar does with `--app-protocol h2c`, and gRPC clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_app_speaks_http1_and_h2c() {
    let (_app, addr) = DemoAppProcess::start().await;
    for (flag, version) in [("--http1.1", "1.1"), ("--http2-prior-knowledge", "2")] {
        let url = format!("http://{addr}/hello");
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "10",
                    "-w",
                    "\n%{http_code} %{http_version}",
                ])
                .arg(flag)
                .arg(&url)
                .output()
                .expect("curl runs")
        })
        .await
        .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.ends_with(&format!("\n200 {version}")) && said.contains("\"path\":\"/hello\""),
            "curl {flag}: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_source() {
    let (mesh, _app, listeners) = local_listeners().await;
    let cap = meshgate_proxy::local_http::LOCAL_LIMITS.per_source;
    let extra = 40;
    for &(name, addr) in &listeners {
        let mut held = Vec::new();
        for _ in 0..cap + extra {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // Connections over the cap are closed at accept; the others stay open (until the
        // header timeout, far later than this).
        let mut refused = 0;
        for tcp in &mut held {
            if closed_within(tcp, Duration::from_millis(20))
                .await
                .is_some()
            {
                refused += 1;
            }
        }
        // Loopback clients are one source; a connection or two of the harness's own may be
        // open at the same moment.
        assert!(
            (extra - 3..=extra).contains(&refused),
            "{name}: {refused} of {} connections refused, expected {extra} over the cap of {cap}",
            cap + extra
        );
        drop(held);
        // The slots come back as soon as the held connections close.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "GET {} HTTP/1.1\r\nHost: lo\r\nConnection: close\r\n\r\n",
                live_path(name)
            );
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let _ = tcp.read_to_end(&mut got).await;
            if String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: still refusing 5 s after the held connections closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Counted where they are made: the sidecar's refusals in its metrics, the control plane's
    // in its own.
    let metrics = mesh.metric(
        "orders",
        "meshgate_inbound_hygiene_total",
        &["source_connection_limit"],
    );
    assert!(
        metrics.await >= (2 * (extra - 3)) as f64,
        "the sidecar counts the refusals of its admin and probe listeners"
    );
    let cp_admin = listeners[2].1;
    let (_, text) = admin(cp_admin, "GET", "/metrics").await;
    let counted = crate::support::mesh::sum_metric(
        &text,
        "meshgate_control_plane_admin_connections_refused_total",
        &["source_connection_limit"],
    );
    assert!(
        counted >= (extra - 3) as f64,
        "the control plane counts its admin listener's refusals: {counted}"
    );
}

/// An upload to an endpoint that does not take one is answered with its status, not reset: the
/// listener answers without reading the body, so it must go on reading (and discarding) what
/// the client still sends before it closes. The client is Python's `http.client`, which, like
/// most scripts' clients, sends the whole body before it reads the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_to_local_endpoints_get_their_answer() {
    let (_mesh, _app, listeners) = local_listeners().await;
    const CLIENT: &str = r#"
import http.client, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = http.client.HTTPConnection(host, port, timeout=20)
try:
    conn.request("POST", path, body=b"x" * (8 << 20))
    print(conn.getresponse().status)
except OSError as e:
    print(type(e).__name__, e)
"#;
    for &(name, addr) in &listeners {
        let (path, expected) = match name {
            "sidecar probes" => ("/healthz", "405"),
            // The demo app answers every path with what it saw.
            "demo app" => ("/status-nowhere", "200"),
            _ => ("/status-nowhere", "404"),
        };
        for round in 0..3 {
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new("python3")
                    .args(["-c", CLIENT])
                    .arg(addr.ip().to_string())
                    .arg(addr.port().to_string())
                    .arg(path)
                    .output()
                    .expect("python3 runs")
            })
            .await
            .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                said.trim(),
                expected,
                "{name}, round {round}: the client got no answer: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
