//! Small HTTP pieces shared by the inbound and outbound paths.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Body type of every response the sidecar produces: streamed from upstream, or generated here.
pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// (The sidecar's own headers are `HeaderName` constants, not `&str`: a `&str` name is parsed
/// and validated again at every lookup, three of them per request.)
///
/// Header carrying the caller's verified SPIFFE ID to the local app (set by the sidecar only;
/// any copy sent by the caller is removed).
pub const PEER_ID_HEADER: HeaderName = HeaderName::from_static("x-meshgate-peer");
/// Envoy's convention for the same fact, for apps that already read it:
/// `By=<this workload's ID>;URI=<caller's ID>`.
pub const XFCC_HEADER: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// The policy version that allowed the request, for the app's own logs.
pub const POLICY_VERSION_HEADER: HeaderName = HeaderName::from_static("x-meshgate-policy-version");
/// Set by the outbound sidecar when it carries an HTTP/1.1 request over HTTP/2, so that the
/// inbound sidecar speaks HTTP/1.1 to its app again.
pub const ORIG_PROTO_HEADER: HeaderName = HeaderName::from_static("x-meshgate-orig-proto");
/// Which of the callee's app ports (`--app`) a request is for: one decimal port. Set by the
/// outbound sidecar only (after removing any copy the app sent), from the port the app
/// addressed, and only for a port the Service declares; read and removed by the inbound sidecar
/// before authorization, so the app never sees it. Absent = the callee's first `--app`.
///
/// It is a routing hint, not a credential: a caller holding a valid SVID could set it itself,
/// and that only chooses which of the callee's app ports it talks to — exactly what it could
/// choose by addressing that port — and the request is then judged for *that* port.
pub const APP_PORT_HEADER: HeaderName = HeaderName::from_static("x-meshgate-app-port");

/// Marks a response the sidecar answered itself (a refusal, a `502`) instead of one it relays:
/// the request's body, if any, will not be read to its end. On HTTP/1.1 such an answer closes
/// the connection and says so (`crate::http_conn::Counted`).
#[derive(Debug, Clone, Copy)]
pub struct LocalReply;

/// A small generated response (errors and denials); the body is generic on purpose.
pub fn local_response(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .extension(LocalReply)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(
            Full::new(Bytes::from_static(body.as_bytes()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static response is valid")
}

/// True for gRPC requests (`content-type: application/grpc…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A generated error answer in the caller's protocol: gRPC callers get a trailers-only gRPC
/// status (HTTP 200, `grpc-status`), as gRPC clients only interpret those; others get `status`
/// with a generic text body.
pub fn error_response(
    request_headers: &HeaderMap,
    status: StatusCode,
    body: &'static str,
) -> Response<ProxyBody> {
    error_response_for(is_grpc(request_headers), status, body)
}

/// [`error_response`] when the request is gone: `grpc` says whether it was a gRPC request.
pub fn error_response_for(
    grpc: bool,
    status: StatusCode,
    body: &'static str,
) -> Response<ProxyBody> {
    if !grpc {
        return local_response(status, body);
    }
    let code = match status {
        StatusCode::BAD_REQUEST => "3", // INVALID_ARGUMENT
        StatusCode::FORBIDDEN => "7",   // PERMISSION_DENIED
        // No app on that port: like the 404 → UNIMPLEMENTED of gRPC's HTTP mapping.
        StatusCode::MISDIRECTED_REQUEST => "12",
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => "14", // UNAVAILABLE
        _ => "2",                                                          // UNKNOWN
    };
    Response::builder()
        .status(StatusCode::OK)
        .extension(LocalReply)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", code)
        .header("grpc-message", body.trim().replace(' ', "%20"))
        .body(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static response is valid")
}

/// The authority a request names: its `Host` header, else its URI's (HTTP/2's `:authority`).
pub fn request_authority<B>(req: &http::Request<B>) -> Option<&str> {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// The caller's path and query (`/` when it has none).
fn path_and_query(caller: &http::Uri) -> http::uri::PathAndQuery {
    caller
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// The caller's path and query alone: the request target HTTP/1.1 sends to an origin server.
pub fn origin_form(caller: &http::Uri) -> http::Uri {
    http::Uri::from(path_and_query(caller))
}

/// `http://<authority>` with the caller's path and query: the URI an HTTP/2 request carries
/// (hyper and h2 take `:scheme` and `:authority` from it).
pub fn absolute_uri(caller: &http::Uri, authority: http::uri::Authority) -> http::Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path_and_query(caller));
    http::Uri::from_parts(parts).expect("scheme, authority and path form a URI")
}

/// Wraps any hyper body as a [`ProxyBody`].
pub fn boxed(body: hyper::body::Incoming) -> ProxyBody {
    body.boxed_unsync()
}

const HOP_BY_HOP_LEN: usize = 7;
/// A `static`, not a `const`: a `const` array is built afresh (seven names copied, then dropped)
/// at every use, and a response from an HTTP/1.1 app uses it once per name its `Connection`
/// header lists, then once more.
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_LEN] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A hop-by-hop header name: one of [`HOP_BY_HOP`] (its index), or `TE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HopByHop {
    Listed(usize),
    Te,
}

/// Which hop-by-hop header `name` is, if any. One `match` on the name's text (its length first,
/// then a comparison of a few machine words) instead of comparing it with each of
/// [`HOP_BY_HOP`] in turn: every header of every request and response goes through here.
/// Header names in a `HeaderMap` are lower case.
fn hop_by_hop_index(name: &HeaderName) -> Option<HopByHop> {
    Some(match name.as_str() {
        "connection" => HopByHop::Listed(0),
        "keep-alive" => HopByHop::Listed(1),
        "proxy-connection" => HopByHop::Listed(2),
        "proxy-authenticate" => HopByHop::Listed(3),
        "proxy-authorization" => HopByHop::Listed(4),
        "transfer-encoding" => HopByHop::Listed(5),
        "upgrade" => HopByHop::Listed(6),
        "te" => HopByHop::Te,
        _ => return None,
    })
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
/// `TE: trailers` survives: gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass comparing names (no hashing, no allocation) finds which of them are present:
    // requests over HTTP/2 (the sidecar-to-sidecar hop) carry none, and an HTTP/1.1 app's
    // response usually only `Connection: keep-alive`. Only what is present is then removed,
    // instead of a hashed lookup per hop-by-hop name on every request and response.
    let (mut connection, mut te) = (false, false);
    let mut listed = [false; HOP_BY_HOP_LEN];
    for k in headers.keys() {
        match hop_by_hop_index(k) {
            Some(HopByHop::Listed(i)) => {
                listed[i] = true;
                connection |= i == 0;
            }
            Some(HopByHop::Te) => te = true,
            None => {}
        }
    }
    if !te && !listed.contains(&true) {
        return;
    }
    if connection {
        // Names the `Connection` header lists that are not hop-by-hop anyway (`keep-alive`
        // is; `close` and `upgrade` name no header, or one removed below).
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|name| {
                !name.is_empty()
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| h.as_str().eq_ignore_ascii_case(name))
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(listed) {
        if present {
            headers.remove(name);
        }
    }
    if te {
        let te_trailers = headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        headers.remove(header::TE);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` + `Upgrade: …`),
/// e.g. `websocket`.
pub fn requested_upgrade<B>(req: &http::Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        req.headers().get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Puts back the upgrade headers that [`strip_hop_by_hop`] removed, for a request (or a 101
/// response) that really is switching protocols.
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Joins the caller's and the upstream's upgraded connections byte for byte until either side
/// closes or `revoked` resolves (WebSocket and any other allowed `Upgrade` protocol).
pub fn bridge_upgrade(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    revoked: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let mut down = hyper_util::rt::TokioIo::new(down);
                let mut up = hyper_util::rt::TokioIo::new(up);
                tokio::select! {
                    copied = tokio::io::copy_bidirectional(&mut down, &mut up) => {
                        if let Err(e) = copied {
                            tracing::debug!(error = %e, "upgraded connection ended with an error");
                        }
                    }
                    // Dropping both ends closes them.
                    () = revoked => {}
                }
            }
            Err(e) => {
                tracing::warn!(event = "upgrade.failed", error = %e, "protocol upgrade did not complete")
            }
        }
    });
}

/// `host[:port]` → `host` (lowercase), handling `[v6]:port`. Borrowed when it is lowercase
/// already (every request on the outbound path looks its Service up by it).
pub fn host_without_port(authority: &str) -> std::borrow::Cow<'_, str> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// The port of `host[:port]` / `[v6]:port`, if it names one.
pub fn port_of(authority: &str) -> Option<u16> {
    let rest = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.1.strip_prefix(':')?,
        None => authority.rsplit_once(':')?.1,
    };
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Host` first, then the URI's authority (HTTP/2), else none.
    #[test]
    fn a_request_names_its_authority_by_host_then_uri() {
        let req = |uri: &str, host: Option<&str>| {
            let mut b = http::Request::get(uri);
            if let Some(host) = host {
                b = b.header(header::HOST, host);
            }
            b.body(()).unwrap()
        };
        assert_eq!(
            request_authority(&req("http://uri:1/x", Some("host:2"))),
            Some("host:2")
        );
        assert_eq!(
            request_authority(&req("http://uri:1/x", None)),
            Some("uri:1")
        );
        assert_eq!(request_authority(&req("/x", None)), None);
    }

    /// The targets both sidecars build: the caller's path and query kept as sent (nothing
    /// re-parsed or re-encoded), `/` for none, the given authority.
    #[test]
    fn request_targets_keep_the_path_and_query() {
        let authority: http::uri::Authority = "orders.shop:8080".parse().unwrap();
        for (caller, origin, absolute) in [
            (
                "/a/b?x=1&y=%2F",
                "/a/b?x=1&y=%2F",
                "http://orders.shop:8080/a/b?x=1&y=%2F",
            ),
            ("http://web/c", "/c", "http://orders.shop:8080/c"),
            ("http://web", "/", "http://orders.shop:8080/"),
        ] {
            let caller: http::Uri = caller.parse().unwrap();
            assert_eq!(origin_form(&caller), origin, "{caller}");
            assert_eq!(
                absolute_uri(&caller, authority.clone()).to_string(),
                absolute,
                "{caller}"
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed_but_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-app"], "kept");
    }

    /// Whatever `Connection` lists (any case, with `close`/`keep-alive`/`upgrade` among the
    /// names) is removed, and only that.
    #[test]
    fn names_listed_in_connection_are_removed_in_any_case() {
        for listed in [
            "X-Secret",
            "close, x-secret",
            "Keep-Alive , X-SECRET, Upgrade",
            "x-secret,,",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(listed));
            h.insert("x-secret", HeaderValue::from_static("1"));
            h.insert("x-app", HeaderValue::from_static("kept"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{listed}: {h:?}");
            assert_eq!(h["x-app"], "kept");
        }
    }

    /// The name match agrees with [`HOP_BY_HOP`] and leaves end-to-end names alone, those of
    /// the same length included.
    #[test]
    fn hop_by_hop_names_are_recognized_by_their_text() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(HopByHop::Listed(i)), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::TE), Some(HopByHop::Te));
        for name in [
            header::USER_AGENT,
            header::HOST,
            header::TRAILER,
            header::CONTENT_LENGTH,
            HeaderName::from_static("connections"),
            HeaderName::from_static("x-upgrade"),
            HeaderName::from_static("tf"),
        ] {
            assert_eq!(hop_by_hop_index(&name), None, "{name}");
        }
    }

    /// Each hop-by-hop header alone is removed (the fast path for requests without any must
    /// not skip one), and a request without any is left as it was.
    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        for name in HOP_BY_HOP.iter().chain([&header::TE]) {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("deflate"));
            h.insert("x-app", HeaderValue::from_static("kept"));
            strip_hop_by_hop(&mut h);
            assert!(h.get(name).is_none(), "{name} kept: {h:?}");
            assert_eq!(h["x-app"], "kept");
        }
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("orders"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn host_port_split() {
        for (input, want) in [
            ("orders:8080", "orders"),
            ("Orders", "orders"),
            ("[::1]:80", "::1"),
            ("10.0.0.1", "10.0.0.1"),
        ] {
            assert_eq!(host_without_port(input), want);
        }
    }

    #[test]
    fn port_of_an_authority() {
        for (input, want) in [
            ("orders:8080", Some(8080)),
            ("orders", None),
            ("orders:", None),
            ("orders:0", None),
            ("orders:65536", None),
            ("orders:+80", None),
            ("[::1]:9090", Some(9090)),
            ("[::1]", None),
            ("10.0.0.1:80", Some(80)),
        ] {
            assert_eq!(port_of(input), want, "{input}");
        }
    }
}
