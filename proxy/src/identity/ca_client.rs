//! HTTPS calls from a workload to the meshgate CA.
//!
//! One short-lived connection per call: calls happen a few times per SVID lifetime, and a fresh
//! handshake is what lets renewal present the *current* certificate.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use meshgate_ca::api::{self, ErrorResponse, SvidResponse};
use meshgate_ca::tls::{self, CertResolver, ExpectedServer, SharedTrustBundle};
use meshgate_ca::{SpiffeId, authority};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Why a call to the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaCallError {
    /// The CA could not be reached or the exchange broke: worth retrying.
    #[error("CA at {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// The CA answered with a refusal: retrying the same request will not help.
    #[error("CA refused ({status} {code}): {message}")]
    Refused {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("CA answered something unexpected: {0}")]
    BadResponse(String),
}

impl CaCallError {
    /// True when the same call may succeed later (network trouble, CA restarting, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::BadResponse(_) => true,
            Self::Refused { status, .. } => status.is_server_error(),
        }
    }
}

/// Where the CA is and how to recognise it.
#[derive(Clone)]
pub struct CaEndpoint {
    url: Uri,
    authority: String,
    expected: SpiffeId,
    bundle: SharedTrustBundle,
}

/// A CA URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CA URL {url:?}: {reason} (e.g. https://ca:15012)")]
pub struct BadCaUrl {
    pub url: String,
    pub reason: String,
}

impl CaEndpoint {
    /// `url` is `https://host:port`; the CA must present `spiffe://<td>/ns/meshgate/sa/ca` with a
    /// chain to `bundle` (the bundle is read at each call, so a refreshed bundle applies at once).
    pub fn new(
        url: &str,
        trust_domain: &meshgate_ca::TrustDomain,
        bundle: SharedTrustBundle,
    ) -> Result<Self, BadCaUrl> {
        let bad = |reason: String| BadCaUrl {
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("it must start with https://".to_string()));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("it has no host".to_string()))?;
        let port = uri.port_u16().unwrap_or(15012);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            url: uri,
            authority,
            expected: authority::ca_server_id(trust_domain),
            bundle,
        })
    }

    fn unreachable(&self, reason: impl ToString) -> CaCallError {
        CaCallError::Unreachable {
            url: self.url.to_string(),
            reason: reason.to_string(),
        }
    }

    /// `POST /v1/svid` with a join token.
    pub async fn bootstrap(&self, token: &str, csr_pem: &str) -> Result<SvidResponse, CaCallError> {
        let (body, _) = self
            .call(
                Method::POST,
                api::PATH_SVID,
                Some(token),
                csr_pem.to_string(),
                None,
            )
            .await?;
        serde_json::from_slice(&body).map_err(|e| CaCallError::BadResponse(e.to_string()))
    }

    /// `POST /v1/svid/renew`, authenticated by the certificate `current` serves.
    pub async fn renew(
        &self,
        current: Arc<CertResolver>,
        csr_pem: &str,
    ) -> Result<SvidResponse, CaCallError> {
        let (body, _) = self
            .call(
                Method::POST,
                api::PATH_RENEW,
                None,
                csr_pem.to_string(),
                Some(current),
            )
            .await?;
        serde_json::from_slice(&body).map_err(|e| CaCallError::BadResponse(e.to_string()))
    }

    /// `GET /v1/bundle`.
    pub async fn bundle(&self) -> Result<Bytes, CaCallError> {
        self.call(Method::GET, api::PATH_BUNDLE, None, String::new(), None)
            .await
            .map(|(body, _)| body)
    }

    /// `GET /v1/bundle`, returning the CA's `Date` header too (clock-skew checks: SVID validity
    /// is judged by each side's clock).
    pub async fn bundle_and_date(&self) -> Result<(Bytes, Option<String>), CaCallError> {
        self.call(Method::GET, api::PATH_BUNDLE, None, String::new(), None)
            .await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: String,
        client_cert: Option<Arc<CertResolver>>,
    ) -> Result<(Bytes, Option<String>), CaCallError> {
        tokio::time::timeout(
            CALL_TIMEOUT,
            self.call_inner(method, path, bearer, body, client_cert),
        )
        .await
        .map_err(|_| self.unreachable("timed out"))?
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: String,
        client_cert: Option<Arc<CertResolver>>,
    ) -> Result<(Bytes, Option<String>), CaCallError> {
        let config = tls::mesh_client_config(
            self.bundle.clone(),
            ExpectedServer::Exact(self.expected.clone()),
            client_cert,
            &[b"http/1.1"],
        );
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| self.unreachable("connect timed out"))?
            .map_err(|e| self.unreachable(e))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(tls::mesh_server_name(), tcp)
            .await
            .map_err(|e| self.unreachable(format!("TLS handshake: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority);
        if let Some(token) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/pkcs10");
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CaCallError::BadResponse(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let date = resp
            .headers()
            .get(header::DATE)
            .and_then(|d| d.to_str().ok())
            .map(str::to_string);
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        if status.is_success() {
            return Ok((bytes, date));
        }
        let refusal: ErrorResponse = serde_json::from_slice(&bytes).unwrap_or(ErrorResponse {
            error: "unknown".into(),
            message: String::from_utf8_lossy(&bytes).into_owned(),
        });
        Err(CaCallError::Refused {
            status,
            code: refusal.error,
            message: refusal.message,
        })
    }
}
