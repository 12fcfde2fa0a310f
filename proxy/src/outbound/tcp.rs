//! Outbound TCP forwards (`--tcp-forward 127.0.0.1:15432=postgres:5432`): the app connects to a
//! local port, and the sidecar carries the bytes over an mTLS L4 tunnel to a sidecar of the
//! Service, verified by SPIFFE ID like HTTP traffic. Such ports are opaque by declaration, so
//! server-speaks-first protocols work and nothing waits for protocol detection.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::RouteTable;
use crate::http_util::host_without_port;
use crate::metrics::{Metrics, TcpLabels};

/// One `LISTEN=HOST:PORT` forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpForward {
    pub listen: SocketAddr,
    /// Service host (as in `hosts`, the name, or `name.namespace`).
    pub host: String,
    /// Port of the destination app.
    pub port: u16,
}

impl FromStr for TcpForward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "--tcp-forward {s:?}: expected LISTEN_ADDR=SERVICE:PORT, e.g. 127.0.0.1:15432=postgres:5432"
            )
        };
        let (listen, target) = s.split_once('=').ok_or_else(usage)?;
        let (host, port) = target.rsplit_once(':').ok_or_else(usage)?;
        Ok(Self {
            listen: listen.parse().map_err(|_| usage())?,
            host: host_without_port(host).into_owned(),
            port: port.parse().ok().filter(|p| *p != 0).ok_or_else(usage)?,
        })
    }
}

fn count(metrics: &Metrics, decision: &'static str, port: u16) {
    metrics
        .tcp_connections
        .get_or_create(&TcpLabels {
            direction: "outbound",
            decision,
            port,
        })
        .inc();
}

/// Carries one app connection to `host:port` through an L4 tunnel to a sidecar of the Service
/// serving `host`. Nothing leaves unverified: no Service, no connection.
pub async fn carry(
    mut app: TcpStream,
    host: &str,
    port: u16,
    routes: &ArcSwap<RouteTable>,
    metrics: &Metrics,
) {
    let table = routes.load();
    let Some((service, connector)) = table.connector_for(host) else {
        tracing::warn!(
            event = "tunnel.no_route",
            host,
            port,
            "no Service for this TCP destination; closing (fail closed)"
        );
        return count(metrics, "error", port);
    };
    // The tunnel names the callee's app port (the Service's targetPort for this port).
    let port = table.target_port(host, port);
    drop(table);
    let tunnel = match connector.connect_tunnel().await {
        Ok(tls) => crate::tunnel::open(tls, port).await,
        Err(e) => Err(e),
    };
    let mut tunnel = match tunnel {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(event = "tunnel.refused", service, port, error = %e, "TCP tunnel not established");
            let decision = if e.kind() == std::io::ErrorKind::PermissionDenied {
                "deny"
            } else {
                "error"
            };
            return count(metrics, decision, port);
        }
    };
    count(metrics, "allow", port);
    let _ = tokio::io::copy_bidirectional(&mut app, &mut tunnel).await;
}

/// Serves one TCP forward until shutdown.
pub async fn serve(
    listener: TcpListener,
    forward: TcpForward,
    routes: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let forward = Arc::new(forward);
    crate::serve::accept_loop(
        listener,
        shutdown,
        Duration::ZERO,
        "tcp-forward",
        crate::serve::Limits::default(),
        metrics.clone(),
        move |app, _peer, _drain| {
            let (forward, routes, metrics) = (forward.clone(), routes.clone(), metrics.clone());
            async move {
                let _ = app.set_nodelay(true);
                carry(app, &forward.host, forward.port, &routes, &metrics).await
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forwards() {
        let f: TcpForward = "127.0.0.1:15432=Postgres.shop:5432".parse().unwrap();
        assert_eq!(f.listen, "127.0.0.1:15432".parse().unwrap());
        assert_eq!((f.host.as_str(), f.port), ("postgres.shop", 5432));
        for bad in [
            "127.0.0.1:1=pg",
            "pg:5432",
            "x=pg:5432",
            "127.0.0.1:1=pg:0",
            "127.0.0.1:1=pg:http",
        ] {
            assert!(bad.parse::<TcpForward>().is_err(), "{bad}");
        }
    }
}
