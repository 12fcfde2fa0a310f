//! Fetching the cluster's ServiceAccount signing keys: OIDC discovery
//! (`<issuer>/.well-known/openid-configuration` → `jwks_uri`) or a fixed JWKS URL, over HTTPS
//! with rustls, trusting only the roots given (the cluster CA by default).
//!
//! One GET per document, HTTP/1.1, no redirects, a deadline and a size cap: the API server
//! answers in milliseconds with a few KiB, and anything else is a misconfiguration to report,
//! not to wait for.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::jwt::{JwksParseError, KeySet};
use crate::tls;

/// Deadline of one fetch (connect, TLS, request and body): 10 s.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery or JWKS document read: 256 KiB (a cluster's JWKS is a few KiB).
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// Why the key set could not be fetched. The last good key set stays in use.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    #[error("{url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url} answered {status}{hint}")]
    Status {
        url: String,
        status: StatusCode,
        hint: &'static str,
    },
    #[error("{url}: {source}")]
    Parse {
        url: String,
        #[source]
        source: JwksParseError,
    },
    #[error("{url}: not an OpenID discovery document: {reason}")]
    Discovery { url: String, reason: String },
    #[error(
        "discovery document at {url} names issuer {got:?}, not {want:?}; --k8s-issuer must be exactly the cluster's service-account issuer (kubectl get --raw /.well-known/openid-configuration)"
    )]
    IssuerMismatch {
        url: String,
        got: String,
        want: String,
    },
    #[error("cannot read the bearer token {path}: {reason} (--k8s-api-token-file)")]
    BearerToken { path: PathBuf, reason: String },
}

/// How to reach the documents.
#[derive(Clone)]
pub struct Fetcher {
    roots: Arc<RootCertStore>,
    bearer_file: Option<PathBuf>,
}

/// A URL split for an HTTPS GET.
struct Target {
    uri: Uri,
    host: String,
    port: u16,
}

/// Parses and checks an `https://` URL (plain HTTP would let anyone on the path swap the keys).
pub fn https_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err("it must start with https://".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("it has no host".into());
    }
    Ok(uri)
}

fn target(url: &str) -> Result<Target, JwksError> {
    let uri = https_url(url).map_err(|reason| JwksError::Fetch {
        url: url.to_string(),
        reason,
    })?;
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    Ok(Target { uri, host, port })
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl Fetcher {
    /// Trusts `roots` (PEM) and sends the token in `bearer_file` (re-read at every fetch: it is
    /// itself a rotating projected token in a cluster).
    pub fn new(roots_pem: &[u8], bearer_file: Option<PathBuf>) -> Result<Self, String> {
        let certs = crate::cert::certs_from_pem(roots_pem).map_err(|e| e.to_string())?;
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("unusable root certificate: {e}"))?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            bearer_file,
        })
    }

    /// The JWKS URL: `jwks_url` when given, else the discovery document's `jwks_uri` (after
    /// checking that the document is the issuer's own).
    pub async fn jwks_url(
        &self,
        issuer: &str,
        jwks_url: Option<&str>,
    ) -> Result<String, JwksError> {
        if let Some(url) = jwks_url {
            return Ok(url.to_string());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let body = self.get(&url).await?;
        let doc: Discovery = serde_json::from_slice(&body).map_err(|e| JwksError::Discovery {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        // OpenID Connect Discovery §4.3: the issuer in the document must be the one asked for.
        if doc.issuer != issuer {
            return Err(JwksError::IssuerMismatch {
                url,
                got: doc.issuer,
                want: issuer.to_string(),
            });
        }
        https_url(&doc.jwks_uri).map_err(|reason| JwksError::Discovery {
            url: url.clone(),
            reason: format!("jwks_uri {:?}: {reason}", doc.jwks_uri),
        })?;
        Ok(doc.jwks_uri)
    }

    /// Fetches and parses the key set.
    pub async fn fetch(&self, issuer: &str, jwks_url: Option<&str>) -> Result<KeySet, JwksError> {
        let url = self.jwks_url(issuer, jwks_url).await?;
        let body = self.get(&url).await?;
        KeySet::from_jwks(&body).map_err(|source| JwksError::Parse { url, source })
    }

    /// One HTTPS GET with the deadline and size cap.
    async fn get(&self, url: &str) -> Result<Bytes, JwksError> {
        tokio::time::timeout(FETCH_TIMEOUT, self.get_inner(url))
            .await
            .map_err(|_| JwksError::Fetch {
                url: url.to_string(),
                reason: format!("no answer within {} s", FETCH_TIMEOUT.as_secs()),
            })?
    }

    async fn get_inner(&self, url: &str) -> Result<Bytes, JwksError> {
        let fail = |reason: String| JwksError::Fetch {
            url: url.to_string(),
            reason,
        };
        let target = target(url)?;
        let bearer = match &self.bearer_file {
            None => None,
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| JwksError::BearerToken {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Some(token.trim().to_string())
            }
        };
        let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = ServerName::try_from(target.host.clone())
            .map_err(|e| fail(format!("host {:?}: {e}", target.host)))?;
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|e| {
                fail(format!(
                    "TLS: {e} (is --k8s-api-ca the CA that signed this server's certificate?)"
                ))
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let authority = target
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| target.host.clone());
        let path = target
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut req = Request::get(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json, application/jwk-set+json");
        if let Some(token) = bearer.filter(|t| !t.is_empty()) {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        if status != StatusCode::OK {
            let hint = match status {
                StatusCode::UNAUTHORIZED => {
                    "; the server wants a bearer token: pass --k8s-api-token-file (in a pod: the CA's own ServiceAccount token)"
                }
                StatusCode::FORBIDDEN => {
                    "; bind the CA's ServiceAccount to the ClusterRole system:service-account-issuer-discovery"
                }
                _ => "",
            };
            return Err(JwksError::Status {
                url: url.to_string(),
                status,
                hint,
            });
        }
        let body = Limited::new(resp.into_body(), MAX_DOCUMENT_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    fail(format!("document larger than {MAX_DOCUMENT_BYTES} bytes"))
                } else {
                    fail(e.to_string())
                }
            })?;
        Ok(body.to_bytes())
    }
}
