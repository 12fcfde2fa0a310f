//! The workload side of identity: obtain an SVID from the CA with a join token or a Kubernetes
//! ServiceAccount token, keep it fresh, and publish it (and the trust bundle) to TLS without ever
//! dropping a connection.
//!
//! Rules this module keeps, because other meshes learned them the hard way:
//! - the private key is generated here and never sent anywhere; each renewal uses a new key;
//! - a failed renewal never discards a certificate that is still valid (retry with backoff);
//! - the trust bundle is refreshed and swapped live, so a root rotation needs no restart.

pub mod ca_client;
pub mod static_files;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use meshgate_ca::api::SvidResponse;
use meshgate_ca::cert::{self, CertInfo};
use meshgate_ca::tls::{self, CertResolver, SharedTrustBundle};
use meshgate_ca::token::TokenClaims;
use meshgate_ca::{SpiffeId, TrustBundle};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{PrivatePkcs8KeyDer, UnixTime};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

pub use ca_client::{CaCallError, CaEndpoint};

/// Why the identity client cannot start or obtain an SVID.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("join token: {0}")]
    Token(#[from] meshgate_ca::token::TokenError),
    #[error("{0}")]
    ServiceAccountToken(#[from] meshgate_ca::k8s::K8sTokenError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Ca(#[from] CaCallError),
    #[error("the CA returned an unusable SVID: {0}")]
    BadSvid(String),
    #[error("cannot create a key or CSR: {0}")]
    Key(String),
}

/// Retry pacing when the CA cannot be reached (jittered: [`meshgate_ca::backoff::Backoff`]).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The pacing state of one retry loop.
    fn pacing(&self) -> meshgate_ca::backoff::Backoff {
        meshgate_ca::backoff::Backoff::new(self.initial, self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// The credential a workload bootstraps with: a join token (`mgjt1.…`, from `meshgate ca
/// token`) or a Kubernetes projected ServiceAccount token (a JWT); the CA tells them apart.
#[derive(Clone)]
pub enum BootstrapToken {
    /// A fixed value (`--token`, `MESHGATE_TOKEN`).
    Value(String),
    /// A file, read again before every bootstrap attempt (`--token-file`): kubelet rewrites a
    /// projected token before it expires, so the value read at start goes stale while, say,
    /// the CA is down.
    File(PathBuf),
}

impl std::fmt::Debug for BootstrapToken {
    /// Never prints the token itself: it is a credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Value(_) => f.write_str("Value(<redacted>)"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl From<String> for BootstrapToken {
    fn from(token: String) -> Self {
        Self::Value(token)
    }
}

impl BootstrapToken {
    /// The token now (the file's current content, trimmed).
    pub fn read(&self) -> Result<String, IdentityError> {
        match self {
            Self::Value(token) => Ok(token.trim().to_string()),
            Self::File(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    IdentityError::Config(format!(
                        "reading the bootstrap token from {}: {e}",
                        path.display()
                    ))
                })?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(IdentityError::Config(format!(
                        "{} is empty: write a join token from `meshgate ca token` into it, or mount a projected ServiceAccount token there",
                        path.display()
                    )));
                }
                Ok(token.to_string())
            }
        }
    }
}

/// The SPIFFE ID to put in the CSR for `token`. Read **without** verification (the workload
/// holds no keys): a join token names its ID; a ServiceAccount token names a namespace and
/// account, and the trust domain is the one the CA's roots carry. The CA issues from what it
/// verifies and refuses a CSR asking for anything else, so a wrong guess here only fails.
pub fn requested_id(token: &str, bundle: &TrustBundle) -> Result<SpiffeId, IdentityError> {
    if meshgate_ca::k8s::looks_like_jwt(token) {
        let (namespace, account) = meshgate_ca::k8s::peek_service_account(token)?;
        let td = bundle.trust_domain().map_err(|e| {
            IdentityError::Config(format!(
                "a ServiceAccount token names no trust domain, and the CA bundle does not either ({e}); use the bundle of `meshgate ca serve` (its bundle.pem)"
            ))
        })?;
        return td.workload_id(&namespace, &account).map_err(|e| {
            IdentityError::Config(format!(
                "ServiceAccount {namespace}/{account} makes no valid SPIFFE ID: {e}"
            ))
        });
    }
    Ok(TokenClaims::peek(token)?.id)
}

/// How the identity client finds and talks to the CA.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// `https://host:port` of `meshgate ca serve`.
    pub ca_url: String,
    /// Roots that the CA's serving certificate chains to (replaced by the CA's bundle once fetched).
    pub ca_bundle_pem: Vec<u8>,
    /// Join token or ServiceAccount token; it also names the ID to ask for.
    pub token: BootstrapToken,
    /// How often the trust bundle is re-fetched between renewals.
    pub bundle_refresh: Duration,
    pub backoff: Backoff,
}

/// Observable state of the workload's identity (for `/identity` and readiness).
#[derive(Debug, Clone, Serialize)]
pub struct IdentityStatus {
    pub id: SpiffeId,
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Successful renewals since start.
    pub renewals: u64,
    /// The last renewal or bundle error, cleared by the next success.
    pub last_error: Option<String>,
    /// `not_before..not_after` on the system clock: every inbound request checks it, and
    /// building an `OffsetDateTime` for now cost more than the comparison.
    #[serde(skip)]
    valid: std::ops::Range<std::time::SystemTime>,
}

impl IdentityStatus {
    /// True while the certificate is within its validity period.
    pub fn is_valid(&self) -> bool {
        self.valid.contains(&std::time::SystemTime::now())
    }
}

/// The shared, always-current identity of a workload: hand `resolver()` to rustls and read the
/// bundle through `bundle()`; both are swapped atomically behind the readers' backs.
pub struct Identity {
    id: SpiffeId,
    resolver: Arc<CertResolver>,
    bundle: SharedTrustBundle,
    status: ArcSwapOption<IdentityStatus>,
    /// Bumped at each bundle change, so servers can rebuild configs that embed the roots.
    bundle_generation: watch::Sender<u64>,
    /// Bumped at each new SVID, so pooled client connections made with the old one are retired.
    svid_generation: watch::Sender<u64>,
}

impl Identity {
    /// An identity for `id` with no certificate yet, trusting `bundle`.
    fn new(id: SpiffeId, bundle: TrustBundle) -> Self {
        Self {
            id,
            resolver: Arc::new(CertResolver::default()),
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
            status: ArcSwapOption::empty(),
            bundle_generation: watch::channel(0).0,
            svid_generation: watch::channel(0).0,
        }
    }

    /// Checks a certificate chain (chains to `bundle`, names this identity's ID, matches `key`)
    /// and only then publishes chain, key and bundle. A chain that fails the check is never
    /// served: peers would refuse it anyway, and the current one may still be good.
    fn publish(
        &self,
        chain: Vec<rustls_pki_types::CertificateDer<'static>>,
        key: rustls_pki_types::PrivateKeyDer<'static>,
        bundle: TrustBundle,
        renewals: u64,
    ) -> Result<(), IdentityError> {
        let bad = |e: &dyn std::fmt::Display| IdentityError::BadSvid(e.to_string());
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| bad(&"empty certificate chain"))?;
        let info: CertInfo = bundle
            .verify_client(leaf, intermediates, UnixTime::now())
            .map_err(|e| bad(&e))?;
        if info.id != self.id {
            return Err(bad(&format!(
                "certificate is for {} instead of {}",
                info.id, self.id
            )));
        }
        self.resolver.publish(chain, key).map_err(|e| bad(&e))?;
        self.set_bundle(bundle);
        tracing::info!(
            event = "identity.svid_installed",
            id = %info.id,
            serial = %info.serial,
            not_after = %cert::rfc3339(info.not_after),
            renewals,
            "SVID installed"
        );
        self.status.store(Some(Arc::new(IdentityStatus {
            id: info.id,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            renewals,
            last_error: None,
            valid: info.not_before.into()..info.not_after.into(),
        })));
        self.svid_generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Notifies on every new SVID.
    pub fn svid_changes(&self) -> watch::Receiver<u64> {
        self.svid_generation.subscribe()
    }

    /// The SPIFFE ID this workload holds (or is bootstrapping).
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Certificate resolver for rustls server and client configs.
    pub fn resolver(&self) -> Arc<CertResolver> {
        self.resolver.clone()
    }

    /// The trust bundle (read it at each use; it changes).
    pub fn bundle(&self) -> SharedTrustBundle {
        self.bundle.clone()
    }

    /// Current status; `None` before the first SVID.
    pub fn status(&self) -> Option<Arc<IdentityStatus>> {
        self.status.load_full()
    }

    /// Ready = holds a certificate that is valid now.
    pub fn is_ready(&self) -> bool {
        // A guard, not a clone of the `Arc`: no shared counter written per request.
        (*self.status.load()).as_ref().is_some_and(|s| s.is_valid())
    }

    /// Notifies on every trust-bundle change.
    pub fn bundle_changes(&self) -> watch::Receiver<u64> {
        self.bundle_generation.subscribe()
    }

    fn set_bundle(&self, bundle: TrustBundle) {
        let changed = self.bundle.load().certs() != bundle.certs();
        if changed {
            tracing::info!(
                event = "identity.bundle_updated",
                roots = bundle.certs().len(),
                "trust bundle updated"
            );
            self.bundle.store(Arc::new(bundle));
            self.bundle_generation.send_modify(|g| *g += 1);
        }
    }

    fn note_error(&self, error: &str) {
        if let Some(status) = self.status() {
            let mut next = (*status).clone();
            next.last_error = Some(error.to_string());
            self.status.store(Some(Arc::new(next)));
        }
    }
}

/// Obtains and renews the workload's SVID.
pub struct IdentityClient {
    identity: Arc<Identity>,
    endpoint: CaEndpoint,
    /// The last token read successfully: used when the file cannot be read for a moment
    /// (kubelet swaps it by symlink, a read can race the swap).
    last_token: Mutex<String>,
    config: IdentityConfig,
}

/// A new P-256 key and a CSR asking for `id` (and nothing else).
fn key_and_csr(id: &SpiffeId) -> Result<(KeyPair, String), IdentityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(id.as_str().to_string().try_into().map_err(
            |e: rcgen::Error| IdentityError::Key(e.to_string()),
        )?)];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    Ok((key, csr))
}

/// A random fraction in `[0, 1)`.
fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    tls::random_bytes(&mut b);
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// When to renew: at 50% of the remaining lifetime, minus up to 10% jitter so that a fleet
/// bootstrapped together does not renew together.
pub fn renewal_delay(not_after: OffsetDateTime, now: OffsetDateTime) -> Duration {
    let remaining = (not_after - now).as_seconds_f64().max(0.0);
    Duration::from_secs_f64(remaining * (0.5 - 0.1 * random_unit()))
}

impl IdentityClient {
    /// Prepares the client; the token names the ID (it is verified by the CA, not here).
    pub fn new(config: IdentityConfig) -> Result<Self, IdentityError> {
        let token = config.token.read()?;
        let bundle = TrustBundle::from_pem(&config.ca_bundle_pem)
            .map_err(|e| IdentityError::Config(format!("CA bundle: {e}")))?;
        let id = requested_id(&token, &bundle)?;
        let identity = Arc::new(Identity::new(id.clone(), bundle));
        let endpoint = CaEndpoint::new(&config.ca_url, &id.trust_domain(), identity.bundle())
            .map_err(|e| IdentityError::Config(e.to_string()))?;
        Ok(Self {
            identity,
            endpoint,
            last_token: Mutex::new(token),
            config,
        })
    }

    /// The token to bootstrap with now: the file re-read, or the last good value if it cannot
    /// be read this instant.
    fn current_token(&self) -> String {
        let mut last = self.last_token.lock().expect("token lock");
        match self.config.token.read() {
            Ok(token) => *last = token,
            Err(e) => {
                tracing::warn!(event = "identity.token_unreadable", error = %e, "using the token read before")
            }
        }
        last.clone()
    }

    /// True when the token may bootstrap again after the SVID expired: ServiceAccount tokens
    /// (reusable until they expire, and the file is kept fresh) and reusable join tokens.
    fn may_bootstrap_again(token: &str) -> bool {
        meshgate_ca::k8s::looks_like_jwt(token)
            || TokenClaims::peek(token).is_ok_and(|claims| claims.reusable)
    }

    /// The shared identity handle.
    pub fn identity(&self) -> Arc<Identity> {
        self.identity.clone()
    }

    /// Obtains the first SVID, retrying with backoff while the CA is unreachable. A refusal
    /// (bad token, wrong ID) is returned at once: retrying cannot fix it.
    pub async fn bootstrap(&self) -> Result<(), IdentityError> {
        let mut backoff = self.config.backoff.pacing();
        loop {
            let (key, csr) = key_and_csr(&self.identity.id)?;
            match self.endpoint.bootstrap(&self.current_token(), &csr).await {
                Ok(resp) => return self.install(resp, key, 0),
                Err(e) if e.is_transient() => {
                    let delay = backoff.pause();
                    tracing::warn!(event = "identity.bootstrap_retry", id = %self.identity.id, error = %e, retry_in_ms = delay.as_millis() as u64);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Publishes a CA answer (checked by [`Identity::publish`]).
    fn install(
        &self,
        resp: SvidResponse,
        key: KeyPair,
        renewals: u64,
    ) -> Result<(), IdentityError> {
        let bad = |e: &dyn std::fmt::Display| IdentityError::BadSvid(e.to_string());
        let chain = cert::certs_from_pem(resp.svid_pem.as_bytes()).map_err(|e| bad(&e))?;
        let bundle = TrustBundle::from_pem(resp.bundle_pem.as_bytes()).map_err(|e| bad(&e))?;
        self.identity.publish(
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            bundle,
            renewals,
        )
    }

    async fn renew_once(&self) -> Result<(), IdentityError> {
        let renewals = self.identity.status().map_or(0, |s| s.renewals);
        let (key, csr) = key_and_csr(&self.identity.id)?;
        let resp = self.endpoint.renew(self.identity.resolver(), &csr).await?;
        self.install(resp, key, renewals + 1)
    }

    async fn refresh_bundle(&self) -> Result<(), IdentityError> {
        let pem = self.endpoint.bundle().await?;
        let bundle = TrustBundle::from_pem(&pem)
            .map_err(|e| IdentityError::BadSvid(format!("bundle: {e}")))?;
        self.identity.set_bundle(bundle);
        Ok(())
    }

    /// Keeps the SVID and bundle fresh forever. Call after [`bootstrap`](Self::bootstrap).
    pub async fn run(self) {
        let mut backoff = self.config.backoff.pacing();
        let mut next_renewal = self.next_renewal();
        let mut bundle_tick = tokio::time::interval(self.config.bundle_refresh);
        bundle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        bundle_tick.tick().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_renewal) => {
                    match self.renew_once().await {
                        Ok(()) => {
                            backoff.reset();
                            next_renewal = self.next_renewal();
                        }
                        Err(e) => {
                            let retry_in = backoff.pause();
                            // Keep serving the current certificate while it is valid.
                            let still_valid = self.identity.is_ready();
                            tracing::warn!(
                                event = "identity.renew_failed",
                                id = %self.identity.id,
                                error = %e,
                                still_valid,
                                retry_in_ms = retry_in.as_millis() as u64,
                                "renewal failed; keeping the current SVID"
                            );
                            if !still_valid {
                                tracing::error!(event = "identity.expired", id = %self.identity.id, "SVID expired and could not be renewed: the workload has no valid identity");
                                if Self::may_bootstrap_again(&self.current_token())
                                    && self.bootstrap_once().await
                                {
                                    next_renewal = self.next_renewal();
                                    continue;
                                }
                            }
                            self.identity.note_error(&e.to_string());
                            next_renewal = tokio::time::Instant::now() + retry_in;
                        }
                    }
                }
                _ = bundle_tick.tick() => {
                    if let Err(e) = self.refresh_bundle().await {
                        tracing::warn!(event = "identity.bundle_refresh_failed", error = %e, "keeping the current trust bundle");
                    }
                }
            }
        }
    }

    async fn bootstrap_once(&self) -> bool {
        let Ok((key, csr)) = key_and_csr(&self.identity.id) else {
            return false;
        };
        match self.endpoint.bootstrap(&self.current_token(), &csr).await {
            Ok(resp) => self.install(resp, key, 0).is_ok(),
            Err(_) => false,
        }
    }

    fn next_renewal(&self) -> tokio::time::Instant {
        let delay = self.identity.status().map_or(Duration::ZERO, |s| {
            renewal_delay(s.not_after, OffsetDateTime::now_utc())
        });
        tokio::time::Instant::now() + delay
    }

    /// Bootstraps, then renews in a background task. Returns the shared identity.
    pub async fn start(self) -> Result<Arc<Identity>, IdentityError> {
        self.bootstrap().await?;
        let identity = self.identity();
        tokio::spawn(self.run());
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_between_40_and_50_percent_of_remaining() {
        let now = OffsetDateTime::now_utc();
        for _ in 0..1000 {
            let d = renewal_delay(now + time::Duration::seconds(100), now).as_secs_f64();
            assert!((40.0..=50.0).contains(&d), "{d}");
        }
        assert_eq!(
            renewal_delay(now - time::Duration::seconds(5), now),
            Duration::ZERO
        );
    }

    /// The ID a workload asks for: a join token names it; a ServiceAccount token names the
    /// namespace and account, the CA bundle the trust domain.
    #[test]
    fn requested_id_from_either_token() {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let td = meshgate_ca::TrustDomain::new("mesh.local").unwrap();
        let ca = meshgate_ca::Authority::create(&td).unwrap();
        let bundle = TrustBundle::from_pem(ca.root_pem.as_bytes()).unwrap();
        let web = SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web").unwrap();
        let key = meshgate_ca::token::TokenKey::from_secret(&[7; 32]);
        let (join, _) = key.mint(&web, Duration::from_secs(60), false);
        assert_eq!(requested_id(&join, &bundle).unwrap(), web);
        // A JWT's parts are base64url; only the payload is read here (nothing is verified).
        let payload = serde_json::json!({"sub": "system:serviceaccount:shop:web"}).to_string();
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{}.c2ln", B64.encode(payload));
        assert_eq!(requested_id(&jwt, &bundle).unwrap(), web);
        let not_sa = serde_json::json!({"sub": "system:admin"}).to_string();
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{}.c2ln", B64.encode(not_sa));
        assert!(requested_id(&jwt, &bundle).is_err());
    }

    /// Valid from `not_before` (inclusive) until `not_after` (exclusive), read on the system
    /// clock: not yet valid, valid, expired.
    #[test]
    fn a_status_is_valid_within_its_certificate_window() {
        let now = OffsetDateTime::now_utc();
        let status = |from: i64, until: i64| {
            let (not_before, not_after) = (
                now + time::Duration::seconds(from),
                now + time::Duration::seconds(until),
            );
            IdentityStatus {
                id: SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web").unwrap(),
                serial: "1".into(),
                not_before,
                not_after,
                renewals: 0,
                last_error: None,
                valid: not_before.into()..not_after.into(),
            }
        };
        assert!(!status(60, 3600).is_valid(), "not yet valid");
        assert!(status(-60, 3600).is_valid());
        assert!(!status(-3600, -1).is_valid(), "expired");
    }

    #[test]
    fn csr_asks_for_exactly_the_id() {
        let id = SpiffeId::parse("spiffe://mesh.local/ns/shop/sa/web").unwrap();
        let (_, csr) = key_and_csr(&id).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
        assert!(
            matches!(&parsed.params.subject_alt_names[0], SanType::URI(u) if u.as_str() == id.as_str())
        );
    }
}
