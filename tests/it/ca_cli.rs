//! `meshgate ca …` as a user runs it, with the system's openssl checking the results.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::support::*;

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_ca_with_private_keys_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out = run(meshgate().args(["ca", "init", "--dir"]).arg(&dir));
    assert!(out.status.success(), "{}", text(&out));
    for key in ["root.key", "intermediate.key", "token.key"] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }
    assert!(dir.join("bundle.pem").exists());
    let root_before = std::fs::read(dir.join("root.pem")).unwrap();

    let again = run(meshgate().args(["ca", "init", "--dir"]).arg(&dir));
    assert!(!again.status.success());
    assert!(text(&again).contains("--force"), "{}", text(&again));
    assert_eq!(
        std::fs::read(dir.join("root.pem")).unwrap(),
        root_before,
        "must not overwrite without --force"
    );

    let forced = run(meshgate()
        .args(["ca", "init", "--force", "--dir"])
        .arg(&dir));
    assert!(forced.status.success(), "{}", text(&forced));
    assert_ne!(std::fs::read(dir.join("root.pem")).unwrap(), root_before);

    let bad_td = run(meshgate()
        .args(["ca", "init", "--trust-domain", "Mesh.Local", "--dir"])
        .arg(tmp.path().join("x")));
    assert!(!bad_td.status.success());
    assert!(text(&bad_td).contains("lowercase"), "{}", text(&bad_td));
}

#[test]
fn issued_svid_verifies_with_openssl_and_has_the_svid_shape() {
    require_tool("openssl");
    let ca = TestCa::init();
    let out_dir = ca.tmp.path().join("web");
    let out = run(meshgate()
        .args(["ca", "issue", "--dir"])
        .arg(&ca.dir)
        .args(["--id", WEB, "--ttl", "30m", "--out"])
        .arg(&out_dir));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&out_dir.join("key.pem")), 0o600);

    let verify = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(ca.path("root.pem"))
        .arg("-untrusted")
        .arg(ca.path("intermediate.pem"))
        .arg(out_dir.join("svid.pem")));
    assert!(verify.status.success(), "{}", text(&verify));

    // The leaf alone (first PEM block of svid.pem), as openssl prints it.
    let shown = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(out_dir.join("svid.pem")));
    let shown = text(&shown);
    assert!(shown.contains(&format!("URI:{WEB}")), "{shown}");
    assert!(shown.contains("CA:FALSE"), "{shown}");
    assert!(
        shown.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{shown}"
    );
    assert!(shown.contains("Digital Signature"), "{shown}");
    assert!(!shown.contains("Certificate Sign"), "{shown}");
    assert!(shown.contains("ASN1 OID: prime256v1"), "{shown}");
    assert_eq!(shown.matches("URI:").count(), 1, "{shown}");

    // The key belongs to the certificate.
    let cert_pub = run(Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(out_dir.join("svid.pem")));
    let key_pub = run(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(out_dir.join("key.pem")));
    assert_eq!(cert_pub.stdout, key_pub.stdout);

    // A certificate from a foreign CA does not verify against our root.
    let other = TestCa::init();
    let foreign_out = other.tmp.path().join("web");
    assert!(
        run(meshgate()
            .args(["ca", "issue", "--dir"])
            .arg(&other.dir)
            .args(["--id", WEB, "--out"])
            .arg(&foreign_out))
        .status
        .success()
    );
    let verify = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(ca.path("root.pem"))
        .arg("-untrusted")
        .arg(ca.path("intermediate.pem"))
        .arg(foreign_out.join("svid.pem")));
    assert!(!verify.status.success(), "a foreign SVID must not verify");
}

#[test]
fn inspect_prints_id_serial_validity_and_chain_status() {
    let ca = TestCa::init();
    let out_dir = ca.tmp.path().join("web");
    assert!(
        run(meshgate()
            .args(["ca", "issue", "--dir"])
            .arg(&ca.dir)
            .args(["--id", WEB, "--out"])
            .arg(&out_dir))
        .status
        .success()
    );
    let out = run(meshgate()
        .args(["ca", "inspect"])
        .arg(out_dir.join("svid.pem")));
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains(&format!("spiffe id:  {WEB}")), "{shown}");
    assert!(shown.contains("serial:"), "{shown}");
    assert!(shown.contains("not after:"), "{shown}");
    assert!(shown.contains("chain:      valid"), "{shown}");

    // Against a foreign bundle the chain is reported invalid and the exit code says so.
    let other = TestCa::init();
    let out = run(meshgate()
        .args(["ca", "inspect"])
        .arg(out_dir.join("svid.pem"))
        .arg("--bundle")
        .arg(other.path("bundle.pem")));
    assert!(!out.status.success());
    assert!(text(&out).contains("INVALID"), "{}", text(&out));

    // A file that is not a certificate is a clear error, not a crash.
    let junk = ca.tmp.path().join("junk.pem");
    std::fs::write(&junk, "hello").unwrap();
    let out = run(meshgate().args(["ca", "inspect"]).arg(&junk));
    assert!(!out.status.success());
    assert!(text(&out).contains("no CERTIFICATE"), "{}", text(&out));
}

#[test]
fn ca_refuses_a_key_readable_by_others() {
    let ca = TestCa::init();
    let key = ca.path("intermediate.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [
        vec!["ca", "serve", "--listen", "127.0.0.1:0", "--dir"],
        vec![
            "ca",
            "issue",
            "--id",
            WEB,
            "--out",
            "/nonexistent/never-written",
            "--dir",
        ],
    ] {
        let out = run(meshgate().args(&args).arg(&ca.dir));
        assert!(!out.status.success(), "{args:?} must refuse");
        let msg = text(&out);
        assert!(
            msg.contains(&key.display().to_string()),
            "error must name the file: {msg}"
        );
        assert!(msg.contains("0644") && msg.contains("chmod 600"), "{msg}");
    }
    // The token secret too.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(ca.path("token.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run(meshgate()
        .args(["ca", "token", "--id", WEB, "--dir"])
        .arg(&ca.dir));
    assert!(!out.status.success());
    assert!(text(&out).contains("token.key"), "{}", text(&out));
}

#[test]
fn token_is_bound_to_an_id_in_the_trust_domain() {
    let ca = TestCa::init();
    let out = run(meshgate()
        .args(["ca", "token", "--id", WEB, "--ttl", "5m", "--dir"])
        .arg(&ca.dir));
    assert!(out.status.success(), "{}", text(&out));
    let token = String::from_utf8(out.stdout).unwrap();
    let claims = meshgate_ca::token::TokenClaims::peek(token.trim()).unwrap();
    assert_eq!(claims.id.as_str(), WEB);
    assert!(!claims.reusable);
    let lifetime = claims.exp - meshgate_ca::token::now_unix();
    assert!((290..=300).contains(&lifetime), "{lifetime}");

    for bad in [
        "spiffe://other.domain/ns/a/sa/b",
        "spiffe://mesh.local/ns/../sa/b",
        "not-an-id",
    ] {
        let out = run(meshgate()
            .args(["ca", "token", "--id", bad, "--dir"])
            .arg(&ca.dir));
        assert!(!out.status.success(), "{bad} must be refused");
    }
}

#[test]
fn serve_reports_a_taken_port() {
    let ca = TestCa::init();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = run(meshgate()
        .args([
            "ca",
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
        ])
        .arg(&ca.dir));
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains(&port.to_string()) && msg.contains("--listen"),
        "{msg}"
    );
}
