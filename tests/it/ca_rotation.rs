//! Root rotation without restarts: `meshgate ca rotate` makes a new root and intermediate sign,
//! the running CA follows by itself, workloads pick up the two-root bundle by themselves, old and
//! new SVIDs verify each other during the overlap, and `--finish` retires the old root.

use std::time::Duration;

use crate::support::*;
use meshgate_proxy::identity::{Backoff, IdentityClient, IdentityConfig};
use rustls_pki_types::UnixTime;

fn config(ca: &TestCa, name: &str) -> IdentityConfig {
    IdentityConfig {
        ca_url: ca.url(),
        ca_bundle_pem: ca.bundle_pem(),
        token: ca
            .token(
                &id(&format!("spiffe://mesh.local/ns/shop/sa/{name}")),
                Duration::from_secs(60),
                false,
            )
            .into(),
        bundle_refresh: Duration::from_millis(200),
        backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_the_root_without_restarting_anything() {
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    let old_root = std::fs::read(ca.path("root.pem")).unwrap();
    let a = IdentityClient::new(config(&ca, "a"))
        .unwrap()
        .start()
        .await
        .unwrap();
    let a_leaf = a.resolver().current().unwrap().cert.clone();

    let mut rotate = meshgate();
    rotate.args(["ca", "rotate", "--dir"]).arg(&ca.dir);
    let out = run_async(rotate).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("trusts 2 roots"), "{}", text(&out));
    assert_ne!(std::fs::read(ca.path("root.pem")).unwrap(), old_root);

    // A (issued under the old root) learns the two-root bundle without a restart.
    for _ in 0..50 {
        if a.bundle().load().certs().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        a.bundle().load().certs().len(),
        2,
        "bundle refresh picked up the new root"
    );

    // B bootstraps from the same, still running CA: it is signed under the new root.
    let b = IdentityClient::new(config(&ca, "b"))
        .unwrap()
        .start()
        .await
        .unwrap();
    let b_leaf = b.resolver().current().unwrap().cert.clone();
    let old_only = meshgate_ca::TrustBundle::from_pem(&old_root).unwrap();
    assert!(
        old_only
            .verify_client(&b_leaf[0], &b_leaf[1..], UnixTime::now())
            .is_err(),
        "B is under the new root"
    );

    // During the overlap each trusts the other.
    a.bundle()
        .load()
        .verify_client(&b_leaf[0], &b_leaf[1..], UnixTime::now())
        .expect("A trusts B");
    b.bundle()
        .load()
        .verify_client(&a_leaf[0], &a_leaf[1..], UnixTime::now())
        .expect("B trusts A");

    // Finish: only the new root stays; A's old-root SVID no longer verifies against the CA bundle.
    let mut finish = meshgate();
    finish
        .args(["ca", "rotate", "--finish", "--dir"])
        .arg(&ca.dir);
    let out = run_async(finish).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(ca.bundle().certs().len(), 1);
    assert!(
        ca.bundle()
            .verify_client(&a_leaf[0], &a_leaf[1..], UnixTime::now())
            .is_err()
    );
    ca.bundle()
        .verify_client(&b_leaf[0], &b_leaf[1..], UnixTime::now())
        .expect("new-root SVIDs stay valid");
}
