//! The sidecar's side of the stream: connect with the workload's SVID (the control plane must
//! present `spiffe://<td>/ns/meshgate/sa/control-plane`), apply each push, ACK or NACK it, and
//! reconnect with backoff whenever the stream breaks. What `apply` installed stays in force while
//! disconnected: losing the control plane never opens traffic.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use meshgate_ca::backoff::Backoff;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use crate::wire::{
    Ack, LineBuffer, MAX_NACK_ERROR_CHARS, MAX_PUSH_BYTES, Push, STREAM_PATH, sanitize_peer_text,
};
use meshgate_policy::PolicySet;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A control-plane URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control plane URL {url:?}: {reason} (e.g. https://control-plane:15010)")]
pub struct BadControlPlaneUrl {
    pub url: String,
    pub reason: String,
}

/// A stream client for one control plane.
pub struct StreamClient {
    authority: String,
    tls: TlsConnector,
    /// Bumped when the workload's SVID is renewed: the stream is reopened with the new one.
    renewals: Option<tokio::sync::watch::Receiver<u64>>,
}

/// How a stream session ended without an error.
enum SessionEnd {
    /// The SVID was renewed: reconnect at once, presenting it.
    Renewed,
}

impl StreamClient {
    /// `url` is `https://host:port`; `tls` verifies the control plane's SPIFFE ID and presents
    /// the workload's SVID (offering ALPN `h2`).
    pub fn new(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, BadControlPlaneUrl> {
        let bad = |reason: String| BadControlPlaneUrl {
            url: url.to_string(),
            reason,
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("it must start with https://".to_string()));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("it has no host".to_string()))?;
        Ok(Self {
            authority: format!("{host}:{}", uri.port_u16().unwrap_or(15010)),
            tls: TlsConnector::from(tls),
            renewals: None,
        })
    }

    /// Reopens the stream whenever `renewals` changes (the sidecar's SVID generation), so the
    /// control plane always knows the SVID in use (`meshgate check` warns when one is about to
    /// expire unrenewed) and the stream never outlives a certificate it no longer needs.
    pub fn reconnect_on(mut self, mut renewals: tokio::sync::watch::Receiver<u64>) -> Self {
        renewals.borrow_and_update();
        self.renewals = Some(renewals);
        self
    }

    /// Runs forever. `apply` installs a pushed set (its error becomes the NACK); `connected`
    /// reports stream state changes.
    pub async fn run(
        self,
        mut apply: impl FnMut(PolicySet) -> Result<(), String> + Send,
        connected: impl Fn(bool) + Send,
        initial_backoff: Duration,
        max_backoff: Duration,
    ) {
        let mut backoff = Backoff::new(initial_backoff, max_backoff);
        let mut renewals = self.renewals.clone();
        loop {
            let result = self
                .session(&mut apply, &connected, &mut backoff, renewals.as_mut())
                .await;
            connected(false);
            if let Ok(SessionEnd::Renewed) = result {
                tracing::debug!(event = "control_plane.reconnect", control_plane = %self.authority, "SVID renewed: reopening the stream with it");
                continue;
            }
            let pause = backoff.pause();
            if let Err(e) = result {
                tracing::warn!(event = "control_plane.disconnected", control_plane = %self.authority, error = %e, retry_in_ms = pause.as_millis() as u64, "keeping the last good policy");
            }
            tokio::time::sleep(pause).await;
        }
    }

    async fn session(
        &self,
        apply: &mut (impl FnMut(PolicySet) -> Result<(), String> + Send),
        connected: &(impl Fn(bool) + Send),
        backoff: &mut Backoff,
        mut renewals: Option<&mut tokio::sync::watch::Receiver<u64>>,
    ) -> Result<SessionEnd, String> {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
        let tls = self
            .tls
            .connect(meshgate_ca::tls::mesh_server_name(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(conn);
        let (acks, ack_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        let mut ack_rx = ack_rx;
        let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
            ack_rx.poll_recv(cx)
        }));
        let req = Request::post(format!("https://{}{STREAM_PATH}", self.authority))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("stream request: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("control plane answered {}", resp.status()));
        }
        connected(true);
        backoff.reset();
        tracing::info!(event = "control_plane.connected", control_plane = %self.authority);
        let mut body = resp.into_body();
        let mut lines = LineBuffer::default();
        loop {
            let renewed = async {
                match renewals.as_deref_mut() {
                    Some(r) => r.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let frame = tokio::select! {
                frame = body.frame() => frame,
                true = renewed => return Ok(SessionEnd::Renewed),
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| format!("stream: {e}"))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            let batch = lines.push(data, MAX_PUSH_BYTES).map_err(|e| {
                format!(
                    "refused a push of {} MiB or more from the control plane: larger than the {} MiB snapshot limit; the last good policy stays in force. Shrink the policy set the control plane serves (split it per namespace, drop unused Services)",
                    e.len / (1024 * 1024),
                    e.limit / (1024 * 1024)
                )
            })?;
            for line in batch {
                let push: Push =
                    serde_json::from_slice(&line).map_err(|e| format!("undecodable push: {e}"))?;
                let (nonce, version) = (push.nonce.clone(), push.version.clone());
                let error = push
                    .into_set()
                    .map_err(|e| e.to_string())
                    .and_then(&mut *apply)
                    .err()
                    .map(|e| sanitize_peer_text(&e, MAX_NACK_ERROR_CHARS));
                if let Some(e) = &error {
                    tracing::warn!(event = "control_plane.nack_sent", version = %version, error = %e);
                }
                let mut ack = serde_json::to_vec(&Ack {
                    nonce,
                    version,
                    error,
                })
                .expect("ack serializes");
                ack.push(b'\n');
                acks.send(Ok(Frame::data(Bytes::from(ack))))
                    .await
                    .map_err(|_| "stream closed".to_string())?;
            }
        }
        Err("the control plane closed the stream".into())
    }
}
