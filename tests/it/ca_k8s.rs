//! Kubernetes ServiceAccount-token identity: tokens in the exact projected format, signed with
//! keys made here, checked by the CA against a JWKS it discovers and fetches over real HTTPS
//! (`support::k8s::Issuer`); and a real `meshgate ca serve --k8s-issuer` process issuing to a real
//! sidecar that holds only a projected token file.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshgate_ca::k8s::{JwksMetrics, K8sConfig, K8sVerifier};
use serde_json::{Value, json};

use crate::support::k8s::{Issuer, Signer, now, projected_claims, server_cert};
use crate::support::{ProxyProcess, TestCa, csr_pem, free_port, id, meshgate, require_tool};

/// Kills the process when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A table row: name, token, and the (namespace, account) it proves or the error code.
type Case = (
    &'static str,
    String,
    Result<(&'static str, &'static str), &'static str>,
);

fn verifier(config: K8sConfig) -> std::sync::Arc<K8sVerifier> {
    K8sVerifier::new(config, JwksMetrics::default()).unwrap()
}

/// The verification table: every way a token can be wrong is refused with its own code, and
/// the good ones (RS256 as clusters sign, ES256) name their ServiceAccount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_verification_table_against_a_jwks_over_https() {
    let rsa = Signer::rsa("rsa-1");
    let ec = Signer::ec("ec-1");
    let issuer = Issuer::start(vec![rsa.jwk(), ec.jwk()]).await;
    let v = verifier(issuer.config());
    assert_eq!(v.refresh().await.unwrap(), 2, "discovery → JWKS → 2 keys");
    assert_eq!(issuer.fetches(), 1);

    let iss = issuer.url.clone();
    let good = || projected_claims(&iss, "shop", "web", 600);
    let with = |tweak: fn(&mut Value)| {
        let mut c = good();
        tweak(&mut c);
        c
    };
    let forger = Signer::rsa("rsa-1"); // the cluster's kid, another key
    let stranger = Signer::rsa("rsa-unknown");
    let altered = {
        let token = rsa.sign(&good());
        let parts: Vec<&str> = token.split('.').collect();
        let claims = with(|c| {
            c["sub"] = "system:serviceaccount:shop:admin".into();
            c["kubernetes.io"]["serviceaccount"]["name"] = "admin".into();
        });
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(claims.to_string()),
            parts[2]
        )
    };
    let unsigned = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","kid":"rsa-1"}"#),
            b64.encode(good().to_string())
        )
    };
    let hmac_with_public_key = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signed = format!(
            "{}.{}",
            b64.encode(r#"{"alg":"HS256","kid":"rsa-1"}"#),
            b64.encode(good().to_string())
        );
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            rsa.jwk()["n"].as_str().unwrap().as_bytes(),
        );
        let tag = ring::hmac::sign(&key, signed.as_bytes());
        format!("{signed}.{}", b64.encode(tag.as_ref()))
    };

    let cases: Vec<Case> = vec![
        ("good RS256", rsa.sign(&good()), Ok(("shop", "web"))),
        ("good ES256", ec.sign(&good()), Ok(("shop", "web"))),
        (
            "good, single-string aud",
            rsa.sign(&with(|c| c["aud"] = "meshgate-ca".into())),
            Ok(("shop", "web")),
        ),
        (
            "forged signature",
            forger.sign(&good()),
            Err("token_invalid"),
        ),
        (
            "claims altered after signing",
            altered,
            Err("token_invalid"),
        ),
        (
            "expired",
            rsa.sign(&with(|c| {
                c["exp"] = (now() - 1).into();
                c["iat"] = (now() - 601).into();
                c["nbf"] = (now() - 601).into();
            })),
            Err("token_expired"),
        ),
        (
            "not yet valid",
            rsa.sign(&with(|c| c["nbf"] = (now() + 300).into())),
            Err("token_not_yet_valid"),
        ),
        (
            "issued in the future",
            rsa.sign(&with(|c| c["iat"] = (now() + 300).into())),
            Err("token_not_yet_valid"),
        ),
        (
            "wrong audience (the API server's)",
            rsa.sign(&with(|c| {
                c["aud"] = json!(["https://kubernetes.default.svc.cluster.local"])
            })),
            Err("token_wrong_audience"),
        ),
        (
            "wrong issuer",
            rsa.sign(&with(|c| c["iss"] = "https://other-cluster.example".into())),
            Err("token_wrong_issuer"),
        ),
        (
            "unknown key id",
            stranger.sign(&good()),
            Err("token_unknown_key"),
        ),
        (
            "missing claim: kubernetes.io",
            rsa.sign(&with(|c| {
                c.as_object_mut().unwrap().remove("kubernetes.io");
            })),
            Err("token_claims_invalid"),
        ),
        (
            "missing claim: sub",
            rsa.sign(&with(|c| {
                c.as_object_mut().unwrap().remove("sub");
            })),
            Err("token_claims_invalid"),
        ),
        (
            "missing claim: exp",
            rsa.sign(&with(|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            Err("token_claims_invalid"),
        ),
        (
            "missing claim: iss",
            rsa.sign(&with(|c| {
                c.as_object_mut().unwrap().remove("iss");
            })),
            Err("token_claims_invalid"),
        ),
        ("alg none", unsigned, Err("token_alg_refused")),
        (
            "HS256 keyed with the public key",
            hmac_with_public_key,
            Err("token_alg_refused"),
        ),
        (
            "RS256 header on the P-256 key",
            ec.sign_with_header(&json!({"alg": "RS256", "kid": "ec-1"}), &good()),
            Err("token_alg_refused"),
        ),
        (
            "sub and kubernetes.io disagree",
            rsa.sign(&with(|c| {
                c["sub"] = "system:serviceaccount:kube-system:admin".into()
            })),
            Err("token_claims_invalid"),
        ),
        (
            "not a ServiceAccount",
            rsa.sign(&with(|c| c["sub"] = "system:admin".into())),
            Err("token_claims_invalid"),
        ),
        (
            "not bound to a pod (kubectl create token)",
            rsa.sign(&with(|c| {
                c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
            })),
            Err("token_not_pod_bound"),
        ),
    ];
    for (name, token, want) in cases {
        let got = v.verify(&token, now()).await;
        match (want, got) {
            (Ok((ns, sa)), Ok(t)) => {
                assert_eq!(
                    (t.namespace.as_str(), t.service_account.as_str()),
                    (ns, sa),
                    "{name}"
                );
                assert_eq!(t.pod_name, "web-7d4b9c6f5-x2x9z", "{name}");
            }
            (Err(code), Err(e)) => assert_eq!(e.code(), code, "{name}: {e}"),
            (want, got) => panic!("{name}: wanted {want:?}, got {got:?}"),
        }
    }
    // The unknown kid re-fetched the key set once; another one right after does not (at most
    // one re-fetch per 10 s, so forged kids cannot make the CA hammer the API server).
    assert_eq!(issuer.fetches(), 2, "one re-fetch for the unknown kid");
    let again = v.verify(&stranger.sign(&good()), now()).await.unwrap_err();
    assert_eq!(again.code(), "token_unknown_key");
    assert!(again.to_string().contains("--k8s-issuer"), "{again}");
    assert_eq!(issuer.fetches(), 2, "rate-limited");

    // Messages name the cause and the fix.
    let aud = v
        .verify(&rsa.sign(&with(|c| c["aud"] = json!(["vault"]))), now())
        .await
        .unwrap_err()
        .to_string();
    assert!(aud.contains("audience: meshgate-ca"), "{aud}");
}

/// The key set follows the cluster: a rotated-in key is picked up on its first token; a failed
/// refresh keeps the last good keys; an unreachable or misconfigured issuer gives errors that
/// say what to fix, and tokens wait (503) instead of being judged without keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_set_rotation_outage_and_misconfiguration() {
    let old = Signer::rsa("old");
    let issuer = Issuer::start(vec![old.jwk()]).await;
    let v = verifier(issuer.config());
    v.refresh().await.unwrap();
    let claims = projected_claims(&issuer.url, "shop", "orders", 600);

    // Rotation: the API server publishes a new key and signs with it.
    let new = Signer::rsa("new");
    issuer.set_keys(vec![old.jwk(), new.jwk()]);
    let t = v.verify(&new.sign(&claims), now()).await.unwrap();
    assert_eq!(t.service_account, "orders");

    // The API server fails: the refresh fails, the keys stay.
    issuer.set_failing(true);
    let err = v.refresh().await.unwrap_err().to_string();
    assert!(err.contains("500"), "{err}");
    v.verify(&old.sign(&claims), now()).await.unwrap();
    issuer.set_failing(false);

    // Nothing listening: not fatal, but tokens are refused as "keys unavailable" (503, retried).
    let nowhere = verifier(K8sConfig {
        issuer: format!("https://127.0.0.1:{}", free_port()),
        ..issuer.config()
    });
    let err = nowhere.verify(&old.sign(&claims), now()).await.unwrap_err();
    assert_eq!(err.code(), "k8s_keys_unavailable", "{err}");
    assert!(err.to_string().contains("connect"), "{err}");

    // Misconfigurations, each with its fix.
    let no_bearer = verifier(K8sConfig {
        api_token_file: None,
        ..issuer.config()
    });
    let err = no_bearer.refresh().await.unwrap_err().to_string();
    assert!(
        err.contains("401") && err.contains("--k8s-api-token-file"),
        "{err}"
    );
    let other_roots = verifier(K8sConfig {
        api_ca_pem: server_cert().0.into_bytes(),
        ..issuer.config()
    });
    let err = other_roots.refresh().await.unwrap_err().to_string();
    assert!(err.contains("--k8s-api-ca"), "{err}");
    let slash = verifier(K8sConfig {
        issuer: format!("{}/", issuer.url),
        ..issuer.config()
    });
    let err = slash.refresh().await.unwrap_err().to_string();
    assert!(err.contains("must be exactly"), "{err}");
    // A fixed JWKS URL skips discovery.
    let fixed = verifier(K8sConfig {
        issuer: "https://kubernetes.default.svc.cluster.local".into(),
        jwks_url: Some(format!("{}/openid/v1/jwks", issuer.url)),
        ..issuer.config()
    });
    assert_eq!(fixed.refresh().await.unwrap(), 2);
    let plain = K8sVerifier::new(
        K8sConfig {
            issuer: "http://kubernetes.default.svc".into(),
            ..issuer.config()
        },
        JwksMetrics::default(),
    );
    assert!(plain.is_err_and(|e| e.to_string().contains("https://")));
}

/// The background refresh: a CA that starts while the API server fails refuses tokens with 503
/// (not as invalid) and accepts them once the keys arrive, then re-fetches periodically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_arrive_after_a_failed_start_and_are_refreshed_periodically() {
    let key = Signer::ec("k");
    let issuer = Issuer::start(vec![key.jwk()]).await;
    issuer.set_failing(true);
    let v = verifier(K8sConfig {
        refresh_interval: Duration::from_millis(300),
        ..issuer.config()
    });
    let refresh = tokio::spawn(v.clone().run_refresh());
    let token = key.sign(&projected_claims(&issuer.url, "shop", "web", 600));
    let err = v.verify(&token, now()).await.unwrap_err();
    assert_eq!(err.code(), "k8s_keys_unavailable", "{err}");
    assert!(
        err.to_string().contains("500"),
        "the reason is quoted: {err}"
    );

    issuer.set_failing(false);
    let started = std::time::Instant::now();
    let accepted = loop {
        match v.verify(&token, now()).await {
            Ok(t) => break t,
            Err(e) => {
                assert_eq!(e.code(), "k8s_keys_unavailable", "{e}");
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "keys never arrived: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(accepted.service_account, "web");
    let fetched = issuer.fetches();
    tokio::time::timeout(Duration::from_secs(5), async {
        while issuer.fetches() < fetched + 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the key set is re-fetched every refresh interval");
    refresh.abort();
}

/// A CA without --k8s-issuer says so when it gets a ServiceAccount token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_without_k8s_issuer_names_the_flag() {
    let ca = TestCa::start(Duration::from_secs(3600)).await;
    let token = Signer::ec("k").sign(&projected_claims("https://k8s.example", "shop", "web", 600));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = csr_pem(&key, &["spiffe://mesh.local/ns/shop/sa/web"]);
    ca.call("POST", "/v1/svid", Some(&token), csr.into_bytes(), None)
        .await
        .assert_refused(401, "sa_token_disabled", "--k8s-issuer");
}

async fn curl_json(url: String) -> Option<Value> {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl").args(["-sf", &url]).output().unwrap()
    })
    .await
    .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// End to end with real processes: a sidecar holding only a projected token file starts before
/// the CA; its token expires and kubelet writes a fresh one while the CA is down; `meshgate ca
/// serve --k8s-issuer` comes up and the sidecar gets spiffe://mesh.local/ns/shop/sa/web — with
/// the token it re-read. Forged tokens and CSRs for another ID are refused; join tokens still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_bootstraps_from_a_projected_token_with_a_real_ca_process() {
    require_tool("curl");
    let rsa = Signer::rsa("cluster-key");
    let issuer = Issuer::start(vec![rsa.jwk()]).await;
    let mut ca = TestCa::init();
    let base = ca.tmp.path().to_path_buf();
    let ca_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    // The pod's files: the projected token (about to expire) and the CA bundle next to it.
    let mount = base.join("bootstrap");
    let short = projected_claims(&issuer.url, "shop", "web", 2);
    let short_exp = short["exp"].as_i64().unwrap();
    let token_file = Issuer::write_token(&mount, &rsa.sign(&short));
    std::fs::copy(ca.path("bundle.pem"), mount.join("ca-bundle.pem")).unwrap();
    let policies = base.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("p.yaml"),
        "apiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: { name: r, namespace: shop }\n\
         spec:\n  selector: { account: web }\n  action: ALLOW\n  rules:\n    - from: [{ principals: [\"spiffe://mesh.local/ns/shop/sa/orders\"] }]\n",
    )
    .unwrap();
    let (inbound, admin) = (free_port(), free_port());
    let sidecar_log = base.join("sidecar.log");
    let child = meshgate()
        .args(["proxy", "--app", "127.0.0.1:9"])
        .args(["--ca", &format!("https://{ca_addr}")])
        .arg("--ca-bundle")
        .arg(mount.join("ca-bundle.pem"))
        .arg("--token-file")
        .arg(&token_file)
        .arg("--policy-dir")
        .arg(&policies)
        .args(["--inbound", &format!("127.0.0.1:{inbound}")])
        .args(["--outbound", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .env("MESHGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&sidecar_log).unwrap())
        .spawn()
        .unwrap();
    let mut sidecar = ProxyProcess {
        child: Some(child),
        inbound,
        admin,
    };

    // The first token expires while the CA is down; kubelet writes a fresh one.
    while now() <= short_exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        sidecar
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the sidecar keeps retrying while the CA is down: {}",
        std::fs::read_to_string(&sidecar_log).unwrap()
    );
    Issuer::write_token(
        &mount,
        &rsa.sign(&projected_claims(&issuer.url, "shop", "web", 600)),
    );

    let ca_log = base.join("ca.log");
    let _ca_process = KillOnDrop(
        meshgate()
            .args(["ca", "serve", "--dir"])
            .arg(&ca.dir)
            .args(["--listen", &ca_addr.to_string()])
            .args(["--k8s-issuer", &issuer.url])
            .arg("--k8s-api-ca")
            .arg(&issuer.ca_pem)
            .arg("--k8s-api-token-file")
            .arg(&issuer.api_token)
            .env("MESHGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&ca_log).unwrap())
            .spawn()
            .unwrap(),
    );
    ca.served_by_process_at(ca_addr);

    // The sidecar retries with backoff (up to 8 s between attempts by now).
    let identity_url = format!("http://127.0.0.1:{admin}/identity");
    let mut identity = None;
    for _ in 0..200 {
        if let Some(json) = curl_json(identity_url.clone()).await {
            identity = Some(json);
            break;
        }
        assert!(
            sidecar
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
                .is_none(),
            "sidecar exited:\n{}",
            std::fs::read_to_string(&sidecar_log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let identity = identity.unwrap_or_else(|| {
        panic!(
            "no SVID within 20 s\nsidecar:\n{}\nCA:\n{}",
            std::fs::read_to_string(&sidecar_log).unwrap(),
            std::fs::read_to_string(&ca_log).unwrap()
        )
    });
    assert_eq!(
        identity["id"], "spiffe://mesh.local/ns/shop/sa/web",
        "{identity}"
    );
    sidecar.ready().await;
    let ca_text = crate::support::log_when(&ca_log, "the CA's line naming the pod", |t| {
        t.contains("k8s.token_accepted") && t.contains("shop/web-7d4b9c6f5-x2x9z")
    })
    .await;
    assert!(
        !ca_text.contains("token_expired"),
        "the stale token was never sent:\n{ca_text}"
    );

    // A forged token (the cluster's kid, another key) asking for an admin identity: refused.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let admin_csr = csr_pem(&key, &["spiffe://mesh.local/ns/shop/sa/admin"]);
    let forged =
        Signer::rsa("cluster-key").sign(&projected_claims(&issuer.url, "shop", "admin", 600));
    ca.call(
        "POST",
        "/v1/svid",
        Some(&forged),
        admin_csr.clone().into_bytes(),
        None,
    )
    .await
    .assert_refused(401, "token_invalid", "forged");
    // web's genuine token with a CSR for admin: the ID comes from the claims only.
    let web_token = std::fs::read_to_string(&token_file).unwrap();
    ca.call(
        "POST",
        "/v1/svid",
        Some(&web_token),
        admin_csr.into_bytes(),
        None,
    )
    .await
    .assert_refused(403, "id_mismatch", "spiffe://mesh.local/ns/shop/sa/web");
    // Not spent: the pod's token bootstraps again until it expires (a restarted sidecar).
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let again = ca
        .call(
            "POST",
            "/v1/svid",
            Some(&web_token),
            csr_pem(&key, &["spiffe://mesh.local/ns/shop/sa/web"]).into_bytes(),
            None,
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(
        again.json()["spiffe_id"],
        "spiffe://mesh.local/ns/shop/sa/web"
    );
    // Join tokens keep working on the same CA.
    ca.bootstrap(&id("spiffe://mesh.local/ns/shop/sa/orders"))
        .await;

    let metrics = ca.call("GET", "/metrics", None, vec![], None).await.body;
    for line in [
        "meshgate_ca_svid_refusals_total{code=\"token_invalid\"} 1",
        "meshgate_ca_svid_refusals_total{code=\"id_mismatch\"} 1",
        "meshgate_ca_k8s_jwks_keys 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
}
