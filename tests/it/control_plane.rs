//! The control plane end to end: policies and services streamed to real sidecars over mTLS,
//! updates applied and ACKed, invalid updates refused at the control plane while the last good
//! version stays enforced, sidecars keeping their snapshot while it is gone and reconverging when
//! it is back, per-identity scoping, and no stream without a valid SVID.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::support::mesh::TestMesh;
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_ca::tls::{self, ExpectedServer};
use meshgate_xds::client::StreamClient;
use meshgate_xds::wire::LineBuffer;
use tokio::sync::mpsc;

fn orders_policy(methods: &str) -> String {
    format!(
        r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: orders-readers, namespace: shop }}
spec:
  selector: {{ account: orders }}
  action: ALLOW
  rules:
    - from: [{{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }}]
      to: [{{ methods: [{methods}], paths: ["/orders/*"] }}]
"#
    )
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_flow_from_the_control_plane_and_survive_its_loss() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.start_control_plane().await;
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    let v1 = mesh.converge().await;
    assert_eq!(
        mesh.call("web", "GET", "orders", "/orders/1").await.status,
        200
    );
    assert_eq!(
        mesh.call("web", "POST", "orders", "/orders/1").await.status,
        403
    );

    // Every sidecar ACKed the served version.
    let mesh_ref = &mesh;
    wait_until("both sidecars ACK", async || {
        let status = mesh_ref.cp_status().await;
        let sidecars = status["sidecars"].as_array().unwrap().clone();
        sidecars.len() == 2
            && sidecars
                .iter()
                .all(|s| s["acked_version"] == v1.as_str() && s["in_sync"] == true)
    })
    .await;

    // `meshgate status` shows every sidecar in sync.
    let admin_url = format!("http://{}", mesh.control_plane.as_ref().unwrap().admin_addr);
    let mut cmd = meshgate();
    cmd.args(["status", "--control-plane", &admin_url]);
    let out = run_async(cmd).await;
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("policy version served: {v1}")),
        "{shown}"
    );
    for who in ["web", "orders"] {
        let line = shown
            .lines()
            .find(|l| l.contains(&format!("sa/{who} ")))
            .unwrap_or_else(|| panic!("{shown}"));
        assert!(
            line.contains("connected") && line.contains(&v1) && line.contains("yes"),
            "{line}"
        );
    }

    // A change is pushed and enforced.
    mesh.write_policy("orders.yaml", &orders_policy(r#""GET", "POST""#));
    let v2 = mesh.converge().await;
    assert_ne!(v1, v2);
    assert_eq!(
        mesh.call("web", "POST", "orders", "/orders/1").await.status,
        200
    );

    // An invalid change is refused at the control plane; v2 stays served and enforced.
    mesh.write_policy("broken.yaml", "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: { name: x, namespace: shop }\nspec:\n  action: PERMIT\n");
    wait_until("the control plane refuses the update", async || {
        mesh_ref.cp_status().await["last_rejected"].is_string()
    })
    .await;
    let status = mesh.cp_status().await;
    assert_eq!(status["version"], v2.as_str());
    assert!(
        status["last_rejected"]
            .as_str()
            .unwrap()
            .contains("broken.yaml:"),
        "{status}"
    );
    assert_eq!(
        mesh.call("web", "POST", "orders", "/orders/1").await.status,
        200
    );
    assert_eq!(
        mesh.call("web", "DELETE", "orders", "/orders/1")
            .await
            .status,
        403
    );
    std::fs::remove_file(mesh.policy_dir.join("broken.yaml")).unwrap();

    // The control plane goes away: the last snapshot stays in force (allow stays allow, deny
    // stays deny) and the sidecars report staleness.
    mesh.stop_control_plane().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        mesh.call("web", "POST", "orders", "/orders/1").await.status,
        200
    );
    assert_eq!(
        mesh.call("web", "DELETE", "orders", "/orders/1")
            .await
            .status,
        403
    );
    let stale = mesh
        .metric("orders", "meshgate_policy_stale_seconds", &[])
        .await;
    let up = mesh
        .metric("orders", "meshgate_control_plane_connected", &[])
        .await;
    assert!(stale >= 1.0, "stale {stale}, connected {up}");
    assert_eq!(
        mesh.metric("orders", "meshgate_control_plane_connected", &[])
            .await,
        0.0
    );

    // It comes back on the same address: sidecars reconnect by themselves and ACK.
    mesh.start_control_plane().await;
    let mesh_ref = &mesh;
    wait_until("sidecars reconnect and ACK", async || {
        let status = mesh_ref.cp_status().await;
        let connected: Vec<_> = status["sidecars"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["connected"] == true)
            .cloned()
            .collect();
        connected.len() == 2 && connected.iter().all(|s| s["acked_version"] == v2.as_str())
    })
    .await;
    assert_eq!(
        mesh.metric("orders", "meshgate_control_plane_connected", &[])
            .await,
        1.0
    );
    mesh.write_policy("orders.yaml", &orders_policy(r#""GET""#));
    mesh.converge().await;
    assert_eq!(
        mesh.call("web", "POST", "orders", "/orders/1").await.status,
        403,
        "updates flow again"
    );
}

/// Connects a raw stream client with `svid` and returns the first pushed set.
async fn first_push(
    url: String,
    mesh: &TestMesh,
    svid: &Svid,
) -> Result<meshgate_policy::PolicySet, String> {
    let config = crate::support::mesh_client(
        mesh.ca.bundle(),
        svid,
        meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/meshgate/sa/control-plane").unwrap(),
        &[b"h2"],
    );
    let client = StreamClient::new(&[&url], config).map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(client.run(
        move |set| {
            let _ = tx.send(set);
            Ok(())
        },
        |_| {},
        Duration::from_millis(100),
        Duration::from_millis(200),
    ));
    let got = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await;
    task.abort();
    got.ok()
        .flatten()
        .ok_or_else(|| "no push received".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sidecar_gets_only_its_own_resources_and_needs_a_valid_svid() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.write_policy(
        "web.yaml",
        "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: { name: web-public, namespace: shop }\nspec:\n  selector: { account: web }\n  action: ALLOW\n  rules: [{}]\n",
    );
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.add("payments").await;
    mesh.write_services();
    mesh.start_control_plane().await;
    let url = format!("https://{}", mesh.control_plane.as_ref().unwrap().addr);
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);

    // web's view: its own policy only, and every Service (routes to Services it may not call
    // let their sidecars deny it with a logged 403 instead of an opaque local 502).
    let web = mesh
        .ca
        .sign_leaf(&TestMesh::id_of("web"), now - hour, now + hour);
    let view = first_push(url.clone(), &mesh, &web).await.unwrap();
    let names: Vec<_> = view
        .policies
        .iter()
        .map(|p| p.metadata.name.as_str())
        .collect();
    assert_eq!(names, ["web-public"], "web never sees orders' policy");
    let mut services: Vec<_> = view
        .services
        .iter()
        .map(|s| s.metadata.name.as_str())
        .collect();
    services.sort();
    assert_eq!(services, ["orders", "payments", "web"]);
    // orders' view: its own policy, and not web's.
    let orders = mesh
        .ca
        .sign_leaf(&TestMesh::id_of("orders"), now - hour, now + hour);
    let view = first_push(url.clone(), &mesh, &orders).await.unwrap();
    let names: Vec<_> = view
        .policies
        .iter()
        .map(|p| p.metadata.name.as_str())
        .collect();
    assert_eq!(names, ["orders-readers"]);

    // No valid SVID, no stream: a foreign CA's certificate for web's very ID, an expired one.
    let foreign = TestCa::init().sign_leaf(&TestMesh::id_of("web"), now - hour, now + hour);
    assert!(
        first_push(url.clone(), &mesh, &foreign).await.is_err(),
        "foreign CA refused"
    );
    let expired = mesh
        .ca
        .sign_leaf(&TestMesh::id_of("web"), now - 2 * hour, now - hour);
    assert!(
        first_push(url.clone(), &mesh, &expired).await.is_err(),
        "expired SVID refused"
    );
    // And no client certificate at all.
    let anonymous = tls::mesh_client_config(
        Arc::new(arc_swap::ArcSwap::from_pointee(mesh.ca.bundle())),
        ExpectedServer::Exact(
            meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/meshgate/sa/control-plane")
                .unwrap(),
        ),
        None,
        &[b"h2"],
    );
    let client = StreamClient::new(&[&url], Arc::new(anonymous)).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let task = tokio::spawn(client.run(
        move |_| {
            let _ = tx.send(());
            Ok(())
        },
        |_| {},
        Duration::from_millis(100),
        Duration::from_millis(200),
    ));
    assert!(
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .is_err(),
        "no push without a client certificate"
    );
    task.abort();
}

#[test]
fn status_command_reports_an_unreachable_control_plane() {
    // With or without a scheme: it says where it looked and how to point elsewhere.
    let port = free_port();
    for given in [
        format!("http://127.0.0.1:{port}"),
        format!("127.0.0.1:{port}"),
    ] {
        let out = run(meshgate().args(["status", "--control-plane", &given]));
        assert!(!out.status.success());
        let said = text(&out);
        assert!(
            said.contains(&format!(
                "no control plane status at http://127.0.0.1:{port}/status"
            )),
            "{said}"
        );
        assert!(said.contains("--control-plane HOST:PORT"), "{said}");
        assert!(!said.contains("invalid URL"), "{said}");
    }
}

/// Commands linkerd and istioctl users type first point to ours instead of clap's guess
/// (`proxy-status` → "a similar subcommand exists: 'proxy'").
#[test]
fn familiar_commands_from_other_meshes_point_to_ours() {
    for (typed, ours) in [
        (vec!["proxy-status"], "meshgate status"),
        (
            vec!["--log-format", "json", "authz"],
            "meshgate policy explain",
        ),
        (vec!["viz"], "meshgate dashboard"),
    ] {
        let out = run(meshgate().args(&typed));
        assert_eq!(out.status.code(), Some(2), "{typed:?}");
        let said = text(&out);
        assert!(said.contains(ours), "{typed:?}: {said}");
        assert!(!said.contains("similar subcommand"), "{typed:?}: {said}");
    }
}

/// PROTOCOL.md promises a stream can be watched with curl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_can_watch_a_stream() {
    require_tool("curl");
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.start_control_plane().await;
    let now = time::OffsetDateTime::now_utc();
    let orders = mesh.ca.sign_leaf(
        &TestMesh::id_of("orders"),
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    );
    let dir = mesh.ca.tmp.path().join("curl");
    std::fs::create_dir_all(&dir).unwrap();
    write_chain(&dir.join("svid.pem"), &orders.chain);
    std::fs::write(dir.join("key.pem"), orders.key.serialize_pem()).unwrap();
    let mut curl = std::process::Command::new("curl");
    curl.args(["--http2", "-sN", "-k", "--max-time", "2", "--cert"])
        .arg(dir.join("svid.pem"))
        .arg("--key")
        .arg(dir.join("key.pem"))
        .args([
            "-X",
            "POST",
            "-H",
            "content-type: application/x-ndjson",
            "--data-binary",
            "@/dev/null",
        ])
        .arg(format!(
            "https://{}/v1/stream",
            mesh.control_plane.as_ref().unwrap().addr
        ));
    let out = run_async(curl).await;
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let push: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(push["typeUrl"], "meshgate.dev/v1/WorkloadSnapshot");
    assert_eq!(
        push["resources"]["policies"][0]["metadata"]["name"],
        "orders-readers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_cuts_an_identity_off_everywhere_and_lifts() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.start_control_plane().await;
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.converge().await;
    assert_eq!(
        mesh.call("web", "GET", "orders", "/orders/1").await.status,
        200
    );
    let admin_url = format!("http://{}", mesh.control_plane.as_ref().unwrap().admin_addr);
    let web = TestMesh::id_of("web").to_string();

    let mut cmd = meshgate();
    cmd.args([
        "quarantine",
        &web,
        "--control-plane",
        &admin_url,
        "--policy-dir",
    ])
    .arg(&mesh.policy_dir);
    let out = run_async(cmd).await;
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("contained in") && shown.contains("2/2 acknowledging sidecars"),
        "{shown}"
    );
    eprintln!("{}", shown.lines().last().unwrap_or_default());
    assert_eq!(
        mesh.call("web", "GET", "orders", "/orders/1").await.status,
        403,
        "web is cut off"
    );

    let mut cmd = meshgate();
    cmd.args([
        "quarantine",
        &web,
        "--lift",
        "--control-plane",
        &admin_url,
        "--policy-dir",
    ])
    .arg(&mesh.policy_dir);
    let out = run_async(cmd).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        mesh.call("web", "GET", "orders", "/orders/1").await.status,
        200,
        "lifted"
    );
}

/// A sidecar that cannot apply a version NACKs it: the control plane records the NACK for
/// `meshgate status` and never re-sends that version, only a newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_version_is_recorded_and_not_retried() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.start_control_plane().await;
    let url = format!("https://{}", mesh.control_plane.as_ref().unwrap().addr);
    let cp = meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/meshgate/sa/control-plane");
    let config = mesh.client_as("orders", cp.unwrap(), &[b"h2"]);
    let client = StreamClient::new(&[&url], config).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let task = tokio::spawn(client.run(
        move |set| {
            let _ = tx.send(set.version.clone());
            Err(format!("cannot apply {}", set.version))
        },
        |_| {},
        Duration::from_millis(100),
        Duration::from_millis(200),
    ));
    let first = tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let mesh_ref = &mesh;
    wait_until("the NACK is recorded", async || {
        mesh_ref.cp_status().await["sidecars"][0]["last_nack"]
            .as_str()
            .is_some_and(|n| n.contains("cannot apply"))
    })
    .await;
    let status = mesh.cp_status().await;
    assert!(status["sidecars"][0]["acked_version"].is_null());
    assert_eq!(status["sidecars"][0]["in_sync"], false);
    // Not re-sent: nothing more arrives until a new version exists.
    assert!(
        tokio::time::timeout(Duration::from_millis(800), rx.recv())
            .await
            .is_err(),
        "NACKed version re-sent"
    );
    mesh.write_policy("orders.yaml", &orders_policy(r#""GET", "HEAD""#));
    let second = tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(first, second, "only a newer version is pushed");
    task.abort();
}

/// A stream client that is no sidecar: it connects with a valid SVID, collects the pushes, and
/// sends only the lines the test writes (nothing at all unless told to).
struct RawStream {
    pushes: mpsc::UnboundedReceiver<serde_json::Value>,
    lines: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    /// The HTTP/2 client, kept so the connection stays open.
    _http: Box<dyn std::any::Any + Send>,
}

impl RawStream {
    async fn open(mesh: &TestMesh, name: &str) -> Self {
        let cp = meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/meshgate/sa/control-plane");
        let config = mesh.client_as(name, cp.unwrap(), &[b"h2"]);
        let addr = mesh.control_plane.as_ref().unwrap().addr;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(tls::mesh_server_name(), tcp)
            .await
            .unwrap();
        let (mut http, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let (lines, mut rx) = mpsc::channel(4);
        let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let req = http::Request::post(format!("https://{addr}/v1/stream"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .unwrap();
        let resp = http.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let (tx, pushes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buffer = LineBuffer::default();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    for line in buffer.push(data, 1 << 24).unwrap() {
                        let _ = tx.send(serde_json::from_slice(&line).unwrap());
                    }
                }
            }
        });
        Self {
            pushes,
            lines,
            _http: Box::new(http),
        }
    }

    async fn next_push(&mut self) -> serde_json::Value {
        tokio::time::timeout(Duration::from_secs(5), self.pushes.recv())
            .await
            .expect("a push within 5 s")
            .expect("stream open")
    }

    async fn send_line(&self, json: serde_json::Value) {
        let mut line = serde_json::to_vec(&json).unwrap();
        line.push(b'\n');
        self.lines
            .send(Ok(Frame::data(Bytes::from(line))))
            .await
            .unwrap();
    }
}

/// A workload with an SVID that opens a stream and never ACKs neither fails `meshgate status`
/// nor makes `meshgate quarantine` report a failed containment: it is listed as not
/// acknowledging, and containment is judged on the sidecars that do acknowledge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_acks_is_reported_and_does_not_block_containment() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.start_control_plane().await;
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.converge().await;
    let mut rogue = RawStream::open(&mesh, "rogue").await;
    rogue.next_push().await;
    let admin_url = format!("http://{}", mesh.control_plane.as_ref().unwrap().admin_addr);
    let rogue_id = TestMesh::id_of("rogue").to_string();

    let mut cmd = meshgate();
    cmd.args(["status", "--control-plane", &admin_url]);
    let out = run_async(cmd).await;
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("not acknowledging: {rogue_id} (connected ")),
        "{shown}"
    );
    assert!(shown.contains("last ack never"), "{shown}");

    let web = TestMesh::id_of("web").to_string();
    let mut cmd = meshgate();
    cmd.args([
        "quarantine",
        &web,
        "--timeout",
        "10s",
        "--control-plane",
        &admin_url,
        "--policy-dir",
    ])
    .arg(&mesh.policy_dir);
    let out = run_async(cmd).await;
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("contained in") && shown.contains("2/2 acknowledging sidecars"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("not acknowledging: {rogue_id} (connected ")),
        "{shown}"
    );
    // The rogue stream was sent the quarantine too; it just never said so.
    let push = rogue.next_push().await;
    assert!(push.to_string().contains("quarantine-"), "{push}");
    assert_eq!(
        mesh.call("web", "GET", "orders", "/orders/1").await.status,
        403,
        "web is cut off by the real sidecars"
    );
}

/// Log lines written in this test binary (every test's, at WARN and above, plain text as
/// `meshgate` writes them by default).
fn captured_logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct Writer(&'static Mutex<Vec<u8>>);
        impl std::io::Write for Writer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Writer(logs))
            .init();
        logs
    })
}

/// A NACK whose error text carries a newline and a forged JSON log record stays one log line,
/// with the newline escaped; `meshgate status` shows it escaped too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_cannot_forge_log_lines() {
    let logs = captured_logs();
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.start_control_plane().await;
    let mut stream = RawStream::open(&mesh, "orders").await;
    let push = stream.next_push().await;
    let forged =
        "nack-7f3a\n{\"event\":\"control_plane.ack\",\"peer.id\":\"forged-7f3a\"}\r\u{1b}[2K";
    stream
        .send_line(serde_json::json!({
            "nonce": push["nonce"],
            "version": push["version"],
            "error": forged,
        }))
        .await;
    let mesh_ref = &mesh;
    wait_until("the NACK is recorded", async || {
        mesh_ref.cp_status().await["sidecars"][0]["last_nack"]
            .as_str()
            .is_some_and(|n| n.contains("nack-7f3a"))
    })
    .await;
    let status = mesh.cp_status().await;
    let kept = status["sidecars"][0]["last_nack"].as_str().unwrap();
    assert!(!kept.chars().any(char::is_control), "{kept:?}");
    assert!(kept.contains(r#"nack-7f3a\n{"event""#), "{kept:?}");

    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("7f3a")).collect();
    assert_eq!(lines.len(), 1, "one log line for the NACK: {lines:#?}");
    assert!(lines[0].contains("control_plane.nack"), "{}", lines[0]);
    assert!(
        lines[0].contains(r#"nack-7f3a\n{"event":"control_plane.ack""#),
        "newline escaped: {}",
        lines[0]
    );
    assert!(!lines[0].contains('\u{1b}'), "{}", lines[0]);
}

/// An oversize policy file (valid YAML, 5 MiB) is refused at the control plane with its name
/// and the limit; the last good version stays served and enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_policy_file_is_refused_and_the_last_good_version_stays() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.start_control_plane().await;
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    let good = mesh.converge().await;
    let padding = format!("# {}\n", "x".repeat(1023)).repeat(5 * 1024);
    mesh.write_policy(
        "huge.yaml",
        &format!(
            "{}{padding}",
            orders_policy(r#""GET", "POST""#).replace("orders-readers", "huge")
        ),
    );
    let mesh_ref = &mesh;
    wait_until("the control plane refuses the update", async || {
        mesh_ref.cp_status().await["last_rejected"].is_string()
    })
    .await;
    let status = mesh.cp_status().await;
    let reason = status["last_rejected"].as_str().unwrap();
    assert!(
        reason.contains("huge.yaml: policy file is 5.0 MiB, larger than the 4 MiB limit; split it"),
        "{reason}"
    );
    assert_eq!(status["version"], good.as_str());
    assert_eq!(
        mesh.call("web", "POST", "orders", "/orders/1").await.status,
        403,
        "the refused file's ALLOW is not in force"
    );
    assert_eq!(
        mesh.call("web", "GET", "orders", "/orders/1").await.status,
        200
    );
}

/// A sidecar refuses a push over the 16 MiB limit without buffering it whole: it logs why,
/// closes the stream and keeps the policy it had (a stand-in control plane sends a valid push,
/// then an endless 17 MiB line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_refuses_an_oversize_push_and_keeps_its_policy() {
    let logs = captured_logs();
    let mesh = TestMesh::new().await;
    let cp_id =
        meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/meshgate/sa/control-plane").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let cp_svid = mesh.ca.sign_leaf(&cp_id, now - hour, now + hour);
    let resolver = Arc::new(tls::CertResolver::default());
    resolver
        .publish(
            cp_svid.chain.clone(),
            rustls_pki_types::PrivatePkcs8KeyDer::from(cp_svid.key.serialize_der()).into(),
        )
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut good_set = meshgate_policy::PolicySet::default();
    good_set.update_version();
    let good_version = good_set.version.clone();
    let mut good =
        serde_json::to_vec(&meshgate_xds::wire::Push::new(good_set, "n1".into())).unwrap();
    good.push(b'\n');
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
            .accept(tcp)
            .await
            .unwrap();
        let service = hyper::service::service_fn(move |_req| {
            let good = Bytes::from(good.clone());
            async move {
                let mut frames = vec![good];
                frames.extend((0..17).map(|_| Bytes::from(vec![b'x'; 1024 * 1024])));
                let stream = futures_util::stream::iter(
                    frames
                        .into_iter()
                        .map(|b| Ok::<_, Infallible>(Frame::data(b))),
                );
                Ok::<_, Infallible>(http::Response::new(StreamBody::new(stream)))
            }
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), service)
            .await;
        // Keep the listener (and so the port) until the test ends.
        std::future::pending::<()>().await;
        drop(listener);
    });

    let svid = mesh
        .ca
        .sign_leaf(&TestMesh::id_of("orders"), now - hour, now + hour);
    let client_config = crate::support::mesh_client(mesh.ca.bundle(), &svid, cp_id, &[b"h2"]);
    let client = StreamClient::new(&[format!("https://{addr}")], client_config).unwrap();
    let (tx, mut applied) = mpsc::unbounded_channel::<String>();
    let task = tokio::spawn(client.run(
        move |set| {
            let _ = tx.send(set.version.clone());
            Ok(())
        },
        |_| {},
        Duration::from_secs(30),
        Duration::from_secs(30),
    ));
    let first = tokio::time::timeout(Duration::from_secs(5), applied.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, good_version);
    wait_until("the sidecar refuses the oversize push", async || {
        String::from_utf8_lossy(&logs.lock().unwrap()).contains("16 MiB snapshot limit")
    })
    .await;
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("16 MiB snapshot limit"))
        .unwrap();
    assert!(
        line.contains("the last good policy stays in force"),
        "{line}"
    );
    assert!(
        applied.try_recv().is_err(),
        "nothing but the first push was applied"
    );
    task.abort();
}

/// `meshgate check` against a running mesh: CA reachable and proving its identity, trust bundle
/// valid, control plane serving, sidecars in sync — and ✖ lines with the fix when it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_healthy_mesh_and_names_the_fix_otherwise() {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.start_control_plane().await;
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.converge().await;
    let admin = mesh.control_plane.as_ref().unwrap().admin_addr.to_string();
    let mut cmd = meshgate();
    cmd.args([
        "check",
        "--skip-host",
        "--control-plane",
        &admin,
        "--ca",
        &mesh.ca.url(),
        "--ca-bundle",
    ])
    .arg(mesh.ca.path("bundle.pem"));
    let out = run_async(cmd).await;
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    for line in [
        "✔ trust bundle: ",
        "answers and proves its identity against the bundle",
        "✔ clock within ",
        "✔ control plane serving policy version",
        "✔ 2 connected sidecars in sync",
        "✔ 2 connected sidecars hold SVIDs renewed on time",
        "all checks passed",
    ] {
        assert!(shown.contains(line), "missing {line:?} in\n{shown}");
    }
    assert!(!shown.contains('✖'), "{shown}");

    // Nothing listening, and a bundle that is not the CA's: ✖ with the fix, exit 1.
    let other = TestCa::init();
    let mut cmd = meshgate();
    cmd.args([
        "check",
        "--skip-host",
        "--control-plane",
        &format!("127.0.0.1:{}", free_port()),
        "--ca",
        &mesh.ca.url(),
        "--ca-bundle",
    ])
    .arg(other.path("bundle.pem"));
    let out = run_async(cmd).await;
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert_eq!(shown.matches('✖').count(), 2, "{shown}");
    assert_eq!(shown.matches("    fix: ").count(), 2, "{shown}");
    assert!(shown.contains("is --ca-bundle its bundle.pem?"), "{shown}");
}

/// `meshgate check` on this host: one ✔/✖/ℹ line per check, a fix under every ✖.
#[test]
fn check_reports_on_this_host() {
    let out = run(meshgate().arg("check"));
    let shown = text(&out);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.first(), Some(&"this host:"), "{shown}");
    for what in [
        "kernel ",
        "privileges for eBPF",
        "cgroup v2",
        "bpffs",
        "kernel BTF",
        "Docker",
    ] {
        assert!(
            lines.iter().any(
                |l| (l.starts_with('✔') || l.starts_with('✖') || l.starts_with('ℹ'))
                    && l.contains(what)
            ),
            "no line about {what:?} in\n{shown}"
        );
    }
    let failed = lines.iter().filter(|l| l.starts_with('✖')).count();
    assert_eq!(shown.matches("    fix: ").count(), failed, "{shown}");
    assert_eq!(out.status.success(), failed == 0, "{shown}");
}

/// A sidecar reopens its control-plane stream with each renewed SVID, so the control plane
/// always knows the SVID in use; when renewals stop (the CA is gone), `meshgate check` names the
/// sidecars whose SVIDs are about to expire unrenewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_follow_renewals_and_check_flags_overdue_svids() {
    const TTL: Duration = Duration::from_secs(8);
    let mut mesh = TestMesh::with_svid_ttl(TTL).await;
    mesh.write_policy("orders.yaml", &orders_policy("GET"));
    mesh.start_control_plane().await;
    mesh.add("web").await;
    mesh.converge().await;
    let svid_of_stream = |status: &serde_json::Value| {
        status["sidecars"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["connected"].as_bool() == Some(true))
            .filter_map(|s| s["svid_not_after"].as_i64())
            .max()
    };
    let first = svid_of_stream(&mesh.cp_status().await).expect("a connected stream");
    // Renewal at 40–50 % of 8 s: the stream is reopened with the new SVID.
    let renewed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now = svid_of_stream(&mesh.cp_status().await);
            if now.is_some_and(|n| n > first) {
                return now.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the stream is reopened with the renewed SVID");
    assert!(renewed > first);
    // Reopened at the renewal, not only when the old SVID expired and the control plane closed
    // the stream.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        now < first - 1,
        "the stream was reopened only at the old SVID's expiry (now {now}, expiry {first})"
    );

    let check = |mesh: &TestMesh| {
        let mut cmd = meshgate();
        cmd.args(["check", "--skip-host", "--control-plane"])
            .arg(mesh.control_plane.as_ref().unwrap().admin_addr.to_string());
        cmd
    };
    let out = run_async(check(&mesh)).await;
    let shown = text(&out);
    assert!(
        shown.contains("✔ 1 connected sidecars hold SVIDs renewed on time"),
        "{shown}"
    );

    // The CA goes away: renewals fail, and past three quarters of the SVID's life check says so.
    mesh.ca.stop().await;
    let flagged = tokio::time::timeout(TTL, async {
        loop {
            let out = run_async(check(&mesh)).await;
            let shown = text(&out);
            if shown.contains("✖ SVIDs about to expire unrenewed: spiffe://") {
                return (out.status.code(), shown);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await
    .expect("check flags the SVID before it expires");
    assert_eq!(flagged.0, Some(1), "{}", flagged.1);
    assert!(
        flagged.1.contains("/identity"),
        "the fix names where to look: {}",
        flagged.1
    );
}

/// A request the control plane's stream port refuses (anything but `POST /v1/stream`) while its
/// body is still on its way is answered, not reset: over HTTP/1.1 the connection lingers,
/// reading and discarding the body, before it closes. hyper's client, like a sidecar's, writes
/// the body while it waits for the answer and fails on a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_on_the_stream_port_gets_its_answer() {
    let mut mesh = TestMesh::new().await;
    mesh.start_control_plane().await;
    let addr = mesh.control_plane.as_ref().unwrap().addr;
    let cp = meshgate_ca::SpiffeId::parse("spiffe://mesh.local/ns/meshgate/sa/control-plane");
    let config = mesh.client_as("orders", cp.unwrap(), &[b"http/1.1"]);
    for round in 0..3 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(tls::mesh_server_name(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post("/v1/nowhere")
            .header("host", "control-plane")
            .body(http_body_util::Full::new(Bytes::from(vec![b'x'; 8 << 20])))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
            .await
            .expect("answered within 20 s");
        let status = resp
            .unwrap_or_else(|e| panic!("round {round}: no answer, the connection failed: {e:?}"))
            .status();
        assert_eq!(status, 404, "round {round}");
    }
}
