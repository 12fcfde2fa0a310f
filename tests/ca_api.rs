//! The CA's HTTPS API: issuance, and each refusal with its status, code and message.

mod support;

use std::process::Command;
use std::time::Duration;

use rcgen::{BasicConstraints, IsCa, KeyPair, PublicKeyData, SanType};
use support::*;

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
