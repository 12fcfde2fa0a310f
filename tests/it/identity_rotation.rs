//! The identity client against a real CA: rotation without dropped handshakes or connections,
//! recovery from a CA outage, and live trust-bundle refresh.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::support::*;
use arc_swap::ArcSwap;
use meshgate_ca::tls::{self, CertResolver, ExpectedServer};
use meshgate_proxy::identity::{Backoff, Identity, IdentityClient, IdentityConfig};
use rustls_pki_types::PrivatePkcs8KeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep};

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
const CLIENT: &str = "spiffe://mesh.local/ns/shop/sa/client";

fn client_config(ca: &TestCa, token: String, bundle_refresh: Duration) -> IdentityConfig {
    IdentityConfig {
        ca_url: ca.url(),
        ca_bundle_pem: ca.bundle_pem(),
        token: token.into(),
        bundle_refresh,
        backoff: Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
        },
    }
}

/// An mTLS echo server whose certificate comes from `identity`'s resolver.
async fn spawn_mtls_server(identity: Arc<Identity>) -> SocketAddr {
    let roots = identity.bundle().load().roots();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, tls::provider())
            .build()
            .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity.resolver());
    config.send_tls13_tickets = 0;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 64];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A client with a long-lived SVID that expects the server to be `WEB`.
struct MeshClient {
    connector: tokio_rustls::TlsConnector,
}

impl MeshClient {
    fn new(ca: &TestCa) -> Self {
        // Signed directly so it outlives the short SVID TTL the CA under test hands out.
        let now = time::OffsetDateTime::now_utc();
        let svid = ca.sign_leaf(
            &id(CLIENT),
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        );
        let resolver = Arc::new(CertResolver::default());
        resolver
            .publish(
                svid.chain,
                PrivatePkcs8KeyDer::from(svid.key.serialize_der()).into(),
            )
            .unwrap();
        let config = tls::mesh_client_config(
            Arc::new(ArcSwap::from_pointee(ca.bundle())),
            ExpectedServer::Exact(id(WEB)),
            Some(resolver),
            &[],
        );
        Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    /// Handshakes, echoes a byte, and returns the serial of the server's certificate.
    async fn handshake(&self, addr: SocketAddr) -> Result<String, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = self
            .connector
            .connect(tls::mesh_server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let serial = meshgate_ca::cert::cert_info(&tls.get_ref().1.peer_certificates().unwrap()[0])
            .unwrap()
            .serial;
        echo(&mut tls).await?;
        Ok(serial)
    }
}

async fn echo<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S) -> Result<(), String> {
    s.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_svid_renews_twice_in_30s_without_failed_handshakes() {
    let ca = TestCa::start(Duration::from_secs(10)).await;
    let token = ca.token(&id(WEB), Duration::from_secs(60), false);
    let identity = IdentityClient::new(client_config(&ca, token, Duration::from_secs(60)))
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(identity.is_ready());
    let server = spawn_mtls_server(identity.clone()).await;
    let client = MeshClient::new(&ca);

    // One connection held open for the whole run: rotation must not drop it.
    let tcp = TcpStream::connect(server).await.unwrap();
    let mut long_lived = client
        .connector
        .connect(tls::mesh_server_name(), tcp)
        .await
        .unwrap();

    let mut serials = BTreeSet::new();
    let mut handshakes = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let serial = client
            .handshake(server)
            .await
            .unwrap_or_else(|e| panic!("handshake {handshakes} failed during rotation: {e}"));
        serials.insert(serial);
        handshakes += 1;
        echo(&mut long_lived)
            .await
            .expect("the long-lived connection survives rotation");
        sleep(Duration::from_millis(250)).await;
    }
    let status = identity.status().unwrap();
    eprintln!(
        "rotation: {} renewals, {} distinct server certificates, {handshakes} handshakes, 0 failed",
        status.renewals,
        serials.len()
    );
    assert!(
        status.renewals >= 2,
        "renewed {} times in 30 s",
        status.renewals
    );
    assert!(
        serials.len() >= 3,
        "server presented {} distinct certificates: {serials:?}",
        serials.len()
    );
    assert!(handshakes > 60, "only {handshakes} handshakes");
    assert!(status.last_error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_outage_keeps_the_valid_svid_and_recovers() {
    let mut ca = TestCa::start(Duration::from_secs(20)).await;
    let token = ca.token(&id(WEB), Duration::from_secs(120), false);

    // Bootstrap while the CA is down: the client retries until it comes back.
    ca.stop().await;
    let client = IdentityClient::new(client_config(&ca, token, Duration::from_secs(60))).unwrap();
    let starting = tokio::spawn(client.start());
    sleep(Duration::from_secs(2)).await;
    assert!(
        !starting.is_finished(),
        "bootstrap cannot succeed while the CA is down"
    );
    ca.serve().await;
    let identity = tokio::time::timeout(Duration::from_secs(10), starting)
        .await
        .expect("bootstrap recovers once the CA is back")
        .unwrap()
        .unwrap();
    let first = identity.status().unwrap();
    let server = spawn_mtls_server(identity.clone()).await;
    let mesh_client = MeshClient::new(&ca);

    // CA down across the renewal point (8–10 s into a 20 s SVID): wait for the failed renewal to
    // be reported (an event, not a fixed sleep), at most until just before the SVID expires.
    ca.stop().await;
    let failed = tokio::time::timeout(Duration::from_secs(16), async {
        loop {
            if identity.status().unwrap().last_error.is_some() {
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        failed.is_ok(),
        "the renewal at 8–10 s was attempted and failed"
    );
    let during = identity.status().unwrap();
    assert_eq!(during.serial, first.serial, "no renewal can have happened");
    assert!(
        during.last_error.is_some(),
        "the failed renewal is reported"
    );
    assert!(identity.is_ready(), "the still-valid SVID is kept");
    let served = mesh_client
        .handshake(server)
        .await
        .expect("handshakes continue on the kept SVID");
    assert_eq!(served, first.serial);

    // CA back: the client renews within its backoff (max 2 s here).
    ca.serve().await;
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let now = identity.status().unwrap();
        if now.renewals >= 1 {
            assert_ne!(now.serial, first.serial);
            assert!(now.last_error.is_none());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "client did not recover after the CA came back: {now:?}"
        );
        sleep(Duration::from_millis(200)).await;
    }
    let served = mesh_client.handshake(server).await.unwrap();
    assert_ne!(
        served, first.serial,
        "the server now presents the renewed SVID"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_changes_reach_the_client_without_restart() {
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    let token = ca.token(&id(WEB), Duration::from_secs(60), false);
    let identity = IdentityClient::new(client_config(&ca, token, Duration::from_millis(300)))
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut changes = identity.bundle_changes();
    let seen = Arc::new(AtomicU64::new(*changes.borrow_and_update()));
    assert_eq!(identity.bundle().load().certs().len(), 1);

    // The operator adds a new root next to the old one (the overlap phase of a rotation).
    let next = TestCa::init();
    let mut bundle = ca.bundle_pem();
    bundle.extend(next.bundle_pem());
    std::fs::write(ca.path("bundle.pem"), bundle).unwrap();

    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("bundle change notified")
        .unwrap();
    seen.store(*changes.borrow(), Ordering::SeqCst);
    let current = identity.bundle().load_full();
    assert_eq!(current.certs().len(), 2);
    // A certificate from the new root now verifies against the client's bundle.
    let from_new_root = next.sign_leaf(
        &id(WEB),
        time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
        time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    );
    current
        .verify_client(
            &from_new_root.chain[0],
            &from_new_root.chain[1..],
            rustls_pki_types::UnixTime::now(),
        )
        .expect("new root trusted");
    assert!(seen.load(Ordering::SeqCst) >= 1);

    // A broken bundle file on the CA side changes nothing on the client.
    std::fs::write(ca.path("bundle.pem"), "garbage").unwrap();
    sleep(Duration::from_secs(1)).await;
    assert_eq!(identity.bundle().load().certs().len(), 2);
}
