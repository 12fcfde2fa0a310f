//! A stand-in for a Kubernetes API server's service-account issuer: OIDC discovery and the JWKS
//! over real HTTPS (a test CA signs the server's certificate; a bearer token is required, as the
//! API server requires one), and projected ServiceAccount tokens in the exact format kubelet
//! mounts, signed with keys generated here (RSA by `openssl genpkey`, P-256 by ring). Nothing is
//! committed: every key is made at test time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use meshgate_ca::k8s::K8sConfig;
use rcgen::{CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair as _};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

use super::{require_tool, run};

/// The bearer token the fake API server demands (what the CA's own pod token would be).
const API_TOKEN: &str = "ca-pod-api-token";

/// A ServiceAccount signing key of the cluster.
pub enum Signer {
    Rsa {
        kid: String,
        key: signature::RsaKeyPair,
    },
    Ec {
        kid: String,
        key: signature::EcdsaKeyPair,
    },
}

impl Signer {
    /// A fresh 2048-bit RSA key (what API servers sign with: RS256).
    pub fn rsa(kid: &str) -> Self {
        require_tool("openssl");
        let out = run(std::process::Command::new("openssl").args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-outform",
            "DER",
        ]));
        assert!(out.status.success(), "openssl genpkey failed");
        // OpenSSL 3 writes DER keys as PKCS#1 (RSAPrivateKey); older ones as PKCS#8.
        let key = signature::RsaKeyPair::from_der(&out.stdout)
            .or_else(|_| signature::RsaKeyPair::from_pkcs8(&out.stdout))
            .unwrap();
        Self::Rsa {
            kid: kid.into(),
            key,
        }
    }

    /// A fresh P-256 key (ES256).
    pub fn ec(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        Self::Ec {
            kid: kid.into(),
            key: signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap(),
        }
    }

    pub fn kid(&self) -> &str {
        match self {
            Self::Rsa { kid, .. } | Self::Ec { kid, .. } => kid,
        }
    }

    fn alg(&self) -> &'static str {
        match self {
            Self::Rsa { .. } => "RS256",
            Self::Ec { .. } => "ES256",
        }
    }

    /// The public key as the API server publishes it at /openid/v1/jwks.
    pub fn jwk(&self) -> Value {
        match self {
            Self::Rsa { kid, key } => {
                let public: signature::RsaPublicKeyComponents<Vec<u8>> = key.public().into();
                json!({"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256",
                       "n": B64.encode(&public.n), "e": B64.encode(&public.e)})
            }
            Self::Ec { kid, key } => {
                let point = key.public_key().as_ref();
                json!({"use": "sig", "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                       "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..])})
            }
        }
    }

    /// A compact JWS of `claims` with the header Kubernetes writes (`alg`, `kid`).
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(&json!({"alg": self.alg(), "kid": self.kid()}), claims)
    }

    /// A compact JWS with any header (to forge `alg` or `kid`).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let sig = match self {
            Self::Rsa { key, .. } => {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    signed.as_bytes(),
                    &mut sig,
                )
                .unwrap();
                sig
            }
            Self::Ec { key, .. } => key.sign(&rng, signed.as_bytes()).unwrap().as_ref().to_vec(),
        };
        format!("{signed}.{}", B64.encode(sig))
    }
}

/// Current Unix time.
pub fn now() -> i64 {
    meshgate_ca::token::now_unix()
}

/// The claims of a projected ServiceAccount token exactly as kubelet gets them from the
/// TokenRequest API (Kubernetes 1.30+: with `jti` and the node binding), valid from `now` for
/// `ttl` seconds.
pub fn projected_claims(issuer: &str, namespace: &str, account: &str, ttl: i64) -> Value {
    let now = now();
    json!({
        "aud": ["meshgate-ca"],
        "exp": now + ttl,
        "iat": now,
        "iss": issuer,
        "jti": "9f0c2a4e-5b1d-4c3e-8a7f-1e2d3c4b5a69",
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "kind-worker", "uid": "6d1e3f0a-7c2b-4e5d-9f8a-0b1c2d3e4f5a"},
            "pod": {"name": format!("{account}-7d4b9c6f5-x2x9z"), "uid": "3f1d9a52-8e6b-4d7e-8c55-8a1b2c3d4e5f"},
            "serviceaccount": {"name": account, "uid": "a1b2c3d4-9e8f-4e5f-8a9b-0c1d2e3f4a5b"}
        },
        "nbf": now,
        "sub": format!("system:serviceaccount:{namespace}:{account}")
    })
}

/// The fake issuer: `https://127.0.0.1:<port>` serving discovery and JWKS.
pub struct Issuer {
    pub url: String,
    pub addr: SocketAddr,
    /// PEM of the CA that signed the server certificate (`--k8s-api-ca`).
    pub ca_pem: PathBuf,
    /// File holding the bearer token the server wants (`--k8s-api-token-file`).
    pub api_token: PathBuf,
    keys: Arc<ArcSwap<Vec<Value>>>,
    /// JWKS documents served so far.
    pub jwks_fetches: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    _tmp: tempfile::TempDir,
}

impl Issuer {
    /// Starts serving `keys` (JWKs).
    pub async fn start(keys: Vec<Value>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let (ca_pem, chain, key) = server_cert();
        let ca_path = tmp.path().join("api-ca.pem");
        std::fs::write(&ca_path, ca_pem).unwrap();
        let token_path = tmp.path().join("api-token");
        std::fs::write(&token_path, format!("{API_TOKEN}\n")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("https://127.0.0.1:{}", addr.port());
        let mut config = rustls::ServerConfig::builder_with_provider(meshgate_ca::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, PrivatePkcs8KeyDer::from(key.serialize_der()).into())
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let keys = Arc::new(ArcSwap::from_pointee(keys));
        let jwks_fetches = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let state = (
            keys.clone(),
            jwks_fetches.clone(),
            failing.clone(),
            url.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = state.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(req, &state)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            url,
            addr,
            ca_pem: ca_path,
            api_token: token_path,
            keys,
            jwks_fetches,
            failing,
            task,
            _tmp: tmp,
        }
    }

    /// Replaces the published keys (a key rotation).
    pub fn set_keys(&self, keys: Vec<Value>) {
        self.keys.store(Arc::new(keys));
    }

    /// Makes every request fail with 500 (an API server in trouble), or serve again.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    pub fn fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }

    /// The CA's verifier settings for this issuer (discovery, the test CA, the bearer token).
    pub fn config(&self) -> K8sConfig {
        K8sConfig {
            issuer: self.url.clone(),
            audience: "meshgate-ca".into(),
            jwks_url: None,
            api_ca_pem: std::fs::read(&self.ca_pem).unwrap(),
            api_token_file: Some(self.api_token.clone()),
            refresh_interval: meshgate_ca::k8s::REFRESH_INTERVAL,
            refetch_min_gap: meshgate_ca::k8s::REFETCH_MIN_GAP,
        }
    }

    /// Writes a token file and the CA bundle next to it, as the injected pod mounts them.
    pub fn write_token(dir: &Path, token: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("token");
        // kubelet replaces the file atomically (a symlink swap); a rename is the same to readers.
        let tmp = dir.join("..token.tmp");
        std::fs::write(&tmp, token).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type State = (
    Arc<ArcSwap<Vec<Value>>>,
    Arc<AtomicUsize>,
    Arc<AtomicBool>,
    String,
);

fn answer(
    req: http::Request<hyper::body::Incoming>,
    (keys, fetches, failing, url): &State,
) -> http::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    if failing.load(Ordering::SeqCst) {
        return reply(500, "{}".into());
    }
    let authorized = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == format!("Bearer {API_TOKEN}").as_bytes());
    if !authorized {
        return reply(
            401,
            r#"{"kind":"Status","code":401,"reason":"Unauthorized"}"#.into(),
        );
    }
    match req.uri().path() {
        "/.well-known/openid-configuration" => reply(
            200,
            json!({
                "issuer": url,
                "jwks_uri": format!("{url}/openid/v1/jwks"),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"]
            })
            .to_string(),
        ),
        "/openid/v1/jwks" => {
            fetches.fetch_add(1, Ordering::SeqCst);
            reply(200, json!({"keys": **keys.load()}).to_string())
        }
        _ => reply(404, "{}".into()),
    }
}

/// A test CA (PEM) and a server certificate chain for 127.0.0.1 signed by it, with its key.
pub fn server_cert() -> (String, Vec<CertificateDer<'static>>, KeyPair) {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test kubernetes CA");
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
        SanType::DnsName("localhost".try_into().unwrap()),
    ];
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), vec![leaf.der().clone()], key)
}
