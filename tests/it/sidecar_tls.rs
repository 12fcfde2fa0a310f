//! TLS behaviour of the inbound listener with a static (file) identity: no session resumption,
//! certificate files rotated under a running sidecar, and a trust-bundle change that swaps the
//! whole server config (a new root is accepted without a restart).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::support::mesh::EchoApp;
use crate::support::*;
use meshgate_ca::tls;
use meshgate_proxy::identity::static_files::IdentityFiles;
use meshgate_proxy::inbound::AppProtocol;
use meshgate_proxy::policy::PolicyFiles;
use meshgate_proxy::sidecar::{IdentitySource, Sidecar, SidecarConfig};
use rustls::HandshakeKind;

const ORDERS: &str = "spiffe://mesh.local/ns/shop/sa/orders";
const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";

const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: public, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - to: [{ paths: ["/public/*"] }]
"#;

fn issue(ca: &TestCa, out: &Path) {
    let done = run(meshgate()
        .args(["ca", "issue", "--id", ORDERS, "--dir"])
        .arg(&ca.dir)
        .arg("--out")
        .arg(out));
    assert!(done.status.success(), "{}", text(&done));
}

/// A client presenting `svid`, trusting `roots`, with rustls' default (enabled) resumption so
/// that the server's refusal to resume is what the test observes.
fn client(roots: meshgate_ca::TrustBundle, svid: &Svid) -> tokio_rustls::TlsConnector {
    let mut config = Arc::unwrap_or_clone(crate::support::mesh_client(
        roots,
        svid,
        id(ORDERS),
        &[b"http/1.1"],
    ));
    config.resumption = rustls::client::Resumption::in_memory_sessions(16);
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Handshakes and sends one request; returns the handshake kind and the server's cert serial.
async fn hello(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> Result<(HandshakeKind, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(tls::mesh_server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /public/x HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("no 200: {text}"));
    }
    let (_, conn) = tls.get_ref();
    let serial = meshgate_ca::cert::cert_info(&conn.peer_certificates().unwrap()[0])
        .unwrap()
        .serial;
    Ok((conn.handshake_kind().unwrap(), serial))
}

/// The `orders` sidecar in front of an echo app, with [`POLICY`], its identity the files
/// `svid.pem`, `key.pem` and `bundle.pem` issued by `ca` into the returned directory (watched:
/// replacing them rotates the certificate or the trust bundle).
async fn orders_sidecar(ca: &TestCa) -> (Sidecar, std::path::PathBuf, EchoApp) {
    let files = ca.tmp.path().join("orders");
    issue(ca, &files);
    let policies = ca.tmp.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("p.yaml"), POLICY).unwrap();
    let app = EchoApp::start().await;
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let sidecar = Sidecar::start(SidecarConfig {
        apps: vec![app.addr],
        app_protocol: AppProtocol::Auto,
        mesh_protocol: Default::default(),
        identity: IdentitySource::Files(IdentityFiles {
            cert: files.join("svid.pem"),
            key: files.join("key.pem"),
            bundle: files.join("bundle.pem"),
        }),
        policy: meshgate_proxy::policy::PolicySource::Files(PolicyFiles {
            dir: policies,
            services: None,
        }),
        inbound: any,
        outbound: any,
        admin: any,
        probe: any,
        probe_paths: vec![],
        probe_self: false,
        probe_tcp: vec![],
        probe_grpc: vec![],
        allow_tls12: false,
        tcp_forwards: vec![],
        inbound_tcp_ports: vec![],
        allowed_upgrades: vec!["websocket".into()],
        limits: Default::default(),
        detect_timeout: Duration::from_millis(300),
        opaque_ports: vec![],
        drain: Duration::from_secs(1),
        poll_interval: Duration::from_millis(50),
        telemetry: meshgate_proxy::telemetry::TelemetryConfig::disabled(),
        ebpf_cgroup: None,
        flow_report_interval: meshgate_proxy::flows::DEFAULT_REPORT_INTERVAL,
    })
    .await
    .unwrap();
    (sidecar, files, app)
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_resumption_file_rotation_and_live_trust_bundle() {
    let ca = TestCa::init();
    let (sidecar, files, _app) = orders_sidecar(&ca).await;
    let addr = sidecar.inbound_addr;
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let web = ca.sign_leaf(&id(WEB), now - hour, now + hour);
    let connector = client(ca.bundle(), &web);

    // Two handshakes from a client that would resume if it could: both are full handshakes.
    let (first, serial) = hello(&connector, addr).await.unwrap();
    let (second, _) = hello(&connector, addr).await.unwrap();
    assert_eq!(first, HandshakeKind::Full);
    assert_eq!(
        second,
        HandshakeKind::Full,
        "the sidecar must not resume sessions (stale identities)"
    );

    // The sidecar's certificate files are replaced: new handshakes present the new certificate.
    issue(&ca, &files);
    let connector_ref = &connector;
    let old = serial.clone();
    eventually("the rotated certificate is served", || {
        let old = old.clone();
        async move {
            hello(connector_ref, addr)
                .await
                .is_ok_and(|(_, s)| s != old)
        }
    })
    .await;

    // A client from a second CA is refused ...
    let next_ca = TestCa::init();
    let from_next = next_ca.sign_leaf(&id(WEB), now - hour, now + hour);
    let next_client = client(ca.bundle(), &from_next);
    assert!(
        hello(&next_client, addr).await.is_err(),
        "a root not in the bundle is refused"
    );
    // ... until its root joins the sidecar's trust bundle (rotation overlap), without a restart.
    let mut bundle = std::fs::read(files.join("bundle.pem")).unwrap();
    bundle.extend(next_ca.bundle_pem());
    let tmp = files.join(".bundle.tmp");
    std::fs::write(&tmp, bundle).unwrap();
    std::fs::rename(&tmp, files.join("bundle.pem")).unwrap();
    let next_ref = &next_client;
    eventually("the new root is trusted", || async move {
        hello(next_ref, addr).await.is_ok()
    })
    .await;
    // The old root keeps working during the overlap.
    hello(&connector, addr)
        .await
        .expect("old root still trusted");

    // A broken certificate file is refused and the current certificate stays in use.
    std::fs::write(files.join("svid.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hello(&connector, addr)
        .await
        .expect("still serving the last good certificate");
    assert!(
        sidecar.identity.status().unwrap().last_error.is_some(),
        "the bad file is reported"
    );
}

/// The inbound listener verifies a caller's certificate chain once and answers its later
/// handshakes from the cache of verified chains (no signature checks: the handshake's CPU), but
/// never past a certificate's validity and never across a trust-bundle change: a caller
/// accepted a moment ago is refused once its root leaves the bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_chains_are_cached_but_never_past_expiry_or_a_bundle_change() {
    use crate::support::mesh::{admin, sum_metric};
    let ca = TestCa::init();
    let (sidecar, files, _app) = orders_sidecar(&ca).await;
    let addr = sidecar.inbound_addr;
    let metric = |name: &'static str, fragment: &'static str| {
        let admin_addr = sidecar.admin_addr;
        async move {
            let (status, text) = admin(admin_addr, "GET", "/metrics").await;
            assert_eq!(status, 200);
            sum_metric(&text, name, &[fragment])
        }
    };
    let chains = "meshgate_tls_chain_verifications_total";

    // The next CA's root is trusted by the clients from the start, so that every refusal
    // below is the sidecar's.
    let next_ca = TestCa::init();
    let mut both = ca.bundle_pem();
    both.extend(next_ca.bundle_pem());
    let both = meshgate_ca::TrustBundle::from_pem(&both).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let web = client(
        both.clone(),
        &ca.sign_leaf(&id(WEB), now - hour, now + hour),
    );

    for _ in 0..3 {
        hello(&web, addr).await.unwrap();
    }
    assert_eq!(metric(chains, r#"result="verified""#).await, 1.0);
    assert_eq!(metric(chains, r#"result="cached""#).await, 2.0);

    // A chain in the cache is still refused once its leaf has expired.
    let short = client(
        both.clone(),
        &ca.sign_leaf(&id(WEB), now - hour, now + time::Duration::seconds(2)),
    );
    hello(&short, addr).await.unwrap();
    hello(&short, addr).await.unwrap();
    assert_eq!(metric(chains, r#"result="cached""#).await, 3.0);
    while time::OffsetDateTime::now_utc() <= now + time::Duration::seconds(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        hello(&short, addr).await.is_err(),
        "an expired leaf is refused"
    );
    assert_eq!(
        metric(
            "meshgate_tls_handshake_failures_total",
            r#"reason="cert_expired""#
        )
        .await,
        1.0
    );
    hello(&web, addr).await.expect("the valid chain still is");

    // The sidecar moves to the next CA: new certificate, and a bundle with only the next root.
    issue(&next_ca, &files);
    let web_ref = &web;
    eventually("the old root's caller is refused", || async move {
        hello(web_ref, addr).await.is_err()
    })
    .await;
    let next_web = client(both, &next_ca.sign_leaf(&id(WEB), now - hour, now + hour));
    hello(&next_web, addr).await.expect("the new root's caller");
    assert!(
        hello(&web, addr).await.is_err(),
        "the cached chain of the old root stays refused"
    );
}

/// A client that leaves Nagle's algorithm on (the socket default) gets its first answer on a new
/// connection without waiting out the sidecar's delayed-ACK timer: before the fix every such
/// first request took 40–42 ms where HAProxy took 1 ms (see
/// [`crate::support::nagle_first_answers`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_from_a_nagle_client_is_not_held_for_a_delayed_ack() {
    let target = crate::support::attack::Target::start().await;
    let took = crate::support::nagle_first_answers(
        target.addr,
        &target.web(&[b"http/1.1"]),
        b"GET /orders HTTP/1.1\r\nHost: orders\r\n\r\n",
    )
    .await;
    crate::support::assert_not_held_for_delayed_ack(&took);
}
