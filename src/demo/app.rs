//! The demo's small HTTP app (`meshgate demo-app`): the same code plays `web`, `orders` and
//! `payments`. It answers with what it saw (including the caller identity its sidecar vouched
//! for), and `orders` handles `GET /orders/<id>/checkout` by calling `payments`, propagating the
//! trace context — so one request crosses two sidecars. `GET /call?url=…&method=…` makes any
//! call from this app, so a user can try what this workload's identity may and may not do.
//!
//! Calls go to an explicit sidecar outbound port (`meshgate demo`) or, where the eBPF redirect
//! steers the app's connections into its sidecar (compose), straight to `http://payments:8080`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Where an app's outgoing calls connect.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// This workload's sidecar outbound listener (the app names the service in `Host`).
    Sidecar(SocketAddr),
    /// The service's own address: the eBPF redirect takes the connection to the sidecar.
    Direct,
}

/// One demo app.
#[derive(Debug, Clone)]
pub struct DemoApp {
    pub name: String,
    pub upstream: Upstream,
    /// `host[:port]` of payments, called by `GET /orders/<id>/checkout`.
    pub payments: String,
}

/// `meshgate demo-app`: one demo app as its own process (the compose demo's workloads).
#[derive(Debug, clap::Args)]
pub struct DemoAppArgs {
    /// The service it plays: web, orders or payments (only shown in answers).
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Base URL of payments for checkouts, e.g. http://payments:8080 (called directly).
    #[arg(long, default_value = "http://payments:8080")]
    payments: String,
    /// Send calls to this sidecar outbound listener instead of the service's address.
    #[arg(long)]
    via: Option<SocketAddr>,
}

/// Runs `meshgate demo-app` until SIGTERM or Ctrl-C.
pub fn run(args: DemoAppArgs) -> anyhow::Result<()> {
    let payments = authority_of(&args.payments)
        .ok_or_else(|| anyhow::anyhow!("--payments {}: use http://HOST[:PORT]", args.payments))?;
    let app = DemoApp {
        name: args.name,
        upstream: args.via.map_or(Upstream::Direct, Upstream::Sidecar),
        payments,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
        println!("demo app {} listening on http://{}", app.name, args.listen);
        tokio::select! {
            _ = app.serve(listener) => {}
            _ = crate::ca_cmd::shutdown_signal() => {}
        }
        anyhow::Ok(())
    })
}

/// `host[:port]` of an `http://` URL.
fn authority_of(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    (uri.scheme_str() == Some("http")).then_some(())?;
    Some(uri.authority()?.to_string())
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("valid response")
}

/// Plain HTTP/1.1 call to `host` (`name[:port]`, sent as `Host`), over a connection to
/// `upstream`: the sidecar's outbound port, or `host` itself when the redirect steers it.
pub async fn call_via(
    upstream: &Upstream,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Result<(u16, String), String> {
    let tcp = match upstream {
        Upstream::Sidecar(outbound) => tokio::net::TcpStream::connect(outbound)
            .await
            .map_err(|e| format!("sidecar outbound {outbound}: {e}"))?,
        Upstream::Direct => {
            let addr = if host.contains(':') {
                host.to_string()
            } else {
                format!("{host}:80")
            };
            tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map_err(|e| format!("{addr}: {e}"))?
        }
    };
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
    /// answers with the status and body it got, so a user can see its identity's decisions.
    async fn call(&self, query: &str, headers: &[(&str, String)]) -> Response<Full<Bytes>> {
        let params: std::collections::HashMap<String, String> =
            url_params(query).into_iter().collect();
        let method = params.get("method").map_or("GET", String::as_str);
        let target = params
            .get("url")
            .and_then(|u| u.parse::<http::Uri>().ok())
            .filter(|u| u.scheme_str() == Some("http") && u.authority().is_some());
        let Some(target) = target else {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": "use /call?url=http://SERVICE:PORT/PATH&method=GET" }),
            );
        };
        let host = target.authority().expect("checked").to_string();
        let path = target.path_and_query().map_or("/", |p| p.as_str());
        match call_via(&self.upstream, method, &host, path, headers, "").await {
            Ok((status, body)) => json(
                StatusCode::OK,
                serde_json::json!({
                    "from": self.name, "method": method, "url": params["url"],
                    "status": status,
                    "body": serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
                }),
            ),
            Err(e) => json(
                StatusCode::BAD_GATEWAY,
                serde_json::json!({ "from": self.name, "url": params["url"], "error": e }),
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
        let traceparent: Vec<(&str, String)> = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(|v| vec![("traceparent", v.to_string())])
            .unwrap_or_default();
        if path == "/call" {
            return self
                .call(req.uri().query().unwrap_or(""), &traceparent)
                .await;
        }
        if let Some(order) = path
            .strip_prefix("/orders/")
            .and_then(|p| p.strip_suffix("/checkout"))
        {
            let charged = call_via(
                &self.upstream,
                "POST",
                &self.payments,
                "/charge",
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

    /// Serves on `listener` forever.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let app = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(app.handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    }
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
    use super::*;

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
            let got = url_params(query);
            let want: Vec<(String, String)> = want
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect();
            assert_eq!(got, want, "{query}");
        }
    }
}
