//! The CA's HTTPS issuing service (`meshgate ca serve`).
//!
//! One listener, TLS 1.3 only, serving cert chained to the root and naming the CA's SPIFFE ID.
//! Client certificates are requested but not required at the handshake; only `/v1/svid/renew`
//! needs one, and it validates the chain itself so a bad certificate gets a readable refusal.
//! Every issuance and every refusal is one structured log line (`event`, `id`, `serial`,
//! `not_after`, `reason`).
//!
//! Every connection phase has a deadline and connections are capped per process and per source
//! IP, with a share reserved for peers presenting a valid SVID (see [`crate::limits`]), so
//! anonymous clients cannot hold the CA and stop renewals.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer, UnixTime,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::api::{self, ErrorResponse, SvidResponse};
use crate::authority::{Authority, CsrError, IssuedSvid};
use crate::backoff::Backoff;
use crate::cert;
use crate::k8s::{K8sConfig, K8sConfigError, K8sTokenError, K8sVerifier};
use crate::limits::{Admission, Admit, ConnectionLimits, Phase, Refusal, Slot};
use crate::spiffe::SpiffeId;
use crate::store::{LoadedCa, StoreError};
use crate::tls::{self, CertResolver, DeferredClientVerifier, TrustBundle};
use crate::token::{self, NonceLedger, TokenError, TokenKey};

/// How long the CA's own serving certificate lives; it is re-issued at half that.
const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Grace for a connection past its header or idle deadline to close cleanly before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Largest HTTP/1 header block read: 16 KiB (a CA request has a handful of short headers).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// HTTP/2 streams per connection at once: 16 (a sidecar makes one request at a time).
const MAX_STREAMS: u32 = 16;

/// Settings of `meshgate ca serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Lifetime of issued SVIDs.
    pub svid_ttl: Duration,
    /// DNS names / IPs put in the serving certificate besides the CA's SPIFFE ID.
    pub serving_hosts: Vec<String>,
    /// Timeouts and connection caps ([`ConnectionLimits::default`] in production).
    pub limits: ConnectionLimits,
    /// Accept Kubernetes ServiceAccount tokens at `/v1/svid` (`--k8s-issuer`); `None`: join
    /// tokens only.
    pub k8s: Option<K8sConfig>,
}

/// A refusal: status, stable code, and a message saying what to fix.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The SPIFFE ID the request was about, when known (for the refusal log line).
    id: Option<SpiffeId>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl ToString) -> Self {
        Self {
            status,
            code,
            message: message.to_string(),
            id: None,
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        let code = match &e {
            TokenError::Malformed => "token_malformed",
            TokenError::BadSignature => "token_invalid",
            TokenError::Expired { .. } => "token_expired",
            TokenError::AlreadyUsed { .. } => "token_used",
            TokenError::Ledger { .. } => {
                return Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
            }
        };
        Self::new(StatusCode::UNAUTHORIZED, code, e)
    }
}

impl From<K8sTokenError> for ApiError {
    fn from(e: K8sTokenError) -> Self {
        // Missing keys are the CA's problem and may resolve by themselves: 503, which sidecars
        // retry. Everything else is about the token: 401, final.
        let status = match e {
            K8sTokenError::KeysUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        Self::new(status, e.code(), e)
    }
}

impl From<CsrError> for ApiError {
    fn from(e: CsrError) -> Self {
        let (status, code) = match &e {
            CsrError::Malformed(_) => (StatusCode::BAD_REQUEST, "csr_malformed"),
            CsrError::BadSignature => (StatusCode::BAD_REQUEST, "csr_bad_signature"),
            CsrError::UnsupportedKey => (StatusCode::BAD_REQUEST, "csr_unsupported_key"),
            CsrError::NoId { .. } => (StatusCode::BAD_REQUEST, "csr_no_id"),
            CsrError::WrongId { .. } => (StatusCode::FORBIDDEN, "id_mismatch"),
            CsrError::ForeignTrustDomain { .. } => (StatusCode::FORBIDDEN, "foreign_trust_domain"),
            CsrError::Signing(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, code, e)
    }
}

/// The trust bundle as served, re-read from `bundle.pem` when the file changes so that adding a
/// new root (rotation) needs no restart. A broken file is logged and the last good bundle kept.
struct BundleSource {
    ca: crate::store::CaDir,
    current: ArcSwap<TrustBundle>,
    seen_mtime: Mutex<Option<SystemTime>>,
}

impl BundleSource {
    fn new(ca: crate::store::CaDir) -> Result<Self, StoreError> {
        let bundle = ca.read_bundle()?;
        let mtime = std::fs::metadata(ca.bundle_path())
            .and_then(|m| m.modified())
            .ok();
        Ok(Self {
            ca,
            current: ArcSwap::from_pointee(bundle),
            seen_mtime: Mutex::new(mtime),
        })
    }

    fn get(&self) -> Arc<TrustBundle> {
        let mtime = std::fs::metadata(self.ca.bundle_path())
            .and_then(|m| m.modified())
            .ok();
        let mut seen = self.seen_mtime.lock().expect("bundle lock");
        if mtime != *seen {
            *seen = mtime;
            match self.ca.read_bundle() {
                Ok(bundle) => {
                    tracing::info!(
                        event = "bundle.reloaded",
                        roots = bundle.certs().len(),
                        "trust bundle changed on disk"
                    );
                    self.current.store(Arc::new(bundle));
                }
                Err(e) => {
                    tracing::error!(event = "bundle.reload_failed", error = %e, "keeping the last good trust bundle")
                }
            }
        }
        self.current.load_full()
    }
}

/// The signing intermediate, re-read when `meshgate ca rotate` replaces it, so a rotation needs
/// no restart. A replacement that does not load is logged and the current one kept.
struct SignerSource {
    ca: crate::store::CaDir,
    current: ArcSwap<Authority>,
    seen_mtime: Mutex<Option<SystemTime>>,
}

impl SignerSource {
    fn get(&self) -> Arc<Authority> {
        let mtime = self.ca.intermediate_mtime();
        let mut seen = self.seen_mtime.lock().expect("signer lock");
        if mtime != *seen {
            *seen = mtime;
            let td = self.current.load().trust_domain().clone();
            match self.ca.load_authority(td) {
                Ok(authority) => {
                    tracing::info!(
                        event = "ca.intermediate_reloaded",
                        "signing with the rotated intermediate"
                    );
                    self.current.store(Arc::new(authority));
                }
                Err(e) => {
                    tracing::error!(event = "ca.intermediate_reload_failed", error = %e, "keeping the current intermediate")
                }
            }
        }
        self.current.load_full()
    }
}

/// Shared state of the running CA service.
struct CaState {
    signer: SignerSource,
    tokens: TokenKey,
    ledger: Mutex<NonceLedger>,
    bundle: BundleSource,
    svid_ttl: Duration,
    admission: Arc<Admission>,
    /// ServiceAccount-token verification, when enabled.
    k8s: Option<Arc<K8sVerifier>>,
}

/// A bound, not yet running CA service.
pub struct CaServer {
    listener: TcpListener,
    state: Arc<CaState>,
    serving: Arc<CertResolver>,
    serving_hosts: Vec<String>,
    acceptor: TlsAcceptor,
}

/// Why the CA service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "cannot listen on {addr}: {source} (is another process using the port? pass --listen to choose another)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot issue the CA's serving certificate: {0}")]
    ServingCert(String),
    #[error(transparent)]
    K8s(#[from] K8sConfigError),
}

impl CaServer {
    /// Binds `listen` and prepares the TLS listener.
    pub async fn bind(
        ca: LoadedCa,
        listen: SocketAddr,
        options: ServeOptions,
    ) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: listen,
                source,
            })?;
        let mut serving_hosts = options.serving_hosts.clone();
        serving_hosts.extend([
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ]);
        if !listen.ip().is_unspecified() {
            serving_hosts.push(listen.ip().to_string());
        }
        serving_hosts.sort();
        serving_hosts.dedup();
        let admission = Admission::new(options.limits.clone());
        let k8s = options
            .k8s
            .map(|config| K8sVerifier::new(config, admission.metrics.jwks.clone()))
            .transpose()?;
        let state = Arc::new(CaState {
            ledger: Mutex::new(ca.dir.ledger()?),
            bundle: BundleSource::new(ca.dir.clone())?,
            signer: SignerSource {
                seen_mtime: Mutex::new(ca.dir.intermediate_mtime()),
                current: ArcSwap::from_pointee(ca.authority),
                ca: ca.dir.clone(),
            },
            tokens: ca.tokens,
            svid_ttl: options.svid_ttl,
            admission,
            k8s,
        });
        let serving = Arc::new(CertResolver::default());
        refresh_serving_cert(&state.signer.get(), &serving, &serving_hosts)?;
        let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(DeferredClientVerifier::default()))
            .with_cert_resolver(serving.clone());
        tls::prefer_our_suites(&mut config);
        // No resumption: /v1/svid/renew trusts the client certificate of *this* handshake.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            listener,
            state,
            serving,
            serving_hosts,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown` completes; then stops accepting and closes open connections.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            state,
            serving,
            serving_hosts,
            acceptor,
        } = self;
        tracing::info!(
            event = "ca.listening",
            addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            trust_domain = %state.signer.get().trust_domain(),
            svid_ttl_secs = state.svid_ttl.as_secs(),
            "CA serving"
        );
        // The key set is fetched in the background: an unreachable API server must not keep
        // the CA (and every renewal) down; ServiceAccount tokens wait for the keys instead.
        let jwks_refresh = state.k8s.as_ref().map(|k8s| {
            tracing::info!(event = "k8s.enabled", issuer = %k8s.issuer(), "accepting Kubernetes ServiceAccount tokens");
            tokio::spawn(k8s.clone().run_refresh())
        });
        let mut connections = JoinSet::new();
        let mut backoff = Backoff::for_accept();
        let mut refresh = tokio::time::interval(SERVING_CERT_TTL / 2);
        refresh.tick().await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = refresh.tick() => {
                    if let Err(e) = refresh_serving_cert(&state.signer.get(), &serving, &serving_hosts) {
                        tracing::error!(event = "ca.serving_cert_failed", error = %e, "keeping the current serving certificate");
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        backoff.reset();
                        match state.admission.admit(peer.ip()) {
                            Admit::Yes(slot) => {
                                connections.spawn(serve_connection(acceptor.clone(), tcp, peer, state.clone(), slot, false));
                            }
                            Admit::Probation(slot) => {
                                connections.spawn(serve_connection(acceptor.clone(), tcp, peer, state.clone(), slot, true));
                            }
                            // Dropping the stream closes it before any TLS work is spent on it.
                            Admit::No(why) => state.admission.refused(peer, why),
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: retrying at once would spin; back off with jitter.
                        state.admission.accept_failed();
                        let pause = backoff.pause();
                        tracing::warn!(event = "ca.accept_failed", error = %e, retry_in_ms = pause.as_millis() as u64, "cannot accept connections; if the error is \"too many open files\", raise `ulimit -n` or lower --max-connections");
                        tokio::time::sleep(pause).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        connections.abort_all();
        if let Some(task) = jwks_refresh {
            task.abort();
        }
        tracing::info!(event = "ca.stopped", "CA stopped");
    }
}

fn refresh_serving_cert(
    authority: &Authority,
    serving: &CertResolver,
    hosts: &[String],
) -> Result<(), ServeError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ServeError::ServingCert(e.to_string()))?;
    let issued = authority
        .issue_serving_cert(&key, hosts, SERVING_CERT_TTL)
        .map_err(|e| ServeError::ServingCert(e.to_string()))?;
    serving
        .publish(
            issued.chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .map_err(|e| ServeError::ServingCert(e.to_string()))
}

/// Serves one connection, closing it at the first deadline it misses. `probation`: admitted
/// beyond the unauthenticated share, so it is kept only if it authenticates.
async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<CaState>,
    mut slot: Slot,
    probation: bool,
) {
    let limits = state.admission.limits.clone();
    let handshake_timeout = if probation {
        limits.probation_handshake_timeout
    } else {
        limits.handshake_timeout
    };
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        // A connection closed before the ClientHello is a TCP health probe or a port scan,
        // not a failed client: keep it out of the warnings.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!(event = "tls.closed_before_handshake", peer.addr = %peer);
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(event = "tls.handshake_failed", peer.addr = %peer, error = %e);
            return;
        }
        Err(_) => {
            state
                .admission
                .timed_out(peer, Phase::Handshake, handshake_timeout);
            return;
        }
    };
    crate::tls::ack_handshake(tls.get_ref().0);
    let peer_chain: Arc<Vec<CertificateDer<'static>>> = Arc::new(
        tls.get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
            .unwrap_or_default(),
    );
    let authenticated = peer_chain
        .split_first()
        .is_some_and(|(leaf, intermediates)| {
            state
                .bundle
                .get()
                .verify_client(leaf, intermediates, UnixTime::now())
                .is_ok()
        });
    if authenticated {
        slot.authenticate();
    } else if probation && slot.over_share() {
        state
            .admission
            .refused(peer, Refusal::UnauthenticatedOverShare);
        return;
    }
    let activity = Arc::new(Activity {
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        last: Mutex::new((std::time::Instant::now(), false)),
    });
    let admission = state.admission.clone();
    // A refusal answered before the request's body was read ends the connection with a
    // lingering close, so the client reads the refusal instead of a reset.
    let tls = crate::linger::LingerOnClose::new(tls);
    let service = {
        let activity = activity.clone();
        let linger = tls.armed();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let state = state.clone();
            let peer_chain = peer_chain.clone();
            let busy = Busy::start(activity.clone());
            let linger = linger.clone();
            let unread = req.version() < hyper::Version::HTTP_2
                && !hyper::body::Body::is_end_stream(req.body());
            async move {
                let resp = state.handle(req, peer, &peer_chain).await;
                if unread && !resp.status().is_success() {
                    linger.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                drop(busy);
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    // The watchdog: while no request is in flight, the connection must complete one within
    // the header deadline (after the handshake) or the idle deadline (after a response). A
    // half-sent request is never "in flight" (hyper has not finished its headers), so this
    // bounds slow headers for HTTP/1 and HTTP/2 alike; bodies have their own deadline.
    let tick =
        (limits.header_read_timeout.min(limits.idle_timeout) / 4).max(Duration::from_millis(10));
    let mut watchdog = tokio::time::interval(tick);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer.addr = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = watchdog.tick() => {
                let Some((phase, limit)) = activity.expired(&limits) else { continue };
                admission.timed_out(peer, phase, limit);
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
                return;
            }
        }
    }
}

/// What the watchdog of one connection needs: requests in flight, and when the last one ended
/// (or the handshake, before the first) and whether any request was served yet.
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    last: Mutex<(std::time::Instant, bool)>,
}

impl Activity {
    /// The missed deadline, if the connection sits without a request past it.
    fn expired(&self, limits: &ConnectionLimits) -> Option<(Phase, Duration)> {
        if self.in_flight.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return None;
        }
        let (since, served) = *self.last.lock().expect("activity lock");
        let (phase, limit) = if served {
            (Phase::Idle, limits.idle_timeout)
        } else {
            (Phase::Header, limits.header_read_timeout)
        };
        (since.elapsed() >= limit).then_some((phase, limit))
    }
}

/// One request in flight; when dropped (answered or abandoned) the idle clock restarts.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Self {
        activity
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().expect("activity lock") = (std::time::Instant::now(), true);
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

fn json_response<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("serializable"),
        )))
        .expect("valid response")
}

impl CaState {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        peer_chain: &[CertificateDer<'static>],
    ) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let result = match (req.method(), path.as_str()) {
            (&Method::GET, api::PATH_BUNDLE) => Ok(self.bundle_response()),
            (&Method::GET, api::PATH_HEALTH) => {
                Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
            }
            (&Method::GET, api::PATH_METRICS) => Ok(Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Full::new(Bytes::from(self.admission.metrics.encode())))
                .expect("valid response")),
            (&Method::POST, api::PATH_SVID) => self.bootstrap(req).await,
            (&Method::POST, api::PATH_RENEW) => self.renew(req, peer_chain).await,
            (
                _,
                api::PATH_BUNDLE
                | api::PATH_HEALTH
                | api::PATH_METRICS
                | api::PATH_SVID
                | api::PATH_RENEW,
            ) => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET for /v1/bundle, /healthz and /metrics, POST for /v1/svid and /v1/svid/renew",
            )),
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such endpoint {path}"),
            )),
        };
        match result {
            Ok(resp) => resp,
            Err(e) => {
                if e.code == "body_timeout" {
                    let limit = self.admission.limits.body_timeout;
                    self.admission.timed_out(peer, Phase::Body, limit);
                }
                self.admission.metrics.svid_refused(e.code);
                tracing::warn!(
                    event = "svid.refused",
                    endpoint = %path,
                    peer.addr = %peer,
                    status = e.status.as_u16(),
                    code = e.code,
                    id = e.id.as_ref().map(|id| id.as_str()),
                    reason = %e.message,
                    "request refused"
                );
                json_response(
                    e.status,
                    &ErrorResponse {
                        error: e.code.to_string(),
                        message: e.message,
                    },
                )
            }
        }
    }

    fn bundle_response(&self) -> Response<Full<Bytes>> {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/x-pem-file")
            .body(Full::new(Bytes::from(self.bundle.get().to_pem())))
            .expect("valid response")
    }

    /// `POST /v1/svid`: join token (or Kubernetes ServiceAccount token) + CSR → SVID.
    async fn bootstrap(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        let token = bearer_token(&req)?;
        if crate::k8s::looks_like_jwt(&token) {
            return self.bootstrap_service_account(req, &token).await;
        }
        let claims = self.tokens.verify(&token, token::now_unix()).map_err(|e| {
            let id = match &e {
                TokenError::Expired { id, .. } | TokenError::AlreadyUsed { id } => Some(id.clone()),
                _ => None,
            };
            let mut api = ApiError::from(e);
            api.id = id;
            api
        })?;
        let csr = self.read_csr(req).await?;
        let issued = self
            .signer
            .get()
            .issue_for_csr(csr.as_ref(), &claims.id, self.svid_ttl)
            .map_err(|e| with_id(e.into(), &claims.id))?;
        // Spend only after the CSR passed, so a typo in a CSR does not burn the token; and before
        // answering, so the SVID never leaves for a token that turns out to be spent.
        self.ledger
            .lock()
            .expect("ledger lock")
            .spend(&claims)
            .map_err(|e| with_id(e.into(), &claims.id))?;
        Ok(self.issued_response(api::PATH_SVID, issued))
    }

    /// `POST /v1/svid` with a ServiceAccount token: the ID comes from the verified claims only,
    /// and the CSR must ask for exactly that ID. Nothing is spent: the token stays good until it
    /// expires (kubelet hands the pod a new one well before), so a restarted sidecar can join
    /// again with what its pod holds.
    async fn bootstrap_service_account(
        &self,
        req: Request<Incoming>,
        token: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let Some(k8s) = &self.k8s else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "sa_token_disabled",
                "this looks like a Kubernetes ServiceAccount token, but this CA does not accept them: start `meshgate ca serve` with --k8s-issuer <the cluster's service-account issuer> (or give the workload a join token from `meshgate ca token`)",
            ));
        };
        let sa = k8s.verify(token, token::now_unix()).await?;
        let authority = self.signer.get();
        let id = authority
            .trust_domain()
            .workload_id(&sa.namespace, &sa.service_account)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "token_claims_invalid",
                    format!("the token's ServiceAccount makes no valid SPIFFE ID: {e}"),
                )
            })?;
        let csr = self.read_csr(req).await.map_err(|e| with_id(e, &id))?;
        let issued = authority
            .issue_for_csr(csr.as_ref(), &id, self.svid_ttl)
            .map_err(|e| with_id(e.into(), &id))?;
        tracing::info!(
            event = "k8s.token_accepted",
            id = %id,
            pod = %format_args!("{}/{}", sa.namespace, sa.pod_name),
            pod_uid = %sa.pod_uid,
            kid = %sa.kid,
            token_exp = sa.exp,
            "ServiceAccount token verified"
        );
        Ok(self.issued_response(api::PATH_SVID, issued))
    }

    /// `POST /v1/svid/renew`: current SVID over mTLS + CSR for the same ID → SVID.
    async fn renew(
        &self,
        req: Request<Incoming>,
        peer_chain: &[CertificateDer<'static>],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let Some((leaf, intermediates)) = peer_chain.split_first() else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_cert_missing",
                "renewal needs the caller's current SVID as the TLS client certificate; bootstrap with a join token at /v1/svid instead",
            ));
        };
        let caller = self
            .bundle
            .get()
            .verify_client(leaf, intermediates, UnixTime::now())
            .map_err(|e| {
                let mut api = ApiError::new(StatusCode::UNAUTHORIZED, "client_cert_invalid", e);
                api.id = cert::spiffe_id_from_der(leaf).ok();
                api
            })?;
        let authority = self.signer.get();
        if !caller.id.is_member_of(authority.trust_domain()) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "foreign_trust_domain",
                format!(
                    "{} is outside this CA's trust domain {}",
                    caller.id,
                    authority.trust_domain()
                ),
            ));
        }
        let csr = self.read_csr(req).await?;
        let issued = authority
            .issue_for_csr(csr.as_ref(), &caller.id, self.svid_ttl)
            .map_err(|e| with_id(e.into(), &caller.id))?;
        Ok(self.issued_response(api::PATH_RENEW, issued))
    }

    fn issued_response(&self, endpoint: &str, issued: IssuedSvid) -> Response<Full<Bytes>> {
        let info = &issued.info;
        tracing::info!(
            event = "svid.issued",
            endpoint,
            id = %info.id,
            serial = %info.serial,
            not_after = %cert::rfc3339(info.not_after),
            "SVID issued"
        );
        json_response(
            StatusCode::OK,
            &SvidResponse {
                spiffe_id: info.id.clone(),
                serial: info.serial.clone(),
                not_before: cert::rfc3339(info.not_before),
                not_after: cert::rfc3339(info.not_after),
                svid_pem: issued.chain_pem(),
                bundle_pem: self.bundle.get().to_pem(),
            },
        )
    }
}

fn with_id(mut e: ApiError, id: &SpiffeId) -> ApiError {
    if !e.message.contains(id.as_str()) {
        e.message = format!("{} (id {id})", e.message);
    }
    e.id = Some(id.clone());
    e
}

fn bearer_token(req: &Request<Incoming>) -> Result<String, ApiError> {
    let missing = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_missing",
            "send the join token as `Authorization: Bearer <token>` (mint one with `meshgate ca token`), or the pod's projected ServiceAccount token to a CA started with --k8s-issuer",
        )
    };
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    value
        .strip_prefix("Bearer ")
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(missing)
}

impl CaState {
    /// Reads the CSR body: at most [`api::MAX_BODY_BYTES`], within the body deadline.
    async fn read_csr(
        &self,
        req: Request<Incoming>,
    ) -> Result<CertificateSigningRequestDer<'static>, ApiError> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "request body exceeds {} bytes; send one PEM CSR",
                    api::MAX_BODY_BYTES
                ),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > api::MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        let limit = self.admission.limits.body_timeout;
        let collect = Limited::new(req.into_body(), api::MAX_BODY_BYTES).collect();
        let body = tokio::time::timeout(limit, collect)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} ms; send the CSR together with the request",
                    limit.as_millis()
                ),
            )
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "body_unreadable", e)
            }
        })?
        .to_bytes();
        CertificateSigningRequestDer::from_pem_slice(&body).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "csr_malformed",
                "request body must be one PEM \"CERTIFICATE REQUEST\" block",
            )
        })
    }
}
