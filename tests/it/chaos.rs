//! Bounded chaos: parts of the mesh fail while traffic flows, and the tests check what callers
//! see. A CA outage longer than half an SVID's lifetime (then one that outlives the SVID), the
//! control plane stopped and restarted mid-load, a callee's `meshgate proxy` process killed with
//! SIGKILL and restarted on the same ports, and a thousand policy swaps under load.
//!
//! Every wait polls a condition with a deadline and every request has a time limit, so a hang is
//! a failure, not a stuck test. Everything listens on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::mesh::{EchoApp, TestMesh, admin};
use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_proxy::identity::IdentityStatus;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;

/// Longest any single request may take: longer counts as a hang and fails the test.
const REQUEST_LIMIT: Duration = Duration::from_secs(4);

/// `web` may read `/orders/*` on `orders`; everything else (`/admin/*` included) is denied.
fn readers(paths: &[&str]) -> String {
    let paths: Vec<String> = paths.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: readers, namespace: shop }}
spec:
  selector: {{ account: orders }}
  action: ALLOW
  rules:
    - from: [{{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }}]
      to: [{{ paths: [{}] }}]
"#,
        paths.join(", ")
    )
}

/// One request through a sidecar's outbound listener, on a new connection. `Err` = no HTTP
/// answer (connection refused or reset, or nothing within [`REQUEST_LIMIT`]).
async fn try_call(outbound: SocketAddr, host: &str, path: &str) -> Result<u16, String> {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(outbound)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        Ok(status)
    };
    tokio::time::timeout(REQUEST_LIMIT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("HANG: no answer within {REQUEST_LIMIT:?}")))
}

/// One request of a load run.
#[derive(Debug, Clone)]
struct Outcome {
    /// Wall clock at the start (comparable with certificate validity).
    wall: OffsetDateTime,
    started: Instant,
    done: Instant,
    path: &'static str,
    result: Result<u16, String>,
}

/// Callers sending requests back to back through one outbound listener until finished; caller
/// `i` cycles through `paths[i]`. Outcomes can be inspected while the load runs.
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    callers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(outbound: SocketAddr, host: &'static str, paths: &[&[&'static str]]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let callers = paths
            .iter()
            .map(|&paths| {
                let (stop, outcomes, paths) = (stop.clone(), outcomes.clone(), paths.to_vec());
                tokio::spawn(async move {
                    for path in paths.into_iter().cycle() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let (wall, started) = (OffsetDateTime::now_utc(), Instant::now());
                        let result = try_call(outbound, host, path).await;
                        let failed = result != Ok(200);
                        outcomes.lock().unwrap().push(Outcome {
                            wall,
                            started,
                            done: Instant::now(),
                            path,
                            result,
                        });
                        // Failures come back fast; pace them so a gap is not a busy loop.
                        let pause = if failed { 20 } else { 2 };
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            outcomes,
            callers,
        }
    }

    fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| pred(o))
            .count()
    }

    /// Waits until `n` more requests have completed.
    async fn more(&self, n: usize) {
        let target = self.count(|_| true) + n;
        poll(
            Duration::from_secs(30),
            &format!("{n} more requests"),
            || self.count(|_| true) >= target,
        )
        .await;
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for caller in self.callers {
            tokio::time::timeout(REQUEST_LIMIT * 2, caller)
                .await
                .expect("callers stop")
                .unwrap();
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

/// Polls `cond` every 20 ms; panics naming `what` if it is still false after `limit`.
async fn poll(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails on any answer slower than the limit, and summarizes the rest.
fn no_hangs(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(o.done - o.started < REQUEST_LIMIT, "a request hung: {o:?}");
    }
}

fn status(mesh: &TestMesh, name: &str) -> Arc<IdentityStatus> {
    mesh.workload(name)
        .sidecar
        .identity
        .status()
        .expect("an SVID")
}

/// A server verifier that accepts any certificate (signature still checked), so the test sees
/// what a sidecar is willing to serve with instead of the client refusing first.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config presenting `svid` that accepts any server certificate.
fn permissive_client(svid: &Svid) -> Arc<rustls::ClientConfig> {
    let resolver = Arc::new(meshgate_ca::tls::CertResolver::default());
    resolver
        .publish(
            svid.chain.clone(),
            rustls_pki_types::PrivatePkcs8KeyDer::from(svid.key.serialize_der()).into(),
        )
        .unwrap();
    let provider = meshgate_ca::tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// An HTTP/2 connection over mTLS to a sidecar's inbound listener, and the `not_after` of the
/// certificate the sidecar presented.
async fn h2_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<
    (
        hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        OffsetDateTime,
    ),
    String,
> {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(meshgate_ca::tls::mesh_server_name(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let presented = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| meshgate_ca::cert::cert_info(leaf).unwrap().not_after)
            .ok_or("no server certificate")?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(conn);
        Ok((sender, presented))
    };
    tokio::time::timeout(REQUEST_LIMIT, attempt)
        .await
        .unwrap_or_else(|_| Err("HANG: TLS + HTTP/2 setup".to_string()))
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> Result<u16, String> {
    let attempt = async {
        let req = http::Request::get(format!("https://orders{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        Ok(status)
    };
    tokio::time::timeout(REQUEST_LIMIT, attempt)
        .await
        .unwrap_or_else(|_| Err("HANG".to_string()))
}

/// 1. The CA goes down for longer than half the SVID lifetime (past every sidecar's renewal
/// point) but less than all of it: not one request fails, and when the CA is back every sidecar
/// renews before its certificate expires. 2. The CA goes down for longer than the (renewed)
/// lifetime: each sidecar turns not ready when its SVID expires, and nothing is served with an
/// expired certificate — not through the mesh, not on a connection opened before the expiry,
/// not to a client that would accept any certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_outage_past_half_the_svid_ttl_then_past_expiry() {
    let _heavy = crate::support::heavy_async().await;
    const TTL: Duration = Duration::from_secs(8);
    let test_started = Instant::now();
    let mut mesh = TestMesh::with_svid_ttl(TTL).await;
    mesh.write_policy("readers.yaml", &readers(&["/orders/*"]));
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.converge().await;
    let web_out = mesh.workload("web").sidecar.outbound_addr;
    assert_eq!(try_call(web_out, "orders", "/orders/1").await, Ok(200));
    let names = ["web", "orders"];
    let first = names.map(|n| status(&mesh, n));
    let not_after_gauge = mesh
        .metric("orders", "meshgate_cert_not_after_timestamp_seconds", &[])
        .await;
    assert_eq!(not_after_gauge as i64, first[1].not_after.unix_timestamp());

    // Part 1: the CA is down past every sidecar's renewal point, traffic flowing.
    mesh.ca.stop().await;
    let outage = Instant::now();
    let load = Load::start(web_out, "orders", &[&["/orders/1"], &["/orders/2"]]);
    let half_ttl = time::Duration::try_from(TTL / 2).unwrap();
    let past_renewal_point = first.iter().map(|s| s.not_after - half_ttl).max().unwrap()
        + time::Duration::milliseconds(500);
    poll(
        TTL,
        "every sidecar to fail a renewal past half its SVID TTL",
        || {
            OffsetDateTime::now_utc() > past_renewal_point
                && outage.elapsed() > TTL / 2 + Duration::from_millis(250)
                && names.iter().all(|n| status(&mesh, n).last_error.is_some())
        },
    )
    .await;
    for (name, before) in names.iter().zip(&first) {
        let now = status(&mesh, name);
        assert_eq!(
            now.serial, before.serial,
            "{name} cannot renew without the CA"
        );
        assert!(
            now.is_valid(),
            "{name}'s SVID must still be valid: the test waited too long"
        );
    }
    let outage_len = outage.elapsed();
    assert!(outage_len > TTL / 2 && outage_len < TTL, "{outage_len:?}");
    let during_outage = load.count(|_| true);

    // The CA is back (same port): every sidecar renews before its certificate expires.
    mesh.ca.serve().await;
    let back = Instant::now();
    let expiry = first.iter().map(|s| s.not_after).min().unwrap();
    poll(TTL, "both sidecars to renew", || {
        assert!(
            OffsetDateTime::now_utc() < expiry,
            "a sidecar did not renew before its SVID expired (CA back for {:?})",
            back.elapsed()
        );
        names
            .iter()
            .zip(&first)
            .all(|(n, before)| status(&mesh, n).not_after > before.not_after)
    })
    .await;
    let renewed_after = back.elapsed();
    load.more(100).await;
    let outcomes = load.finish().await;
    no_hangs(&outcomes);
    let failures: Vec<_> = outcomes.iter().filter(|o| o.result != Ok(200)).collect();
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    let gauge = mesh
        .metric("orders", "meshgate_cert_not_after_timestamp_seconds", &[])
        .await;
    assert!(gauge > not_after_gauge, "{gauge} vs {not_after_gauge}");
    eprintln!(
        "CA outage of {outage_len:?} (SVID TTL {TTL:?}): {during_outage} requests during it, {} in all, 0 failures; renewed {renewed_after:?} after the CA came back",
        outcomes.len()
    );

    // Part 2: the CA stays down until the SVIDs really expire.
    let renewed = names.map(|n| status(&mesh, n));
    mesh.ca.stop().await;
    for name in names {
        let admin_addr = mesh.workload(name).sidecar.admin_addr;
        assert_eq!(admin(admin_addr, "GET", "/ready").await.0, 200, "{name}");
    }
    // A connection opened while orders' SVID is valid, by a client whose own certificate lasts.
    let now = OffsetDateTime::now_utc();
    let long_lived_web = mesh.ca.sign_leaf(
        &TestMesh::id_of("web"),
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    );
    let orders_in = mesh.workload("orders").sidecar.inbound_addr;
    let verifying = mesh_client(
        mesh.ca.bundle(),
        &long_lived_web,
        TestMesh::id_of("orders"),
        &[b"h2"],
    );
    let (mut held, _) = h2_connect(orders_in, verifying.clone()).await.unwrap();
    assert_eq!(h2_get(&mut held, "/orders/held").await, Ok(200));

    let load = Load::start(web_out, "orders", &[&["/orders/1"], &["/orders/2"]]);
    let first_expiry = renewed.iter().map(|s| s.not_after).min().unwrap();
    let last_expiry = renewed.iter().map(|s| s.not_after).max().unwrap();
    let mut reasons = Vec::new();
    let deadline = Instant::now() + TTL + Duration::from_secs(3);
    for name in names {
        let admin_addr = mesh.workload(name).sidecar.admin_addr;
        loop {
            let (code, body) = admin(admin_addr, "GET", "/ready").await;
            if code == 503 {
                assert!(
                    OffsetDateTime::now_utc() >= status(&mesh, name).not_after,
                    "{name} not ready before its SVID expired: {body}"
                );
                reasons.push(body);
                break;
            }
            assert_eq!(code, 200, "{body}");
            assert!(
                Instant::now() < deadline,
                "{name} still ready after its SVID expired at {}",
                meshgate_ca::cert::rfc3339(status(&mesh, name).not_after)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for body in &reasons {
        assert!(body.contains("SVID expired"), "{body}");
    }
    poll(
        Duration::from_secs(3),
        "requests after the last expiry",
        || OffsetDateTime::now_utc() > last_expiry + time::Duration::milliseconds(200),
    )
    .await;
    load.more(20).await;
    let outcomes = load.finish().await;
    no_hangs(&outcomes);
    let margin = time::Duration::milliseconds(100);
    let (mut before, mut after) = (0, 0);
    let mut refusals = std::collections::BTreeMap::<String, usize>::new();
    for o in &outcomes {
        if o.wall + margin < first_expiry - time::Duration::seconds(1) {
            before += 1;
            assert_eq!(
                o.result,
                Ok(200),
                "failed while both SVIDs were valid: {o:?}"
            );
        } else if o.wall > first_expiry + margin {
            after += 1;
            assert_ne!(
                o.result,
                Ok(200),
                "served after an SVID expired at {}: {o:?}",
                meshgate_ca::cert::rfc3339(first_expiry)
            );
            let key = match &o.result {
                Ok(code) => code.to_string(),
                Err(e) => e.split(':').next().unwrap().to_string(),
            };
            *refusals.entry(key).or_default() += 1;
        }
    }
    assert!(before > 0 && after > 0, "{before} before, {after} after");

    // The connection opened before the expiry is not served on any more.
    let held_after = h2_get(&mut held, "/orders/held").await;
    // A new connection fails even for a client that would accept any certificate.
    let fresh = match h2_connect(orders_in, permissive_client(&long_lived_web)).await {
        Err(e) => Err(e),
        Ok((mut sender, presented)) => {
            let answer = h2_get(&mut sender, "/orders/new").await;
            Ok((presented, answer))
        }
    };
    assert_ne!(
        held_after,
        Ok(200),
        "served on a connection after its own SVID expired (new connection: {fresh:?})"
    );
    assert!(
        !matches!(fresh, Ok((_, Ok(200)))),
        "a new connection was served on an expired certificate: {fresh:?}"
    );
    // And a verifying client (as a peer sidecar) cannot connect either.
    assert!(h2_connect(orders_in, verifying).await.is_err());
    eprintln!(
        "SVID expiry with the CA down: {before} requests served before, {after} refused after ({refusals:?}); held connection: {held_after:?}; new permissive connection: {fresh:?}; test took {:?}",
        test_started.elapsed()
    );
}

/// The control plane is stopped in the middle of a request loop: sidecars keep their last
/// policy and not one request fails; it comes back on the same port: sidecars reconnect, and a
/// policy change made after the restart reaches them (a path that becomes denied answers 403)
/// while the loop still sees no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_stopped_and_restarted_under_load() {
    let _heavy = crate::support::heavy_async().await;
    let test_started = Instant::now();
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("readers.yaml", &readers(&["/orders/*", "/admin/*"]));
    mesh.start_control_plane().await;
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.converge().await;
    let web_out = mesh.workload("web").sidecar.outbound_addr;
    assert_eq!(try_call(web_out, "orders", "/admin/1").await, Ok(200));
    let mesh = Arc::new(tokio::sync::Mutex::new(mesh));
    let connected = |mesh: Arc<tokio::sync::Mutex<TestMesh>>| async move {
        let mesh = mesh.lock().await;
        let mut states = Vec::new();
        for name in ["web", "orders"] {
            states.push(
                mesh.metric(name, "meshgate_control_plane_connected", &[])
                    .await as i64,
            );
        }
        states
    };

    let load = Load::start(web_out, "orders", &[&["/orders/1"], &["/orders/2"]]);
    load.more(100).await;
    mesh.lock().await.stop_control_plane().await;
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(5);
    while connected(mesh.clone()).await != [0, 0] {
        assert!(
            Instant::now() < deadline,
            "sidecars did not notice the control plane is gone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    poll(
        Duration::from_secs(30),
        "100 requests and 1 s with the control plane down",
        || stopped.elapsed() > Duration::from_secs(1) && load.count(|o| o.started > stopped) >= 100,
    )
    .await;
    // The last policy stays in force while the control plane is away.
    assert_eq!(try_call(web_out, "orders", "/admin/1").await, Ok(200));
    let down_for = stopped.elapsed();

    mesh.lock().await.start_control_plane().await;
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(15);
    while connected(mesh.clone()).await != [1, 1] {
        assert!(Instant::now() < deadline, "sidecars did not reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reconnected_after = restarted.elapsed();
    {
        let mesh = mesh.lock().await;
        mesh.write_policy("readers.yaml", &readers(&["/orders/*"]));
        mesh.converge().await;
    }
    assert_eq!(try_call(web_out, "orders", "/admin/1").await, Ok(403));
    load.more(100).await;
    let outcomes = load.finish().await;
    no_hangs(&outcomes);
    let failures: Vec<_> = outcomes.iter().filter(|o| o.result != Ok(200)).collect();
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    assert!(outcomes.len() >= 300);
    assert_eq!(try_call(web_out, "orders", "/orders/9").await, Ok(200));
    assert_eq!(try_call(web_out, "orders", "/admin/1").await, Ok(403));
    eprintln!(
        "control plane down for {down_for:?}, sidecars reconnected {reconnected_after:?} after the restart; {} requests, 0 failures; test took {:?}",
        outcomes.len(),
        test_started.elapsed()
    );
}

/// The callee's real `meshgate proxy` process is killed with SIGKILL in the middle of a request
/// loop and a new one started on the same ports: requests in the gap fail cleanly and quickly
/// (502/503 or a refused connection, never a hang), a denied path is never answered 200, and
/// everything is 200 again within a bounded time after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callee_sidecar_killed_and_restarted_under_load() {
    let _heavy = crate::support::heavy_async().await;
    require_tool("curl");
    let test_started = Instant::now();
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("readers.yaml", &readers(&["/orders/*"]));
    let files = mesh.ca.tmp.path().join("orders-svid");
    issue_files(&mesh.ca, TestMesh::id_of("orders").as_str(), &files);
    let app = EchoApp::start().await.addr.to_string();
    let proxy = ProxyProcess::spawn(&files, &mesh.policy_dir, &app, &[]);
    let ports = (proxy.inbound, proxy.admin);
    proxy.ready().await;
    mesh.add("web").await;
    mesh.write_policy(
        "services.yaml",
        &format!(
            "apiVersion: meshgate.dev/v1\nkind: Service\nmetadata: {{ name: orders, namespace: shop }}\nspec:\n  identity: {}\n  hosts: [orders]\n  ports: [{{ port: 8080, protocol: http }}]\n  endpoints: [\"127.0.0.1:{}\"]\n",
            TestMesh::id_of("orders"),
            ports.0
        ),
    );
    let version = mesh.converge().await;
    let proxy_admin: SocketAddr = ([127, 0, 0, 1], ports.1).into();
    let proxy_version = || async move {
        let (_, body) = admin(proxy_admin, "GET", "/config").await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["policy_version"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy_version().await != version {
        assert!(
            Instant::now() < deadline,
            "the proxy process did not load {version}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let web_out = mesh.workload("web").sidecar.outbound_addr;
    assert_eq!(try_call(web_out, "orders", "/orders/1").await, Ok(200));
    assert_eq!(try_call(web_out, "orders", "/admin/1").await, Ok(403));

    let load = Load::start(
        web_out,
        "orders",
        &[&["/orders/1"], &["/orders/2", "/admin/1"]],
    );
    load.more(50).await;
    let killed = Instant::now();
    proxy.signal("KILL");
    let exit = proxy.wait().await;
    assert!(!exit.success(), "{exit:?}");
    // The gap: callers see failures.
    poll(
        Duration::from_secs(5),
        "half a second of failures while the callee is down",
        || {
            killed.elapsed() > Duration::from_millis(500)
                && load.count(|o| o.started > killed && o.result != Ok(200) && o.result != Ok(403))
                    >= 10
        },
    )
    .await;
    let restart = ProxyProcess::spawn_on(&files, &mesh.policy_dir, &app, ports, &[], &[], None);
    restart.ready().await;
    let restarted = Instant::now();
    poll(Duration::from_secs(10), "a 200 after the restart", || {
        load.count(|o| o.started > restarted && o.result == Ok(200)) > 0
    })
    .await;
    let recovered_after = restarted.elapsed();
    load.more(50).await;
    let outcomes = load.finish().await;
    no_hangs(&outcomes);

    let mut gap = std::collections::BTreeMap::<String, usize>::new();
    let first_ok_after_restart = outcomes
        .iter()
        .filter(|o| o.started > restarted && o.result == Ok(200))
        .map(|o| o.started)
        .min()
        .unwrap();
    for o in &outcomes {
        if o.path.starts_with("/admin") {
            assert!(
                matches!(o.result, Ok(403 | 502 | 503)) || o.result.is_err(),
                "a denied path must never be served: {o:?}"
            );
        } else if o.done < killed || o.started >= first_ok_after_restart {
            assert_eq!(o.result, Ok(200), "{o:?}");
        } else {
            match &o.result {
                Ok(200) => {}
                Ok(code @ (502 | 503)) => *gap.entry(code.to_string()).or_default() += 1,
                Ok(other) => panic!("unexpected answer in the gap: {other} ({o:?})"),
                Err(e) if e.starts_with("HANG") => panic!("{o:?}"),
                Err(_) => *gap.entry("connection error".into()).or_default() += 1,
            }
        }
    }
    assert!(!gap.is_empty());
    let denied = outcomes
        .iter()
        .filter(|o| o.path.starts_with("/admin") && o.result == Ok(403))
        .count();
    assert!(denied > 0);
    // The restarted sidecar enforces the same policy.
    assert_eq!(try_call(web_out, "orders", "/admin/1").await, Ok(403));
    eprintln!(
        "callee killed: gap answers {gap:?}; first 200 {recovered_after:?} after the new process was ready ({:?} after the kill); {} requests, {denied} denied as they should be; test took {:?}",
        first_ok_after_restart - killed,
        outcomes.len(),
        test_started.elapsed()
    );
}

/// A harmless extra policy (about a principal that never calls), alternating between ALLOW and
/// DENY and unique per `i`, so every write is a new policy version.
fn canary(i: usize) -> String {
    format!(
        r#"apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: canary, namespace: shop }}
spec:
  selector: {{ account: orders }}
  action: {}
  rules:
    - from: [{{ principals: ["spiffe://mesh.local/ns/shop/sa/nobody"] }}]
      to: [{{ paths: ["/canary-{i}/*"] }}]
"#,
        if i.is_multiple_of(2) { "ALLOW" } else { "DENY" }
    )
}

/// A thousand policy versions written while two callers send requests: not one allowed request
/// fails, a path denied by every version is denied every time, and every sidecar ends on the
/// last version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_policy_swaps_under_load() {
    let _heavy = crate::support::heavy_async().await;
    const VERSIONS: usize = 1000;
    let test_started = Instant::now();
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("readers.yaml", &readers(&["/orders/*"]));
    mesh.write_policy("canary.yaml", &canary(0));
    mesh.add("web").await;
    mesh.add("orders").await;
    mesh.write_services();
    mesh.converge().await;
    let mut swaps_before = Vec::new();
    for name in ["web", "orders"] {
        swaps_before.push(mesh.metric(name, "meshgate_policy_swaps_total", &[]).await);
    }
    let web_out = mesh.workload("web").sidecar.outbound_addr;
    let load = Load::start(
        web_out,
        "orders",
        &[&["/orders/1"], &["/orders/2", "/admin/1"]],
    );
    let writing = Instant::now();
    for i in 1..=VERSIONS {
        mesh.write_policy("canary.yaml", &canary(i));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let written_in = writing.elapsed();
    let last = mesh.converge().await;
    load.more(20).await;
    let outcomes = load.finish().await;
    no_hangs(&outcomes);
    let (mut allowed, mut denied) = (0, 0);
    for o in &outcomes {
        if o.path.starts_with("/admin") {
            assert_eq!(o.result, Ok(403), "denied in every version: {o:?}");
            denied += 1;
        } else {
            assert_eq!(o.result, Ok(200), "{o:?}");
            allowed += 1;
        }
    }
    let mut swaps = Vec::new();
    for (name, before) in ["web", "orders"].iter().zip(&swaps_before) {
        let after = mesh.metric(name, "meshgate_policy_swaps_total", &[]).await;
        swaps.push(after - before);
    }
    for (name, s) in ["web", "orders"].iter().zip(&swaps) {
        assert!(*s > 1.0, "{name} applied only {s} swaps");
        let version = mesh
            .workload(name)
            .sidecar
            .policy
            .snapshot
            .load()
            .version()
            .to_string();
        assert_eq!(version, last, "{name}");
    }
    assert!(allowed > 0 && denied > 0);
    eprintln!(
        "{VERSIONS} policy versions written in {written_in:?}; swaps applied: web {}, orders {}; {allowed} allowed requests all 200, {denied} denied requests all 403; test took {:?}",
        swaps[0],
        swaps[1],
        test_started.elapsed()
    );
}
