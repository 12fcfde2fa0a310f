//! Request hygiene on the inbound path, before authorization: what the app receives must be
//! exactly what the policy judged, and the identity headers it reads must be the sidecar's.
//!
//! Why each step exists (each closed a bypass found by attacking the release build):
//! - **Reserved headers in any spelling.** Apps read the caller's identity from
//!   `x-meshgate-peer` / `x-forwarded-client-cert`. WSGI/CGI-style frameworks (werkzeug,
//!   wsgiref, PHP, Rack) fold `-` and `_` together (`HTTP_X_MESHGATE_PEER`), so a caller-sent
//!   `x_meshgate_peer` would be read as the sidecar's header. Every header whose name, reduced to
//!   its ASCII letters and digits, spells a reserved name is removed — in headers and in request
//!   trailers ([`TrailerFilter`]).
//! - **Hop-by-hop headers first.** Headers named in `Connection` are removed *before* the
//!   sidecar inserts its identity headers; stripping them afterwards let a caller list
//!   `x-meshgate-peer` in `Connection` and delete the real one.
//! - **Canonical methods only** ([`meshgate_policy::check_method`], applied by
//!   [`meshgate_policy::judge()`] so `policy explain` refuses the same methods): `delete` would
//!   pass a DENY on `DELETE` and reach a framework that treats it as DELETE.
//! - **One valid Host**: duplicate or malformed `Host`, or a `Host` that disagrees with HTTP/2's
//!   `:authority` or an HTTP/1.1 absolute-form target, is refused (RFC 9112 §3.2, RFC 9113
//!   §8.3.1): the app and the policy must not disagree about which virtual host was asked for.
//! - **The app port comes from the calling sidecar** ([`target_app`]): `x-meshgate-app-port` is
//!   read before the reserved headers are stripped (so the app never sees it), must be one port
//!   number, and must be one of this sidecar's `--app` ports; the request is then judged for
//!   that port. Only the exact name is read: a caller's app cannot smuggle it past its own
//!   sidecar, which removes it and sets its own, and other spellings are stripped as reserved.
//! - **Upgrades only to allowed protocols** ([`UpgradePolicy`]): after a `101` the bytes are no
//!   longer judged per request, so an `Upgrade: h2c` honoured by the app would carry unjudged
//!   HTTP/2 streams. Other protocols are stripped and the request goes on as a plain request.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http::header::{self, HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::http_util::{APP_PORT_HEADER, set_upgrade, strip_hop_by_hop};
use crate::metrics::Metrics;

/// Header names the sidecar alone sets for the app, as their letters and digits (lowercase).
/// `x-meshgate-` covers the peer ID and the policy version header and any later one.
const RESERVED_PREFIX: &[u8] = b"xmeshgate";
const RESERVED_EXACT: &[&[u8]] = &[b"xforwardedclientcert"];

/// True when an app could read `name` as one of the sidecar's identity headers: its ASCII letters
/// and digits, lowercased, start with `xmeshgate` or equal `xforwardedclientcert`. So
/// `x_meshgate_peer`, `X-MeshGate-Peer`, `x.meshgate.peer` and `x-forwarded_client-cert` are
/// all reserved.
pub fn is_reserved(name: &[u8]) -> bool {
    let folded = || {
        name.iter()
            .filter(|b| b.is_ascii_alphanumeric())
            .map(u8::to_ascii_lowercase)
    };
    folded()
        .take(RESERVED_PREFIX.len())
        .eq(RESERVED_PREFIX.iter().copied())
        || RESERVED_EXACT
            .iter()
            .any(|r| folded().eq(r.iter().copied()))
}

/// Removes every header an app could read as a sidecar identity header; returns how many.
pub fn strip_reserved(headers: &mut HeaderMap) -> usize {
    let names: Vec<header::HeaderName> = headers
        .keys()
        .filter(|n| is_reserved(n.as_str().as_bytes()))
        .cloned()
        .collect();
    let mut removed = 0;
    for name in names {
        if let header::Entry::Occupied(e) = headers.entry(name) {
            removed += e.remove_entry_mult().1.count();
        }
    }
    removed
}

/// Why a request is refused with 400 before authorization.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("Host header is not a valid authority")]
    InvalidHost,
    #[error("Host header {host:?} differs from :authority {authority:?}")]
    HostMismatch { host: String, authority: String },
}

impl Refusal {
    /// The hygiene counter label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::DuplicateHost | Refusal::InvalidHost | Refusal::HostMismatch { .. } => {
                "bad_host"
            }
        }
    }
}

/// Checks the Host of a request (see the module docs).
pub fn check<B>(req: &Request<B>) -> Result<(), Refusal> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::DuplicateHost);
    }
    if let Some(host) = host {
        let Ok(host) = host.to_str() else {
            return Err(Refusal::InvalidHost);
        };
        if host.parse::<http::uri::Authority>().is_err() {
            return Err(Refusal::InvalidHost);
        }
        // HTTP/2's `:authority`, or HTTP/1.1's absolute-form target, must name the same host.
        if let Some(authority) = req.uri().authority()
            && !authority.as_str().eq_ignore_ascii_case(host)
        {
            return Err(Refusal::HostMismatch {
                host: host.to_string(),
                authority: authority.to_string(),
            });
        }
    }
    Ok(())
}

/// Why the app port a calling sidecar named cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppPortRefusal {
    /// Not exactly one decimal port number: a broken or hostile peer (400).
    #[error("x-meshgate-app-port is not exactly one port number")]
    Malformed,
    /// A port with no `--app` here, while there are several (421): the Service declares a port
    /// the workload does not serve, and which app was meant cannot be known.
    #[error(
        "x-meshgate-app-port {0} is not an app port of this sidecar (serve it with another --app, or remove it from the Service's ports)"
    )]
    NotServed(u16),
    /// This sidecar serves no app at all (an outbound-only workload, 421): nothing behind it
    /// listens, so no request can be for it.
    #[error(
        "this workload serves no app (its sidecar has no --app: outbound-only); callers should not route to it"
    )]
    NoApp,
}

impl AppPortRefusal {
    /// The hygiene counter label.
    pub fn label(&self) -> &'static str {
        match self {
            AppPortRefusal::Malformed => "bad_app_port",
            AppPortRefusal::NotServed(_) => "unknown_app_port",
            AppPortRefusal::NoApp => "no_app",
        }
    }
}

/// Which of `ports` (the `--app` ports, default first) the calling sidecar's
/// `x-meshgate-app-port` names: its index, 0 when the header is absent (or names another port
/// while there is only one app). A scan of a few ports, no allocation: this runs on every
/// request.
pub fn target_app(headers: &HeaderMap, ports: &[u16]) -> Result<usize, AppPortRefusal> {
    if ports.is_empty() {
        return Err(AppPortRefusal::NoApp);
    }
    let mut values = headers.get_all(APP_PORT_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(0);
    };
    if values.next().is_some() {
        return Err(AppPortRefusal::Malformed);
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 5 || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(AppPortRefusal::Malformed);
    }
    let port = bytes.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(AppPortRefusal::Malformed)?;
    match ports.iter().position(|p| *p == port) {
        Some(index) => Ok(index),
        // One app serves every request, whatever port the caller addressed, as before a
        // sidecar could serve several: a Service whose port differs from the app's (80 in front
        // of 8080) keeps working. The request is judged for the app's own port.
        None if ports.len() == 1 => Ok(0),
        None => Err(AppPortRefusal::NotServed(port)),
    }
}

/// Which `Upgrade` protocols may pass (case-insensitive tokens, e.g. `websocket`).
#[derive(Debug, Clone)]
pub struct UpgradePolicy {
    allowed: Arc<[String]>,
}

impl Default for UpgradePolicy {
    /// WebSocket only.
    fn default() -> Self {
        Self::new(["websocket"])
    }
}

impl UpgradePolicy {
    pub fn new<S: Into<String>>(allowed: impl IntoIterator<Item = S>) -> Self {
        Self {
            allowed: allowed
                .into_iter()
                .map(|s| s.into().to_ascii_lowercase())
                .collect(),
        }
    }

    /// The allowed protocols, lowercase.
    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    /// The protocols of `requested` (a comma-separated `Upgrade` value) that are allowed, in the
    /// caller's order; `None` if none is. A protocol's version suffix (`websocket/13`) is judged
    /// by its name.
    pub fn filter(&self, requested: &HeaderValue) -> Option<HeaderValue> {
        let text = requested.to_str().ok()?;
        let kept: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|p| {
                let name = p.split('/').next().unwrap_or(p);
                !name.is_empty() && self.allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
            })
            .collect();
        if kept.is_empty() {
            return None;
        }
        HeaderValue::from_str(&kept.join(", ")).ok()
    }
}

/// What [`prepare`] did, for logs and counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Caller-sent identity headers removed.
    pub stripped: usize,
    /// The upgrade that goes on to the app (allowed protocols only).
    pub upgrade: Option<HeaderValue>,
    /// An upgrade the caller asked for that is not allowed (removed).
    pub refused_upgrade: Option<HeaderValue>,
}

/// Removes hop-by-hop headers (including those named in `Connection`) and every caller-sent
/// identity header, and keeps an upgrade only to allowed protocols. Runs before authorization,
/// so that nothing the caller sends can remove or shadow what the sidecar adds afterwards.
pub fn prepare(
    headers: &mut HeaderMap,
    asked: Option<HeaderValue>,
    upgrades: &UpgradePolicy,
) -> Prepared {
    strip_hop_by_hop(headers);
    let stripped = strip_reserved(headers);
    let (upgrade, refused_upgrade) = match asked {
        None => (None, None),
        Some(asked) => match upgrades.filter(&asked) {
            Some(kept) => (Some(kept), None),
            None => (None, Some(asked)),
        },
    };
    if let Some(protocol) = &upgrade {
        set_upgrade(headers, protocol.clone());
    }
    Prepared {
        stripped,
        upgrade,
        refused_upgrade,
    }
}

/// The request body on its way to the app: the caller's body with reserved identity headers
/// removed from its trailers (HTTP/1.1 chunked trailers and HTTP/2 trailers alike), so that a
/// forged identity cannot arrive after the headers were sanitized.
pub struct TrailerFilter {
    /// `None` for [`TrailerFilter::empty`].
    inner: Option<(Incoming, Arc<Metrics>)>,
}

impl TrailerFilter {
    pub fn new(inner: Incoming, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Some((inner, metrics)),
        }
    }

    /// No body: a bodiless request the app pool sends again on a new connection.
    pub fn empty() -> Self {
        Self { inner: None }
    }
}

impl Body for TrailerFilter {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some((inner, metrics)) = &mut self.inner else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let mut trailers = frame
                    .into_trailers()
                    .unwrap_or_else(|_| unreachable!("checked is_trailers"));
                let stripped = strip_reserved(&mut trailers);
                if stripped > 0 {
                    tracing::warn!(
                        event = "authz.forged_identity_trailer",
                        removed = stripped,
                        "caller sent identity headers as trailers; removed"
                    );
                    metrics.count_hygiene("identity_trailer", stripped as u64);
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|(b, _)| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |(b, _)| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names_in_every_spelling_an_app_may_fold() {
        for (name, reserved) in [
            ("x-meshgate-peer", true),
            ("x_meshgate_peer", true),
            ("X-MeshGate-Peer", true),
            ("x.meshgate.peer", true),
            ("xmeshgatepeer", true),
            ("x-meshgate-policy-version", true),
            ("x-meshgate-anything-later", true),
            ("x-forwarded-client-cert", true),
            ("x_forwarded_client_cert", true),
            ("x-forwarded-client-cert-chain", false),
            ("x-forwarded-for", false),
            ("x-mesh-gate", true),
            ("x-mesh", false),
            ("x-meshgat", false),
            ("traceparent", false),
            ("", false),
        ] {
            assert_eq!(is_reserved(name.as_bytes()), reserved, "{name:?}");
        }
    }

    #[test]
    fn connection_listed_identity_headers_do_not_survive_and_forgeries_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-meshgate-peer, x-forwarded-client-cert"),
        );
        h.insert(
            "x_meshgate_peer",
            HeaderValue::from_static("spiffe://x/sa/admin"),
        );
        h.append(
            "x-meshgate-peer",
            HeaderValue::from_static("spiffe://x/sa/admin"),
        );
        h.insert("x-app", HeaderValue::from_static("kept"));
        let done = prepare(&mut h, None, &UpgradePolicy::default());
        assert!(done.stripped >= 1, "{done:?}");
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn the_app_port_a_calling_sidecar_names() {
        let ports = [8080, 9090];
        for (values, want) in [
            (&[][..], Ok(0)),
            (&["8080"][..], Ok(0)),
            (&["9090"][..], Ok(1)),
            (&["7070"][..], Err(AppPortRefusal::NotServed(7070))),
            (&["9090", "9090"][..], Err(AppPortRefusal::Malformed)),
            (&[""][..], Err(AppPortRefusal::Malformed)),
            (&["0"][..], Err(AppPortRefusal::Malformed)),
            (&["65536"][..], Err(AppPortRefusal::Malformed)),
            (&["009090"][..], Err(AppPortRefusal::Malformed)),
            (&["+9090"][..], Err(AppPortRefusal::Malformed)),
            (&["9090 "][..], Err(AppPortRefusal::Malformed)),
            (&["9090,8080"][..], Err(AppPortRefusal::Malformed)),
        ] {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(APP_PORT_HEADER, HeaderValue::from_static(v));
            }
            assert_eq!(target_app(&h, &ports), want, "{values:?}");
        }
        // With one app, any well-formed port reaches it; a malformed one is still refused.
        for (value, want) in [
            ("7070", Ok(0)),
            ("8080", Ok(0)),
            ("x", Err(AppPortRefusal::Malformed)),
        ] {
            let mut h = HeaderMap::new();
            h.insert(APP_PORT_HEADER, HeaderValue::from_static(value));
            assert_eq!(target_app(&h, &[8080]), want, "one app, {value}");
        }
        // Other spellings are not read (they are stripped as reserved headers instead).
        let mut h = HeaderMap::new();
        h.insert("x_meshgate_app_port", HeaderValue::from_static("9090"));
        assert_eq!(target_app(&h, &ports), Ok(0));
        assert!(is_reserved(b"x_meshgate_app_port"));
    }

    #[test]
    fn upgrade_allowlist() {
        let p = UpgradePolicy::default();
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(p.filter(&v("websocket")), Some(v("websocket")));
        assert_eq!(p.filter(&v("WebSocket")), Some(v("WebSocket")));
        assert_eq!(p.filter(&v("h2c")), None);
        assert_eq!(p.filter(&v("h2c, websocket")), Some(v("websocket")));
        assert_eq!(p.filter(&v("TLS/1.2")), None);
        assert_eq!(p.filter(&v("")), None);
        let custom = UpgradePolicy::new(["websocket", "spdy"]);
        assert_eq!(custom.filter(&v("SPDY/3.1")), Some(v("SPDY/3.1")));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, v("Upgrade, HTTP2-Settings"));
        h.insert(header::UPGRADE, v("h2c"));
        h.insert("http2-settings", v("AAMAAABkAAQAoAAAAAIAAAAA"));
        let done = prepare(&mut h, Some(v("h2c")), &p);
        assert_eq!(done.upgrade, None);
        assert_eq!(done.refused_upgrade, Some(v("h2c")));
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn host_checks() {
        let req = |method: &str, version: http::Version, uri: &str, hosts: &[&str]| {
            let mut b = Request::builder().method(method).version(version).uri(uri);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap()
        };
        let h1 = http::Version::HTTP_11;
        let h2 = http::Version::HTTP_2;
        assert_eq!(check(&req("GET", h1, "/", &["orders"])), Ok(()));
        assert_eq!(check(&req("GET", h1, "/", &[])), Ok(()));
        assert_eq!(
            check(&req("GET", h1, "/", &["orders", "admin"])),
            Err(Refusal::DuplicateHost)
        );
        assert_eq!(
            check(&req("GET", h1, "/", &["a b"])),
            Err(Refusal::InvalidHost)
        );
        assert_eq!(
            check(&req("GET", h2, "https://orders/", &["Orders"])),
            Ok(())
        );
        assert!(matches!(
            check(&req("GET", h2, "https://orders/", &["admin"])),
            Err(Refusal::HostMismatch { .. })
        ));
        assert!(matches!(
            check(&req("GET", h1, "http://admin.internal/x", &["orders"])),
            Err(Refusal::HostMismatch { .. })
        ));
        assert_eq!(
            check(&req("GET", h1, "http://orders/x", &["orders"])),
            Ok(())
        );
    }
}
