//! Kubernetes ServiceAccount-token identity: the CA accepts a projected ServiceAccount token
//! (a JWT the API server signs) instead of a join token, verifies it against the cluster's
//! published keys, and issues `spiffe://<td>/ns/<namespace>/sa/<serviceaccount>` from the
//! verified claims only. No per-workload Secret, no call to the API server per request.
//!
//! Why the published keys (OIDC discovery + JWKS) rather than the TokenReview API: verification
//! is local and costs no API-server round trip per bootstrap, and the CA needs only the
//! read-only `system:service-account-issuer-discovery` role instead of `tokenreviews/create`.
//! The price: a token stays good until its `exp` even if its pod is deleted (TokenReview would
//! notice). Projected tokens live 10 minutes (`expirationSeconds: 600`), which bounds that.
//!
//! Key handling: the key set is fetched at start and every [`REFRESH_INTERVAL`], and again when a
//! token names an unknown key id (a rotated signing key), at most once per [`REFETCH_MIN_GAP`]
//! so forged kids cannot make the CA hammer the API server. A failed fetch keeps the last good
//! key set. A CA that starts while the API server is unreachable still starts: it serves join
//! tokens and renewals, and refuses ServiceAccount tokens with `503 k8s_keys_unavailable`
//! (which sidecars retry) until the keys arrive.

pub mod jwks;
pub mod jwt;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

pub use jwt::{K8sTokenError, ServiceAccountToken, looks_like_jwt, peek_service_account};

use crate::backoff::Backoff;

/// The default audience the CA requires (`--k8s-audience`): projected tokens are minted for it.
pub const DEFAULT_AUDIENCE: &str = "meshgate-ca";
/// In-cluster root certificates of the API server (the default of `--k8s-api-ca`).
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// In-cluster ServiceAccount token of the CA's own pod (the default of `--k8s-api-token-file`).
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// How often the key set is re-fetched: every 5 minutes (API servers rotate signing keys
/// rarely, and announce new keys in the JWKS before they sign with them).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Least time between two fetches triggered by unknown key ids: 10 s.
pub const REFETCH_MIN_GAP: Duration = Duration::from_secs(10);

/// How the CA checks ServiceAccount tokens (`meshgate ca serve --k8s-*`).
#[derive(Clone)]
pub struct K8sConfig {
    /// The cluster's service-account issuer; tokens' `iss` must equal it.
    pub issuer: String,
    /// The audience tokens must carry.
    pub audience: String,
    /// Fixed JWKS URL; `None`: OIDC discovery at the issuer.
    pub jwks_url: Option<String>,
    /// PEM roots for the HTTPS fetches.
    pub api_ca_pem: Vec<u8>,
    /// Bearer token for the fetches, re-read each time.
    pub api_token_file: Option<PathBuf>,
    /// Re-fetch period ([`REFRESH_INTERVAL`] in production).
    pub refresh_interval: Duration,
    /// Least gap between unknown-kid re-fetches ([`REFETCH_MIN_GAP`] in production).
    pub refetch_min_gap: Duration,
}

impl std::fmt::Debug for K8sConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("jwks_url", &self.jwks_url)
            .field("api_token_file", &self.api_token_file)
            .finish_non_exhaustive()
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum K8sConfigError {
    #[error("--k8s-issuer {url:?}: {reason} (e.g. https://kubernetes.default.svc.cluster.local)")]
    Issuer { url: String, reason: String },
    #[error("--k8s-jwks-url {url:?}: {reason}")]
    JwksUrl { url: String, reason: String },
    #[error("--k8s-audience must not be empty")]
    Audience,
    #[error("--k8s-api-ca: {0}")]
    Roots(String),
}

/// Metric handles the verifier updates (registered by the CA service).
#[derive(Clone, Default)]
pub struct JwksMetrics {
    /// Usable keys in the current key set.
    pub keys: Gauge,
    /// Fetches by result (`ok` | `error`).
    pub fetches: Family<ResultLabel, Counter>,
}

/// The `result` label of `meshgate_ca_k8s_jwks_fetches_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Verifies ServiceAccount tokens against the cluster's current key set.
pub struct K8sVerifier {
    config: K8sConfig,
    expect: jwt::Expectations,
    fetcher: jwks::Fetcher,
    keys: ArcSwapOption<jwt::KeySet>,
    /// Why the last fetch failed (cleared by a success); quoted while no keys are known.
    last_error: Mutex<Option<String>>,
    /// When the last on-demand (unknown kid) fetch started; held across the fetch so concurrent
    /// requests wait for it instead of fetching again.
    refetch: tokio::sync::Mutex<Option<Instant>>,
    metrics: JwksMetrics,
}

impl K8sVerifier {
    /// Checks the configuration (URLs are https, roots parse); fetches nothing yet.
    pub fn new(config: K8sConfig, metrics: JwksMetrics) -> Result<Arc<Self>, K8sConfigError> {
        let issuer_uri =
            jwks::https_url(&config.issuer).map_err(|reason| K8sConfigError::Issuer {
                url: config.issuer.clone(),
                reason,
            })?;
        if issuer_uri.query().is_some() {
            return Err(K8sConfigError::Issuer {
                url: config.issuer.clone(),
                reason: "an issuer has no query".into(),
            });
        }
        if let Some(url) = &config.jwks_url {
            jwks::https_url(url).map_err(|reason| K8sConfigError::JwksUrl {
                url: url.clone(),
                reason,
            })?;
        }
        if config.audience.is_empty() {
            return Err(K8sConfigError::Audience);
        }
        let fetcher = jwks::Fetcher::new(&config.api_ca_pem, config.api_token_file.clone())
            .map_err(K8sConfigError::Roots)?;
        Ok(Arc::new(Self {
            expect: jwt::Expectations {
                issuer: config.issuer.clone(),
                audience: config.audience.clone(),
            },
            config,
            fetcher,
            keys: ArcSwapOption::empty(),
            last_error: Mutex::new(Some("not fetched yet".into())),
            refetch: tokio::sync::Mutex::new(None),
            metrics,
        }))
    }

    /// The configured issuer.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// Fetches the key set once; on success it replaces the current one, on failure the current
    /// one stays (and the error is logged, counted and returned).
    pub async fn refresh(&self) -> Result<usize, jwks::JwksError> {
        match self
            .fetcher
            .fetch(&self.config.issuer, self.config.jwks_url.as_deref())
            .await
        {
            Ok(set) => {
                let count = set.len();
                self.keys.store(Some(Arc::new(set)));
                *self.last_error.lock().expect("k8s error lock") = None;
                self.metrics.keys.set(count as i64);
                self.metrics
                    .fetches
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                tracing::debug!(
                    event = "k8s.jwks_fetched",
                    keys = count,
                    "ServiceAccount signing keys fetched"
                );
                Ok(count)
            }
            Err(e) => {
                *self.last_error.lock().expect("k8s error lock") = Some(e.to_string());
                self.metrics
                    .fetches
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                if self.keys.load().is_some() {
                    tracing::warn!(
                        event = "k8s.jwks_fetch_failed",
                        error = %e,
                        have_keys = true,
                        "cannot refresh the cluster's ServiceAccount signing keys; keeping the last good set"
                    );
                } else {
                    tracing::warn!(
                        event = "k8s.jwks_fetch_failed",
                        error = %e,
                        have_keys = false,
                        "cannot fetch the cluster's ServiceAccount signing keys; ServiceAccount tokens are refused (503) until they arrive. \
                         Check --k8s-issuer (or --k8s-jwks-url), --k8s-api-ca, --k8s-api-token-file and the CA's RBAC (system:service-account-issuer-discovery)"
                    );
                }
                Err(e)
            }
        }
    }

    /// Keeps the key set fresh: fetches at once, retries with backoff (1 s doubling to 30 s)
    /// until the first success, then every refresh interval. Runs until dropped/aborted.
    pub async fn run_refresh(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut failing = true;
        loop {
            let pause = match self.refresh().await {
                Ok(keys) => {
                    if failing {
                        tracing::info!(event = "k8s.jwks_ready", keys, issuer = %self.config.issuer, "ServiceAccount signing keys fetched; ServiceAccount tokens are accepted");
                    }
                    failing = false;
                    backoff.reset();
                    self.config.refresh_interval
                }
                Err(_) if self.keys.load().is_none() => {
                    failing = true;
                    backoff.pause()
                }
                Err(_) => self.config.refresh_interval.min(Duration::from_secs(30)),
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Verifies a token at Unix time `now`. An unknown key id triggers one (rate-limited)
    /// re-fetch before the token is refused.
    pub async fn verify(
        &self,
        token: &str,
        now: i64,
    ) -> Result<ServiceAccountToken, K8sTokenError> {
        // Reject what is not even a well-formed, acceptably-signed token before any fetch.
        let kid = jwt::key_id(token)?;
        let keys = match self.keys.load_full() {
            Some(keys) if keys.get(&kid).is_some() => keys,
            _ => {
                self.refetch_for_unknown_kid().await;
                match self.keys.load_full() {
                    Some(keys) => keys,
                    None => {
                        return Err(K8sTokenError::KeysUnavailable {
                            reason: self
                                .last_error
                                .lock()
                                .expect("k8s error lock")
                                .clone()
                                .unwrap_or_else(|| "not fetched yet".into()),
                        });
                    }
                }
            }
        };
        jwt::verify(token, &keys, &self.expect, now)
    }

    /// Re-fetches unless another re-fetch started less than the minimum gap ago.
    async fn refetch_for_unknown_kid(&self) {
        let mut last = self.refetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.config.refetch_min_gap) {
            return;
        }
        *last = Some(Instant::now());
        let _ = self.refresh().await;
    }
}
