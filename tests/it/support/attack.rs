//! An attacker's view of one sidecar: a caller holding a valid SVID that talks straight to the
//! orders sidecar's mTLS port (raw HTTP/1.1, HTTP/2, L4 tunnels), with a [`RecordingApp`] behind
//! the sidecar logging everything it receives.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_ca::tls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::mesh::{EchoApp, TestMesh};
use super::recorder::RecordingApp;

/// orders admits web and billing by identity alone (no `to`), and denies `/admin` and DELETE
/// for everyone: the shape in which the reported bypasses worked.
pub const POLICY: &str = r#"
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: callers, namespace: shop }
spec:
  selector: { account: orders }
  action: ALLOW
  rules:
    - from: [{ principals: ["spiffe://mesh.local/ns/shop/sa/web", "spiffe://mesh.local/ns/shop/sa/billing"] }]
---
apiVersion: meshgate.dev/v1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: shop }
spec:
  selector: { account: orders }
  action: DENY
  rules:
    - to: [{ paths: ["/admin", "/admin/*"] }]
    - to: [{ methods: ["DELETE"] }]
"#;

pub const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
pub const FORGED: &str = "spiffe://mesh.local/ns/shop/sa/admin";

pub struct Target {
    pub mesh: TestMesh,
    pub app: RecordingApp,
    pub addr: SocketAddr,
}

impl Target {
    pub async fn start() -> Self {
        Self::with_limits(Default::default()).await
    }

    pub async fn with_limits(limits: meshgate_proxy::serve::Limits) -> Self {
        let mut mesh = TestMesh::new().await;
        mesh.limits = limits;
        mesh.write_policy("orders.yaml", POLICY);
        let app = RecordingApp::start().await;
        mesh.add_in_front_of("orders", EchoApp { addr: app.addr }, &[], &[])
            .await;
        mesh.converge().await;
        let addr = mesh.workload("orders").sidecar.inbound_addr;
        Self { mesh, app, addr }
    }

    /// A connector presenting `name`'s SVID (valid until `ttl` from now).
    pub fn client_for(
        &self,
        name: &str,
        alpn: &[&[u8]],
        ttl: Duration,
    ) -> tokio_rustls::TlsConnector {
        let now = time::OffsetDateTime::now_utc();
        let svid = self.mesh.ca.sign_leaf(
            &TestMesh::id_of(name),
            now - time::Duration::minutes(1),
            now + ttl,
        );
        let config = super::mesh_client(
            self.mesh.ca.bundle(),
            &svid,
            TestMesh::id_of("orders"),
            alpn,
        );
        tokio_rustls::TlsConnector::from(config)
    }

    pub fn web(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        self.client_for("web", alpn, Duration::from_secs(3600))
    }

    pub async fn connect(
        &self,
        connector: &tokio_rustls::TlsConnector,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        connector
            .connect(tls::mesh_server_name(), tcp)
            .await
            .unwrap()
    }

    /// Sends `raw` as web over HTTP/1.1 and returns the status of the answer.
    pub async fn raw_h1(&self, raw: &str) -> u16 {
        let mut tls = self.connect(&self.web(&[b"http/1.1"])).await;
        tls.write_all(raw.as_bytes()).await.unwrap();
        let head = read_head(&mut tls).await;
        status_of(&head)
    }

    /// An HTTP/2 connection as `name`.
    pub async fn h2(&self, name: &str) -> hyper::client::conn::http2::SendRequest<Body> {
        let connector = self.client_for(name, &[b"h2"], Duration::from_secs(3600));
        let tls = self.connect(&connector).await;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    pub async fn hygiene(&self, reason: &str) -> f64 {
        self.mesh
            .metric(
                "orders",
                "meshgate_inbound_hygiene_total",
                &[&format!("reason=\"{reason}\"")],
            )
            .await
    }
}

pub type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

pub fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

/// Reads an HTTP/1.1 response head byte by byte (so nothing after it is consumed).
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    });
    read.await.expect("no response head within 10 s");
    String::from_utf8_lossy(&head).into_owned()
}

pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"))
}
