//! An app that logs what it receives: every request (HTTP/1.1 or h2c) with its method, path,
//! authority, headers and trailers, printed to stderr and kept for the test to inspect. It is
//! deliberately lenient, like the apps attackers aim at: it honours `Upgrade: h2c` (as Apache
//! httpd's mod_http2 does) by serving HTTP/2 on the switched connection, accepts `websocket`
//! upgrades (echoing bytes), and answers every request 200. `GET /download/<n>` streams n bytes.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the app saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub version: String,
    /// The URI authority (HTTP/2 `:authority`), if any.
    pub authority: Option<String>,
    pub headers: Vec<(String, String)>,
    pub trailers: Vec<(String, String)>,
    /// True for requests that arrived on a connection switched with `Upgrade: h2c`.
    pub after_h2c_upgrade: bool,
}

impl Seen {
    /// Every value of header `name` (exact, lowercase).
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The app's log: requests, and bytes received on upgraded (WebSocket) connections.
#[derive(Debug, Default)]
pub struct Log {
    pub requests: Vec<Seen>,
    pub websocket_bytes: usize,
}

#[derive(Clone)]
pub struct RecordingApp {
    pub addr: std::net::SocketAddr,
    pub log: Arc<Mutex<Log>>,
}

type Resp = http::Response<BoxBody<Bytes, std::io::Error>>;

fn full(body: impl Into<Bytes>) -> BoxBody<Bytes, std::io::Error> {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

type Handled = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Resp, std::convert::Infallible>> + Send>,
>;

/// [`handle`] boxed: requests on an h2c-upgraded connection are handled by the same function.
fn handle_boxed(
    log: Arc<Mutex<Log>>,
    after_h2c_upgrade: bool,
    req: http::Request<Incoming>,
) -> Handled {
    Box::pin(handle(log, after_h2c_upgrade, req))
}

async fn handle(
    log: Arc<Mutex<Log>>,
    after_h2c_upgrade: bool,
    req: http::Request<Incoming>,
) -> Result<Resp, std::convert::Infallible> {
    let (mut parts, body) = req.into_parts();
    let upgrade = parts
        .headers
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    let on_upgrade = upgrade
        .is_some()
        .then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut seen = Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        version: format!("{:?}", parts.version),
        authority: parts.uri.authority().map(|a| a.to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect(),
        trailers: vec![],
        after_h2c_upgrade,
    };
    let is_head = parts.method == http::Method::HEAD;
    let download = path
        .strip_prefix("/download/")
        .and_then(|n| n.parse::<u64>().ok());
    if upgrade.is_none() {
        let collected = body.collect().await;
        if let Ok(collected) = collected
            && let Some(trailers) = collected.trailers()
        {
            seen.trailers = trailers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
        }
    }
    eprintln!("recording app received: {seen:?}");
    log.lock().unwrap().requests.push(seen);

    if let Some(n) = download {
        return Ok(http::Response::new(super::mesh::download(n, 16 * 1024)));
    }
    match (upgrade.as_deref(), on_upgrade) {
        (Some("h2c"), Some(on_upgrade)) => {
            // What a lenient HTTP/2 server does: switch, then serve HTTP/2 on the connection.
            let log = log.clone();
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let service = hyper::service::service_fn(move |req| {
                        let log = log.clone();
                        handle_boxed(log, true, req)
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(upgraded, service)
                        .await;
                }
            });
            Ok(http::Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "h2c")
                .body(full(Bytes::new()))
                .unwrap())
        }
        (Some(protocol), Some(on_upgrade)) => {
            let log = log.clone();
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 4096];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                log.lock().unwrap().websocket_bytes += n;
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
            Ok(http::Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", protocol)
                .body(full(Bytes::new()))
                .unwrap())
        }
        // hyper's HTTP/2 server would send a HEAD response's body: a well-behaved app does not.
        _ if is_head => Ok(http::Response::new(full(Bytes::new()))),
        _ => Ok(http::Response::new(full("ok\n"))),
    }
}

impl RecordingApp {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let app = Self {
            addr,
            log: log.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let log = log.clone();
                        handle(log, false, req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        app
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.log.lock().unwrap().requests.clone()
    }

    pub fn websocket_bytes(&self) -> usize {
        self.log.lock().unwrap().websocket_bytes
    }

    /// Forgets what was received.
    pub fn clear(&self) {
        *self.log.lock().unwrap() = Log::default();
    }
}
