//! Real clients against a sidecar's inbound port: curl (HTTP/1.1 and HTTP/2) and openssl
//! s_client, with good, missing, foreign and expired client certificates, and plaintext.
//!
//! curl cannot check a SPIFFE ID (it verifies DNS names, and SVIDs carry none), so curl runs with
//! `-k` here; the server side is verified separately with `openssl s_client -verify_return_error`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::mesh::TestMesh;
use crate::support::*;

const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: public, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web"] }]
      to: [{ paths: ["/public/*"] }]
"#;

struct Files {
    cert: PathBuf,
    key: PathBuf,
}

fn write_svid(dir: &Path, name: &str, svid: &Svid) -> Files {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    write_chain(&cert, &svid.chain);
    std::fs::write(&key, svid.key.serialize_pem()).unwrap();
    Files { cert, key }
}

fn curl(files: Option<&Files>, extra: &[&str], url: &str) -> std::process::Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-k", "--max-time", "10"]).args(extra);
    if let Some(f) = files {
        cmd.arg("--cert").arg(&f.cert).arg("--key").arg(&f.key);
    }
    cmd.arg(url);
    cmd.output().unwrap()
}

async fn curl_async(files: Option<Files>, extra: Vec<String>, url: String) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        curl(files.as_ref(), &extra, &url)
    })
    .await
    .unwrap()
}

/// The `orders` workload in a test mesh under [`POLICY`], its inbound address, and a
/// certificate for `web` valid from an hour ago for an hour.
async fn orders_and_web() -> (TestMesh, std::net::SocketAddr, Svid) {
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", POLICY);
    mesh.add("orders").await;
    mesh.converge().await;
    let inbound = mesh.workload("orders").sidecar.inbound_addr;
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let web = mesh
        .ca
        .sign_leaf(&TestMesh::id_of("web"), now - hour, now + hour);
    (mesh, inbound, web)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_against_the_inbound_port() {
    require_tool("curl");
    require_tool("openssl");
    let (mesh, inbound, web) = orders_and_web().await;
    let work = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let web_files = || write_svid(work.path(), "web", &web);
    let url = format!("https://{inbound}/public/hello");

    // HTTP/1.1 and HTTP/2 with a good client certificate; the app gets HTTP/1.1 either way
    // (`--app-protocol auto` keeps HTTP/2 for gRPC).
    for (flag, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/1.1")] {
        let out = curl_async(
            Some(web_files()),
            vec![flag.into(), "--fail-with-body".into()],
            url.clone(),
        )
        .await;
        assert!(out.status.success(), "{flag}: {}", text(&out));
        let echoed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            echoed["headers"]["x-meshgate-peer"],
            TestMesh::id_of("web").as_str()
        );
        assert_eq!(echoed["version"], version, "{flag}");
    }
    // Allowed identity, path outside the policy: 403.
    let out = curl_async(
        Some(web_files()),
        vec![
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
        ],
        format!("https://{inbound}/private"),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");

    // No client certificate: openssl s_client gets the TLS 1.3 "certificate required" alert.
    let bundle = mesh.ca.path("bundle.pem");
    let s_client = tokio::task::spawn_blocking({
        let bundle = bundle.clone();
        move || {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "printf 'GET /public/x HTTP/1.0\\r\\n\\r\\n' | openssl s_client -connect {inbound} -CAfile {} -verify_return_error -ign_eof 2>&1",
                    bundle.display()
                ))
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let shown = text(&s_client);
    assert!(
        !shown.contains("HTTP/1."),
        "no HTTP answer without a client cert: {shown}"
    );
    assert!(shown.contains("certificate required"), "{shown}");
    // The server chain itself verifies against the bundle (s_client got that far).
    assert!(shown.contains("Verify return code: 0 (ok)"), "{shown}");

    // A certificate from a foreign CA, for the very same ID.
    let foreign_ca = TestCa::init();
    let foreign = foreign_ca.sign_leaf(&TestMesh::id_of("web"), now - hour, now + hour);
    let foreign_files = write_svid(work.path(), "foreign", &foreign);
    let out = curl_async(Some(foreign_files), vec![], url.clone()).await;
    assert!(
        !out.status.success(),
        "foreign CA must be refused: {}",
        text(&out)
    );

    // An expired certificate from our own CA.
    let expired = mesh
        .ca
        .sign_leaf(&TestMesh::id_of("web"), now - 2 * hour, now - hour);
    let expired_files = write_svid(work.path(), "expired", &expired);
    let out = curl_async(Some(expired_files), vec![], url.clone()).await;
    assert!(
        !out.status.success(),
        "expired cert must be refused: {}",
        text(&out)
    );

    // Plaintext HTTP on the mTLS port.
    let out = curl_async(None, vec![], format!("http://{inbound}/public/hello")).await;
    assert!(
        !out.status.success(),
        "plaintext must be refused: {}",
        text(&out)
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let mesh = &mesh;
    let failures = |reason: &'static str| {
        let frag = format!(r#"reason="{reason}""#);
        async move {
            mesh.metric(
                "orders",
                "meshgate_tls_handshake_failures_total",
                &[r#"direction="inbound""#, &frag],
            )
            .await
        }
    };
    assert!(failures("no_client_cert").await >= 1.0);
    assert!(failures("cert_expired").await >= 1.0);
    assert!(failures("plaintext").await >= 1.0);
    let foreign_refusals = failures("unknown_issuer").await + failures("bad_cert").await;
    assert!(foreign_refusals >= 1.0, "foreign CA refusal is counted");
}

/// The inbound port chooses `TLS_AES_128_GCM_SHA256` when the client offers it, even after
/// AES-256-GCM (OpenSSL's and rustls's own order), and still serves a client that offers only
/// AES-256-GCM or only ChaCha20-Poly1305 (see `meshgate_ca::tls::provider` for why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_port_chooses_aes_128_and_serves_clients_that_offer_only_another_suite() {
    require_tool("openssl");
    let (mesh, inbound, web) = orders_and_web().await;
    let work = tempfile::tempdir().unwrap();
    let files = write_svid(work.path(), "web", &web);
    let bundle = mesh.ca.path("bundle.pem");
    for (offered, chosen) in [
        (
            "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
            "TLS_AES_128_GCM_SHA256",
        ),
        ("TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384"),
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
    ] {
        let script = format!(
            "printf 'GET /public/x HTTP/1.0\\r\\n\\r\\n' | openssl s_client -connect {inbound} -CAfile {} -cert {} -cert_chain {} -key {} -ciphersuites {offered} -ign_eof 2>&1",
            bundle.display(),
            files.cert.display(),
            files.cert.display(),
            files.key.display(),
        );
        let out = tokio::task::spawn_blocking(move || {
            Command::new("sh").arg("-c").arg(script).output().unwrap()
        })
        .await
        .unwrap();
        let shown = text(&out);
        assert!(
            shown.contains(&format!("Cipher is {chosen}")),
            "offered {offered}, expected {chosen}: {shown}"
        );
        assert!(shown.contains(" 200 OK"), "{shown}");
    }
}

/// An app that speaks HTTP/1.1 only (as Flask, Express and nginx's default do): hyper's HTTP/1
/// server, which fails any HTTP/2 connection.
async fn http1_only_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = format!("{} {:?}\n", req.uri().path(), req.version());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_reaches_an_http1_only_app() {
    require_tool("curl");
    let mut mesh = TestMesh::new().await;
    mesh.write_policy("orders.yaml", POLICY);
    let app = http1_only_app().await;
    mesh.add_in_front_of(
        "orders",
        crate::support::mesh::EchoApp { addr: app },
        &[],
        &[],
    )
    .await;
    mesh.converge().await;
    let inbound = mesh.workload("orders").sidecar.inbound_addr;
    let work = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let web = mesh
        .ca
        .sign_leaf(&TestMesh::id_of("web"), now - hour, now + hour);
    for flag in ["--http2", "--http1.1"] {
        let out = curl_async(
            Some(write_svid(work.path(), "web", &web)),
            vec![flag.into(), "--fail-with-body".into()],
            format!("https://{inbound}/public/hello"),
        )
        .await;
        assert!(out.status.success(), "{flag}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/public/hello HTTP/1.1\n",
            "{flag}"
        );
    }
}
