//! The CA's HTTPS API: issuance, and each refusal with its status, code and message.

use std::process::Command;
use std::time::Duration;

use crate::support::*;
use rcgen::{BasicConstraints, IsCa, KeyPair, PublicKeyData, SanType};

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
const ADMIN: &str = "spiffe://mesh.local/ns/shop/sa/admin";

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

#[tokio::test]
async fn bootstrap_issues_an_svid_for_the_token_id_only() {
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    let key = p256();
    // The CSR asks for much more than it may have: CA:TRUE, DNS and IP SANs, long validity.
    let csr = csr_with(&key, &[WEB], |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.subject_alt_names
            .push(SanType::DnsName("evil.example".try_into().unwrap()));
        p.subject_alt_names
            .push(SanType::IpAddress("10.0.0.1".parse().unwrap()));
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    });
    let token = ca.token(&id(WEB), Duration::from_secs(60), false);
    let resp = ca
        .call("POST", "/v1/svid", Some(&token), csr.into_bytes(), None)
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let json = resp.json();
    assert_eq!(json["spiffe_id"], WEB);
    let chain =
        meshgate_ca::cert::certs_from_pem(json["svid_pem"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    let info = meshgate_ca::cert::cert_info(&chain[0]).unwrap();
    assert_eq!(info.id.as_str(), WEB);
    assert!(!info.is_ca, "CA:TRUE from the CSR must be dropped");
    let lifetime = info.not_after - time::OffsetDateTime::now_utc();
    assert!(
        lifetime <= time::Duration::seconds(3600),
        "validity from the CSR must be ignored: {lifetime}"
    );
    // The one URI SAN and nothing else the CSR asked for.
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names.len(),
        1,
        "{:?}",
        san.value.general_names
    );
    // The bundle in the answer is the CA's bundle.
    assert_eq!(
        json["bundle_pem"].as_str().unwrap().as_bytes(),
        ca.bundle().to_pem().as_bytes()
    );
    // And the leaf's public key is the CSR's.
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
}

#[tokio::test]
async fn bootstrap_refusals() {
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    let key = p256();
    let good_csr = csr_pem(&key, &[WEB]);

    // No token.
    ca.call(
        "POST",
        "/v1/svid",
        None,
        good_csr.clone().into_bytes(),
        None,
    )
    .await
    .assert_refused(401, "token_missing", "Authorization: Bearer");

    // Garbage token.
    ca.call(
        "POST",
        "/v1/svid",
        Some("not-a-token"),
        good_csr.clone().into_bytes(),
        None,
    )
    .await
    .assert_refused(401, "token_malformed", "malformed");

    // Token minted by another CA.
    let other = TestCa::init();
    let foreign = other.token(&id(WEB), Duration::from_secs(60), false);
    ca.call(
        "POST",
        "/v1/svid",
        Some(&foreign),
        good_csr.clone().into_bytes(),
        None,
    )
    .await
    .assert_refused(401, "token_invalid", "not minted by this CA");

    // Expired token.
    let expired = ca.token(&id(WEB), Duration::ZERO, false);
    ca.call(
        "POST",
        "/v1/svid",
        Some(&expired),
        good_csr.clone().into_bytes(),
        None,
    )
    .await
    .assert_refused(401, "token_expired", "expired");

    // CSR for another ID than the token's.
    let token = ca.token(&id(WEB), Duration::from_secs(60), false);
    ca.call(
        "POST",
        "/v1/svid",
        Some(&token),
        csr_pem(&key, &[ADMIN]).into_bytes(),
        None,
    )
    .await
    .assert_refused(403, "id_mismatch", WEB);
    // A CSR for the token's ID *and* another one.
    ca.call(
        "POST",
        "/v1/svid",
        Some(&token),
        csr_pem(&key, &[WEB, ADMIN]).into_bytes(),
        None,
    )
    .await
    .assert_refused(403, "id_mismatch", ADMIN);
    // A CSR asking for no ID.
    ca.call(
        "POST",
        "/v1/svid",
        Some(&token),
        csr_pem(&key, &[]).into_bytes(),
        None,
    )
    .await
    .assert_refused(400, "csr_no_id", WEB);

    // Bad CSR signature: flip a byte inside the signature.
    let mut der = rustls_pki_types::pem::PemObject::from_pem_slice(good_csr.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
        .unwrap();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = meshgate_ca::cert::der_to_pem("CERTIFICATE REQUEST", &der);
    ca.call(
        "POST",
        "/v1/svid",
        Some(&token),
        tampered.into_bytes(),
        None,
    )
    .await
    .assert_refused(400, "csr_bad_signature", "signature");

    // Non-P-256 key.
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    ca.call(
        "POST",
        "/v1/svid",
        Some(&token),
        csr_pem(&p384, &[WEB]).into_bytes(),
        None,
    )
    .await
    .assert_refused(400, "csr_unsupported_key", "P-256");

    // Garbage body and oversized body.
    ca.call(
        "POST",
        "/v1/svid",
        Some(&token),
        b"\x00\xffhello".to_vec(),
        None,
    )
    .await
    .assert_refused(400, "csr_malformed", "CERTIFICATE REQUEST");
    ca.call(
        "POST",
        "/v1/svid",
        Some(&token),
        vec![b'A'; 64 * 1024],
        None,
    )
    .await
    .assert_refused(413, "body_too_large", "16384");

    // Unknown endpoint and wrong method.
    ca.call("GET", "/v1/secret", None, vec![], None)
        .await
        .assert_refused(404, "not_found", "/v1/secret");
    ca.call("GET", "/v1/svid", None, vec![], None)
        .await
        .assert_refused(405, "method_not_allowed", "POST");

    // After all those refusals the token is still unspent: it works once.
    let ok = ca
        .call(
            "POST",
            "/v1/svid",
            Some(&token),
            good_csr.clone().into_bytes(),
            None,
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
}

#[tokio::test]
async fn single_use_token_cannot_be_reused_even_after_restart() {
    let mut ca = TestCa::start(Duration::from_secs(3600)).await;
    let token = ca.token(&id(WEB), Duration::from_secs(600), false);
    let first = ca
        .call(
            "POST",
            "/v1/svid",
            Some(&token),
            csr_pem(&p256(), &[WEB]).into_bytes(),
            None,
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    ca.call(
        "POST",
        "/v1/svid",
        Some(&token),
        csr_pem(&p256(), &[WEB]).into_bytes(),
        None,
    )
    .await
    .assert_refused(401, "token_used", "already used");

    ca.stop().await;
    ca.serve().await;
    ca.call(
        "POST",
        "/v1/svid",
        Some(&token),
        csr_pem(&p256(), &[WEB]).into_bytes(),
        None,
    )
    .await
    .assert_refused(401, "token_used", "already used");

    // A reusable token bootstraps several replicas.
    let reusable = ca.token(&id(WEB), Duration::from_secs(600), true);
    for _ in 0..3 {
        let r = ca
            .call(
                "POST",
                "/v1/svid",
                Some(&reusable),
                csr_pem(&p256(), &[WEB]).into_bytes(),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

#[tokio::test]
async fn renew_with_current_svid_and_its_refusals() {
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    let svid = ca.bootstrap(&id(WEB)).await;
    let old_serial = meshgate_ca::cert::cert_info(&svid.chain[0]).unwrap().serial;

    // Renew: same ID, new key.
    let new_key = p256();
    let resp = ca
        .call(
            "POST",
            "/v1/svid/renew",
            None,
            csr_pem(&new_key, &[WEB]).into_bytes(),
            Some(&svid),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let json = resp.json();
    assert_eq!(json["spiffe_id"], WEB);
    assert_ne!(json["serial"].as_str().unwrap(), old_serial);

    // Renew for another ID.
    ca.call(
        "POST",
        "/v1/svid/renew",
        None,
        csr_pem(&new_key, &[ADMIN]).into_bytes(),
        Some(&svid),
    )
    .await
    .assert_refused(403, "id_mismatch", ADMIN);

    // No client certificate.
    ca.call(
        "POST",
        "/v1/svid/renew",
        None,
        csr_pem(&new_key, &[WEB]).into_bytes(),
        None,
    )
    .await
    .assert_refused(401, "client_cert_missing", "client certificate");

    // Expired SVID, genuinely signed by this CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = ca.sign_leaf(
        &id(WEB),
        now - time::Duration::hours(2),
        now - time::Duration::hours(1),
    );
    ca.call(
        "POST",
        "/v1/svid/renew",
        None,
        csr_pem(&new_key, &[WEB]).into_bytes(),
        Some(&expired),
    )
    .await
    .assert_refused(401, "client_cert_invalid", "expired");

    // SVID for the same ID from a foreign CA.
    let other = TestCa::init();
    let foreign = other.sign_leaf(
        &id(WEB),
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    );
    ca.call(
        "POST",
        "/v1/svid/renew",
        None,
        csr_pem(&new_key, &[WEB]).into_bytes(),
        Some(&foreign),
    )
    .await
    .assert_refused(401, "client_cert_invalid", "foreign");

    // Garbage body with a valid client certificate.
    ca.call(
        "POST",
        "/v1/svid/renew",
        None,
        b"garbage".to_vec(),
        Some(&svid),
    )
    .await
    .assert_refused(400, "csr_malformed", "CERTIFICATE REQUEST");
}

#[tokio::test]
async fn plaintext_and_garbage_on_the_tls_port_do_not_hurt_the_ca() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    for junk in [
        &b"GET /v1/bundle HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0][..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
        tcp.write_all(junk).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        assert!(!String::from_utf8_lossy(&buf).contains("BEGIN CERTIFICATE"));
    }
    // Still serving.
    let resp = ca.call("GET", "/v1/bundle", None, vec![], None).await;
    assert_eq!(resp.status, 200);
}

/// Real clients: openssl makes the key and CSR, curl talks to the CA, openssl verifies the result.
#[tokio::test]
async fn curl_and_openssl_bootstrap_against_the_running_ca() {
    require_tool("curl");
    require_tool("openssl");
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    let work = tempfile::tempdir().unwrap();
    let (key, csr) = (work.path().join("key.pem"), work.path().join("csr.pem"));
    let mut req = Command::new("openssl");
    req.args([
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/O=test",
    ])
    .args(["-addext", &format!("subjectAltName=URI:{WEB}")])
    .arg("-keyout")
    .arg(&key)
    .arg("-out")
    .arg(&csr);
    let out = run_async(req).await;
    assert!(out.status.success(), "{}", text(&out));

    let root = ca.path("root.pem");
    let token = ca.token(&id(WEB), Duration::from_secs(60), false);
    let port = ca.addr().port();
    // curl verifies the CA by DNS name (localhost is in its serving certificate).
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--fail-with-body", "--cacert"])
        .arg(&root)
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--data-binary", &format!("@{}", csr.display())])
        .arg(format!("https://localhost:{port}/v1/svid"));
    let out = run_async(curl).await;
    assert!(out.status.success(), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let svid = work.path().join("svid.pem");
    std::fs::write(&svid, json["svid_pem"].as_str().unwrap()).unwrap();
    let mut verify = Command::new("openssl");
    verify
        .args(["verify", "-CAfile"])
        .arg(&root)
        .arg("-untrusted")
        .arg(ca.path("intermediate.pem"))
        .arg(&svid);
    let out = run_async(verify).await;
    assert!(out.status.success(), "{}", text(&out));

    // The bundle over curl as well, by IP this time.
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--fail", "--cacert"])
        .arg(&root)
        .arg(format!("https://127.0.0.1:{port}/v1/bundle"));
    let out = run_async(curl).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(out.stdout, ca.bundle_pem());
}

/// Whether the server closed `stream` within `wait` (EOF or error), or it is still open.
async fn closed_within<S: tokio::io::AsyncRead + Unpin + Send + 'static>(
    streams: Vec<S>,
    wait: Duration,
) -> (Vec<S>, usize) {
    use tokio::io::AsyncReadExt;
    let mut set = tokio::task::JoinSet::new();
    for mut s in streams {
        set.spawn(async move {
            let mut buf = [0u8; 256];
            let closed = match tokio::time::timeout(wait, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => true,
                Ok(Ok(n)) => panic!("the CA sent {n} bytes to a half-sent request"),
                Err(_) => false,
            };
            (s, closed)
        });
    }
    let (mut open, mut closed) = (Vec::new(), 0);
    while let Some(done) = set.join_next().await {
        match done.unwrap() {
            (_, true) => closed += 1,
            (s, false) => open.push(s),
        }
    }
    (open, closed)
}

fn ip(s: &str) -> Option<std::net::IpAddr> {
    Some(s.parse().unwrap())
}

/// The attack of the review, scaled down: half-sent connections from one source beyond its cap
/// are refused at once; the admitted ones (half-sent TLS handshakes and half-sent HTTP headers)
/// are held only until their deadline; while they are held, an anonymous client beyond the
/// unauthenticated share is refused but a renewal over mTLS is served. Refusals and timeouts
/// are counted in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_connections_cannot_stop_renewals() {
    use tokio::io::AsyncWriteExt;
    let deadline = Duration::from_secs(4);
    let limits = meshgate_ca::limits::ConnectionLimits {
        handshake_timeout: deadline,
        probation_handshake_timeout: Duration::from_secs(2),
        header_read_timeout: deadline,
        body_timeout: deadline,
        idle_timeout: deadline,
        max_connections: 24,
        reserved_for_peers: 8,
        max_connections_per_ip: 6,
    };
    let ca = TestCa::start_with_limits(Duration::from_secs(3600), limits).await;
    let now = time::OffsetDateTime::now_utc();
    let current = ca.sign_leaf(
        &id(WEB),
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    );

    // 10 connections from 127.0.0.1 that send the first 5 bytes of a TLS record and stop.
    let mut flood = Vec::new();
    for _ in 0..10 {
        let mut s = connect_from(ip("127.0.0.1"), ca.addr()).await;
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
        flood.push(s);
    }
    let (handshakes, refused) = closed_within(flood, Duration::from_millis(300)).await;
    assert_eq!(refused, 4, "beyond the per-IP cap of 6, refused at once");
    assert_eq!(handshakes.len(), 6);

    // 10 more from two other sources: TLS done (no client certificate), HTTP headers half sent.
    let bundle = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(ca.bundle()));
    let anonymous = std::sync::Arc::new(meshgate_ca::tls::mesh_client_config(
        bundle,
        meshgate_ca::tls::ExpectedServer::Exact(meshgate_ca::authority::ca_server_id(&ca.td)),
        None,
        &[b"http/1.1"],
    ));
    let mut headers = Vec::new();
    for source in ["127.0.0.3", "127.0.0.4"] {
        for _ in 0..5 {
            let tcp = connect_from(ip(source), ca.addr()).await;
            let mut tls = tokio_rustls::TlsConnector::from(anonymous.clone())
                .connect(meshgate_ca::tls::mesh_server_name(), tcp)
                .await
                .unwrap();
            tls.write_all(b"POST /v1/svid HTTP/1.1\r\nhost: ca\r\n")
                .await
                .unwrap();
            headers.push(tls);
        }
    }
    // The unauthenticated share (24 - 8 = 16) is now held. A new anonymous client is refused
    // right after its handshake, even with a valid join token...
    let token = ca.token(&id(ADMIN), Duration::from_secs(60), false);
    let anonymous_call = ca
        .call_from(
            ip("127.0.0.5"),
            "POST",
            "/v1/svid",
            Some(&token),
            csr_pem(&p256(), &[ADMIN]).into_bytes(),
            None,
        )
        .await;
    assert!(anonymous_call.is_err(), "{anonymous_call:?}");
    // ...but a workload renewing with its current SVID is served.
    let key = p256();
    let renewed = ca
        .call_from(
            ip("127.0.0.2"),
            "POST",
            "/v1/svid/renew",
            None,
            csr_pem(&key, &[WEB]).into_bytes(),
            Some(&current),
        )
        .await
        .unwrap();
    assert_eq!(renewed.status, 200, "{}", renewed.body);
    assert_eq!(renewed.json()["spiffe_id"], WEB);

    // The flood was still held open during the renewal...
    let (handshakes, closed) = closed_within(handshakes, Duration::from_millis(10)).await;
    assert_eq!(
        closed, 0,
        "half-sent handshakes closed before their deadline"
    );
    let (headers, closed) = closed_within(headers, Duration::from_millis(10)).await;
    assert_eq!(closed, 0, "half-sent requests closed before their deadline");
    // ...and every connection of it is closed at its deadline.
    let (open, _) = closed_within(handshakes, deadline + Duration::from_secs(3)).await;
    assert!(open.is_empty(), "{} handshakes still open", open.len());
    let (open, _) = closed_within(headers, deadline + Duration::from_secs(3)).await;
    assert!(
        open.is_empty(),
        "{} half-sent requests still open",
        open.len()
    );

    let metrics = ca
        .call_from(ip("127.0.0.2"), "GET", "/metrics", None, vec![], None)
        .await
        .unwrap();
    assert_eq!(metrics.status, 200);
    let count =
        |name: &str, label: &str| crate::support::mesh::sum_metric(&metrics.body, name, &[label]);
    assert_eq!(
        count("meshgate_ca_connections_refused_total", "per_ip_limit"),
        4.0,
        "{}",
        metrics.body
    );
    assert_eq!(
        count(
            "meshgate_ca_connections_refused_total",
            "unauthenticated_over_share"
        ),
        1.0,
        "{}",
        metrics.body
    );
    assert_eq!(
        count("meshgate_ca_connection_timeouts_total", "handshake"),
        6.0
    );
    assert_eq!(
        count("meshgate_ca_connection_timeouts_total", "header"),
        10.0
    );
}

/// A request whose body never completes is answered 408 at the body deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_times_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limits = meshgate_ca::limits::ConnectionLimits {
        body_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let ca = TestCa::start_with_limits(Duration::from_secs(3600), limits).await;
    let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let mut tls = ca
        .anonymous_connector()
        .connect(meshgate_ca::tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    let token = ca.token(&id(WEB), Duration::from_secs(60), false);
    tls.write_all(
        format!(
            "POST /v1/svid HTTP/1.1\r\nhost: ca\r\nauthorization: Bearer {token}\r\ncontent-length: 900\r\n\r\n-----BEGIN"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
}

/// The CA acknowledges a client's handshake at once, as the sidecar does: a client that leaves
/// Nagle's algorithm on is not held for the delayed-ACK timer on its first request.
#[tokio::test]
async fn first_request_from_a_nagle_client_is_not_held_for_a_delayed_ack() {
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    let took = crate::support::nagle_first_answers(
        ca.addr(),
        &ca.anonymous_connector(),
        b"GET /v1/bundle HTTP/1.1\r\nHost: ca\r\n\r\n",
    )
    .await;
    crate::support::assert_not_held_for_delayed_ack(&took);
}

/// An upload the CA refuses before reading it all — no token (`401`), or a body past its limit
/// (`413`) — is answered with its status, not reset: the CA goes on reading (and discarding)
/// what the client still sends before it closes. The client is Python's `http.client`, which,
/// like most scripts' clients, sends the whole body before it reads the answer; a body larger
/// than the sockets' buffers is still being sent when the CA answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_the_ca_refuses_get_their_answer() {
    require_tool("python3");
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    let token = ca.token(&id(WEB), Duration::from_secs(60), false);
    const CLIENT: &str = r#"
import http.client, ssl, sys
port, cafile, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = http.client.HTTPSConnection(
    "localhost", port, context=ssl.create_default_context(cafile=cafile), timeout=20)
headers = {"authorization": f"Bearer {token}"} if token else {}
try:
    conn.request("POST", "/v1/svid", body=b"x" * (8 << 20), headers=headers)
    print(conn.getresponse().status)
except OSError as e:
    print(type(e).__name__, e)
"#;
    for (token, expected) in [("", "401"), (token.as_str(), "413")] {
        for round in 0..3 {
            let mut client = Command::new("python3");
            client
                .args(["-c", CLIENT])
                .arg(ca.addr().port().to_string())
                .arg(ca.path("root.pem"))
                .arg(token);
            let out = run_async(client).await;
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                expected,
                "round {round}: the client got no answer: {}",
                text(&out)
            );
        }
    }
}
