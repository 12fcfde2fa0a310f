//! The demo's small HTTP app (`meshgate demo-app`): the same code plays `web`, `orders` and
//! `payments`. It answers with what it saw (including the caller identity its sidecar vouched
//! for), and `orders` handles `GET /orders/<id>/checkout` by calling `payments` through its own
//! sidecar, propagating the trace context — so one request crosses two sidecars.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// One demo app.
#[derive(Debug, Clone)]
pub struct DemoApp {
    pub name: String,
    /// This workload's sidecar outbound listener, for calls to other services.
    pub outbound: Option<SocketAddr>,
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
    let tcp = tokio::net::TcpStream::connect(outbound)
        .await
        .map_err(|e| format!("sidecar outbound {outbound}: {e}"))?;
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
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let caller = req
            .headers()
            .get("x-meshgate-peer")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let path = req.uri().path().to_string();
        let method = req.method().to_string();
        if let (Some(outbound), Some(order)) = (
            self.outbound,
            path.strip_prefix("/orders/")
                .and_then(|p| p.strip_suffix("/checkout")),
        ) {
            let traceparent: Vec<(&str, String)> = req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(|v| vec![("traceparent", v.to_string())])
                .unwrap_or_default();
            let charged = call_via(
                outbound,
                "POST",
                "payments",
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
