//! The demo's small HTTP app (`meshgate demo-app`): the same code plays `web`, `orders` and
//! `payments`. It answers with what it saw (including the caller identity its sidecar vouched
//! for), and `orders` handles `GET /orders/<id>/checkout` by calling `payments` through its own
//! sidecar, propagating the trace context — so one request crosses two sidecars.
//!
//! Calls go either through an explicit sidecar outbound address (`Upstream::via`), or directly
//! to the URL (`--direct`: for a redirect — eBPF or iptables — that steers the connection into
//! the local sidecar; the app knows nothing about the mesh).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How an app reaches other services.
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    /// Send every call to this address (the sidecar's outbound listener, as an explicit proxy);
    /// None: connect to the URL's host directly.
    pub via: Option<SocketAddr>,
    /// Host names resolved without DNS (like curl's `--resolve`).
    pub resolve: Vec<(String, IpAddr)>,
}

/// One demo app.
#[derive(Debug, Clone)]
pub struct DemoApp {
    pub name: String,
    /// How to call other services (None: this app calls nobody).
    pub upstream: Option<Upstream>,
    /// Base URL of `payments` (what `orders` calls on checkout), e.g. `http://payments:8080`.
    pub payments_url: String,
}

/// Splits `http://host[:port]/path` into (authority, host, port, path).
fn split_url(url: &str) -> Result<(String, String, u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url}: bad port {p:?}"))?,
        ),
        _ => (authority, 80),
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((
        authority.to_string(),
        host.to_string(),
        port,
        path.to_string(),
    ))
}

/// One HTTP/1.1 call to `url`: through `upstream.via` when set (Host = the URL's authority), else
/// straight to the URL's host.
pub async fn call_url(
    upstream: &Upstream,
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Result<(u16, String), String> {
    let (authority, host, port, path) = split_url(url)?;
    if let Some(via) = upstream.via {
        return call_via(via, method, &authority, &path, headers, body).await;
    }
    let target = match upstream.resolve.iter().find(|(n, _)| *n == host) {
        Some((_, ip)) => SocketAddr::new(*ip, port),
        None => match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
                .next()
                .ok_or_else(|| format!("resolving {host}: no address"))?,
        },
    };
    call_at(target, method, &authority, &path, headers, body)
        .await
        .map_err(|e| format!("{url} ({target}): {e}"))
}

/// The gRPC health check path the kubelet's `grpc` probe calls.
const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Answers `grpc.health.v1.Health/Check` with SERVING, so the demo app also stands for a gRPC
/// server under a kubelet `grpc` probe (the pod emulation test probes it through the sidecar).
fn grpc_serving() -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .header("content-type", "application/grpc")
        .body(BodyExt::boxed(GrpcServing { sent: 0 }))
        .expect("valid response")
}

/// The body of [`grpc_serving`]: one message, then the `grpc-status: 0` trailers (a body that
/// ends with its data frame would end the HTTP/2 stream before the trailers).
struct GrpcServing {
    sent: u8,
}

impl hyper::body::Body for GrpcServing {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.sent += 1;
        std::task::Poll::Ready(match self.sent {
            // One length-prefixed message: HealthCheckResponse { status: SERVING (1) }.
            1 => Some(Ok(hyper::body::Frame::data(Bytes::from_static(&[
                0, 0, 0, 0, 2, 0x08, 0x01,
            ])))),
            2 => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                Some(Ok(hyper::body::Frame::trailers(trailers)))
            }
            _ => None,
        })
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("valid response")
}

/// Plain HTTP/1.1 call through the sidecar's outbound port (the app only names the service).
pub async fn call_via(
    outbound: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Result<(u16, String), String> {
    call_at(outbound, method, host, path, headers, body)
        .await
        .map_err(|e| format!("sidecar outbound {outbound}: {e}"))
}

async fn call_at(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

impl DemoApp {
    /// `GET /call?url=http://orders:8080/orders/1&method=GET`: this app makes the call and
    /// answers with the status it got (as its own HTTP status, so `curl -f` and `-w %{http_code}`
    /// tell 200 from 403) and the body, so a user can try what its identity may do.
    async fn call(&self, upstream: &Upstream, query: &str) -> Response<Full<Bytes>> {
        let params: std::collections::HashMap<String, String> =
            url_params(query).into_iter().collect();
        let method = params.get("method").map_or("GET", String::as_str);
        let Some(url) = params.get("url") else {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": "use /call?url=http://SERVICE:PORT/PATH&method=GET" }),
            );
        };
        match call_url(upstream, method, url, &[], "").await {
            Ok((status, body)) => json(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                serde_json::json!({
                    "from": self.name, "method": method, "url": url, "status": status,
                    "body": serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
                }),
            ),
            Err(e) => json(
                StatusCode::BAD_GATEWAY,
                serde_json::json!({ "from": self.name, "url": url, "error": e }),
            ),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let caller = req
            .headers()
            .get("x-meshgate-peer")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let path = req.uri().path().to_string();
        let method = req.method().to_string();
        if let (Some(upstream), "/call") = (&self.upstream, path.as_str()) {
            return self.call(upstream, req.uri().query().unwrap_or("")).await;
        }
        if let (Some(upstream), Some(order)) = (
            &self.upstream,
            path.strip_prefix("/orders/")
                .and_then(|p| p.strip_suffix("/checkout")),
        ) {
            let traceparent: Vec<(&str, String)> = req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(|v| vec![("traceparent", v.to_string())])
                .unwrap_or_default();
            let charged = call_url(
                upstream,
                "POST",
                &format!("{}/charge", self.payments_url.trim_end_matches('/')),
                &traceparent,
                &format!("{{\"order\":\"{order}\"}}"),
            )
            .await;
            let (status, payment) = match charged {
                Ok((s, b)) => (
                    s,
                    serde_json::from_str(&b).unwrap_or(serde_json::Value::String(b)),
                ),
                Err(e) => (502, serde_json::Value::String(e)),
            };
            let code = if status == 200 {
                StatusCode::OK
            } else {
                StatusCode::BAD_GATEWAY
            };
            return json(
                code,
                serde_json::json!({ "service": self.name, "order": order, "payments_status": status, "payment": payment }),
            );
        }
        json(
            StatusCode::OK,
            serde_json::json!({ "service": self.name, "method": method, "path": path, "caller": caller }),
        )
    }

    /// Serves on `listener` forever, HTTP/1.1 or h2c (gRPC health checks), as every listener
    /// that answers locally is served ([`meshgate_proxy::local_http::serve_local`]): connections
    /// capped in total and per source address, a request head due within the header timeout,
    /// idle connections closed. It listens on every address of its pod, so anyone who can reach
    /// the pod can open connections to it.
    pub async fn serve(self, listener: TcpListener) {
        // Never signalled: the app serves until its process ends (the sender must live, or
        // the accept loop would take its drop for a shutdown).
        let (_serving, shutdown) = tokio::sync::watch::channel(false);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = self.clone();
            async move {
                let response = if req.uri().path() == GRPC_HEALTH_CHECK {
                    grpc_serving()
                } else {
                    app.handle(req).await.map(BodyExt::boxed)
                };
                Ok::<_, Infallible>(response)
            }
        });
        meshgate_proxy::local_http::serve_local(
            listener,
            shutdown,
            Duration::from_secs(5),
            "demo app",
            meshgate_proxy::serve::RefusedConnections::default(),
            None,
            service,
        )
        .await;
    }
}

/// `meshgate demo-app`: the demo's app on its own (for containers, and for `demo --with-ebpf`).
#[derive(Debug, Args)]
pub struct AppArgs {
    /// The service this app plays (it answers with it): web, orders, payments, ….
    #[arg(long)]
    name: String,
    /// Where to listen.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Call other services directly by URL (a redirect steers the connections into the local
    /// sidecar). Without it, calls go to the sidecar's outbound listener (--via) as a proxy.
    #[arg(long)]
    direct: bool,
    /// The sidecar's outbound listener, for calls without --direct.
    #[arg(long, default_value = "127.0.0.1:15001", conflicts_with = "direct")]
    via: SocketAddr,
    /// Base URL of payments (called by orders on `GET /orders/<id>/checkout`).
    #[arg(long, default_value = "http://payments:8080")]
    payments_url: String,
    /// Resolve a host name without DNS: NAME=IP (repeatable; for --direct).
    #[arg(long, value_parser = parse_resolve)]
    resolve: Vec<(String, IpAddr)>,
    /// Do not serve: make one call to this URL as this app, print the status code and the body,
    /// and exit (0 when a response came back, whatever its status).
    #[arg(long)]
    call: Option<String>,
    /// Method of the --call request.
    #[arg(long, default_value = "GET", requires = "call")]
    method: String,
}

fn parse_resolve(s: &str) -> Result<(String, IpAddr), String> {
    let (name, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=IP"))?;
    Ok((
        name.to_string(),
        ip.parse().map_err(|e| format!("{s:?}: {e}"))?,
    ))
}

pub fn run(args: AppArgs) -> Result<()> {
    let upstream = Upstream {
        via: (!args.direct).then_some(args.via),
        resolve: args.resolve,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if let Some(url) = &args.call {
            let call = call_url(&upstream, &args.method, url, &[], "");
            let (status, body) = tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .map_err(|_| anyhow::anyhow!("{url}: no response within 10 s"))?
                .map_err(anyhow::Error::msg)?;
            println!("{status}");
            println!("{body}");
            return Ok(());
        }
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        println!(
            "demo-app {} listening on {} (calls: {})",
            args.name,
            listener.local_addr()?,
            match upstream.via {
                Some(via) => format!("via {via}"),
                None => "direct".to_string(),
            }
        );
        let app = DemoApp {
            name: args.name,
            upstream: Some(upstream),
            payments_url: args.payments_url,
        };
        tokio::select! {
            _ = app.serve(listener) => bail!("the listener stopped"),
            _ = crate::ca_cmd::shutdown_signal() => Ok(()),
        }
    })
}

/// Decodes `a=1&b=x%2Fy` (percent escapes and `+`), enough for `/call`'s two parameters.
fn url_params(query: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = |b: u8| (b as char).to_digit(16);
                    match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                        (Some(hi), Some(lo)) => {
                            out.push((hi * 16 + lo) as u8);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{split_url, url_params};

    #[test]
    fn query_parameters_are_percent_decoded() {
        let cases = [
            (
                "url=http%3A%2F%2Forders%3A8080%2Forders%2F1&method=GET",
                vec![("url", "http://orders:8080/orders/1"), ("method", "GET")],
            ),
            ("a=x+y&b", vec![("a", "x y"), ("b", "")]),
            ("a=%zz&b=%4", vec![("a", "%zz"), ("b", "%4")]),
            ("a=%e2%82%ac%", vec![("a", "€%")]),
            ("a=é%", vec![("a", "é%")]),
            ("", vec![]),
        ];
        for (query, want) in cases {
            let want: Vec<(String, String)> = want
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect();
            assert_eq!(url_params(query), want, "{query}");
        }
    }

    #[test]
    fn splits_urls() {
        let s = |u| split_url(u).unwrap();
        assert_eq!(
            s("http://orders:8080/orders/42"),
            (
                "orders:8080".into(),
                "orders".into(),
                8080,
                "/orders/42".into()
            )
        );
        assert_eq!(
            s("http://10.0.0.1"),
            ("10.0.0.1".into(), "10.0.0.1".into(), 80, "/".into())
        );
        assert_eq!(s("http://[::1]:81/x").1, "::1");
        assert!(split_url("https://x/").is_err());
    }
}
