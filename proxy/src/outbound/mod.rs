//! The outbound listener: plaintext HTTP from the local app, routed by `Host` to a `Service`,
//! carried over mTLS (pooled HTTP/2, or HTTP/1.1 as sent: [`MeshProtocol`]) to one of its sidecars, whose SPIFFE ID must be the one
//! the Service names. A server with a valid certificate but another identity is refused.

pub mod connector;
pub mod detect;
pub mod pool;
pub mod tcp;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use meshgate_ca::SpiffeId;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::h1_pool::MaybeIncoming;
use crate::http_util::{
    APP_PORT_HEADER, ORIG_PROTO_HEADER, ProxyBody, absolute_uri, boxed, bridge_upgrade,
    error_response, error_response_for, host_without_port, is_grpc, origin_form, port_of,
    request_authority, requested_upgrade, set_upgrade, strip_hop_by_hop,
};
use crate::identity::Identity;
use crate::metrics::{LatencyLabels, Metrics, RequestLabels};
pub use connector::MeshConnector;
use http_body_util::BodyExt;
pub use pool::MeshProtocol;

/// A destination the app may call: where its sidecars are and who they must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `namespace/name` of the Service.
    pub name: String,
    pub identity: SpiffeId,
    /// Host names (lowercase, no port) that select this route.
    pub hosts: Vec<String>,
    /// `host:port` of its sidecars' inbound listeners.
    pub endpoints: Vec<String>,
    /// Ports the Service declares `protocol: tcp`: redirected traffic to them skips detection.
    pub opaque_ports: Vec<u16>,
    /// Ports the Service declares `http` or `grpc`: the only ports named to the callee's sidecar
    /// (`x-meshgate-app-port`), see [`app_port_for`].
    pub http_ports: Vec<u16>,
    /// `(port, targetPort)` of the Service's ports whose app port behind the callee's sidecar
    /// differs (a Kubernetes Service port 80 in front of 8080): the callee is asked for the
    /// target, for HTTP (`x-meshgate-app-port`) and L4 tunnels alike.
    pub target_ports: Vec<(u16, u16)>,
}

impl Route {
    /// The callee's app port for the Service port `port`.
    fn target_of(&self, port: u16) -> u16 {
        self.target_ports
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(port, |(_, t)| *t)
    }
}

struct RouteEntry {
    route: Route,
    /// `http_ports` with their header values, built once (no allocation per request).
    port_values: Vec<(u16, HeaderValue)>,
    connector: MeshConnector,
    pool: pool::MeshPool,
    /// This route's `forwarded` request counter and the outbound latency histogram, looked up
    /// once: a family lookup per request hashed the labels and cloned the Service name.
    forwarded: (
        prometheus_client::metrics::counter::Counter,
        prometheus_client::metrics::histogram::Histogram,
    ),
}

impl RouteEntry {
    fn forwarded(&self, started: Instant) {
        self.forwarded.0.inc();
        self.forwarded.1.observe(started.elapsed().as_secs_f64());
    }
}

/// Routes by host, each with its own HTTP/2 connections ([`pool::MeshPool`]). Rebuilt (pools
/// and all) when the Service list changes; requests in flight keep the pool they started with.
///
/// Hashed with foldhash (randomly seeded per table) rather than SipHash: every request looks its
/// host up, and SipHash cost ≈ 170 instructions of it. The keys are the Services' hosts, fixed
/// when the table is built; a lookup with a host an app chose cannot add collisions to it.
#[derive(Default)]
pub struct RouteTable {
    by_host: HashMap<String, Arc<RouteEntry>, foldhash::fast::RandomState>,
}

impl RouteTable {
    /// Builds clients for `routes`; a later route never silently shadows an earlier one's host.
    pub fn build(routes: Vec<Route>, identity: &Identity, metrics: &Arc<Metrics>) -> Self {
        let mut by_host = HashMap::default();
        for route in routes {
            let connector = MeshConnector::new(
                identity,
                route.identity.clone(),
                route.endpoints.clone(),
                metrics.clone(),
            );
            let port_values = route
                .http_ports
                .iter()
                .map(|p| (*p, HeaderValue::from(route.target_of(*p))))
                .collect();
            let name = route.name.clone();
            let entry = Arc::new(RouteEntry {
                port_values,
                route,
                pool: pool::MeshPool::new(connector.clone()),
                connector,
                forwarded: (
                    metrics
                        .requests
                        .get_or_create(&RequestLabels {
                            direction: "outbound",
                            decision: "forwarded",
                            policy: name.clone(),
                        })
                        .clone(),
                    metrics
                        .request_duration
                        .get_or_create(&LatencyLabels {
                            direction: "outbound",
                            decision: "forwarded",
                        })
                        .clone(),
                ),
            });
            for host in &entry.route.hosts {
                if let Some(previous) = by_host.insert(host.clone(), entry.clone()) {
                    tracing::warn!(event = "outbound.host_conflict", host, kept = %previous.route.name, ignored = %entry.route.name);
                    by_host.insert(host.clone(), previous);
                }
            }
        }
        Self { by_host }
    }

    /// The connector of the route serving `host` (lowercase, no port).
    pub fn connector_for(&self, host: &str) -> Option<(String, MeshConnector)> {
        self.by_host
            .get(host)
            .map(|e| (e.route.name.clone(), e.connector.clone()))
    }

    /// The app port behind the callee's sidecar for `port` of the Service at `host` (its
    /// `targetPort`, else `port`).
    pub fn target_port(&self, host: &str, port: u16) -> u16 {
        self.by_host
            .get(host)
            .map_or(port, |e| e.route.target_of(port))
    }

    /// True when the Service at `host` declares `port` opaque (`protocol: tcp`).
    pub fn is_opaque(&self, host: &str, port: u16) -> bool {
        self.by_host
            .get(host)
            .is_some_and(|e| e.route.opaque_ports.contains(&port))
    }

    /// The routes, for `/config`.
    pub fn routes(&self) -> Vec<Route> {
        let mut routes: Vec<Route> = self.by_host.values().map(|e| e.route.clone()).collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        routes.dedup();
        routes
    }
}

/// Which of the callee's app ports to name in `x-meshgate-app-port`: the port the app addressed —
/// the `Host`/`:authority` port, else the redirected connection's original destination port —
/// when the Service declares it (`ports`, `http` or `grpc`); otherwise none, and the callee
/// serves its default app. Only declared ports are sent because the port an app addresses is
/// not always an app port of the callee: a Kubernetes Service port (`frontend:80`, reaching
/// `targetPort` 8080) or an explicit proxy's own port would name a port the callee does not
/// serve, refused (421) by a callee with several apps where its default app is what the caller
/// meant. So a Service without `ports` behaves as before: one app per workload.
pub fn app_port_for(
    declared: &[u16],
    host_port: Option<u16>,
    dst_port: Option<u16>,
) -> Option<u16> {
    host_port.or(dst_port).filter(|p| declared.contains(p))
}

/// Protocol detection settings for redirected connections.
#[derive(Debug, Clone)]
pub struct Detection {
    /// How long to wait for the client's first bytes before treating the connection as opaque.
    pub timeout: Duration,
    /// Destination ports that are always opaque TCP (no detection, no wait).
    pub opaque_ports: Arc<Vec<u16>>,
}

/// Everything the outbound listener needs.
#[derive(Clone)]
pub struct Outbound {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub metrics: Arc<Metrics>,
    /// Client spans of every outbound request.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    pub detection: Detection,
    /// Connection cap (the app is the only source: no per-source cap applies in practice) and
    /// the idle limit of the app's HTTP connections.
    pub limits: crate::serve::Limits,
    /// How requests travel to the callee's sidecar.
    pub mesh_protocol: MeshProtocol,
}

impl Outbound {
    /// Serves the app's plaintext HTTP (HTTP/1.1 or h2c) and redirected TCP until `shutdown`.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        crate::serve::accept_loop(
            listener,
            shutdown,
            drain,
            "outbound",
            self.limits,
            self.metrics.clone(),
            move |tcp, _peer, drain| self.clone().connection(tcp, drain),
        )
        .await;
    }

    /// One accepted connection: redirected non-HTTP goes through an L4 tunnel; HTTP (redirected
    /// or explicit) is served and routed per request.
    ///
    /// The task holds this future for as long as the connection stays open, and an app's pool
    /// keeps many open and idle: the redirected connection's detection and L4 tunnel are boxed,
    /// so the future keeps a pointer's room for them, not their state (5.4 KiB before, measured
    /// by the test below).
    async fn connection(self, tcp: tokio::net::TcpStream, drain: crate::serve::DrainWatch) {
        let _ = tcp.set_nodelay(true);
        let original = detect::original_dst(&tcp);
        let tcp = match original {
            Some(dst) => match Box::pin(self.redirected(tcp, dst)).await {
                Some(http) => http,
                None => return,
            },
            None => tcp,
        };
        let (idle, park) = (self.limits.idle, self.limits.park);
        let parked = self.metrics.parked("outbound");
        let metrics = self.metrics.clone();
        // Shared by the connection's requests: one reference count per request rather than a
        // clone of the sidecar's handles (three `Arc`s and the rest).
        let this = Arc::new(self);
        let dst_port = original.map(|dst| dst.port());
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.forward(req, dst_port).await) }
        });
        let (io, _) = crate::http_conn::HttpIo::new(tcp);
        let conn = crate::http_conn::HttpConnection::new(io, None, service, parked);
        // The app's pooled connections get the inbound listener's idle limit too: a pool that
        // leaks connections, or one opened and never used, would otherwise hold its slot under
        // the listener's cap for ever (Envoy closes idle downstream connections after an hour).
        let served = drain.serve(conn, Some(idle), Some(park)).await;
        if served.idle_closed {
            metrics.count_idle_close("outbound");
            tracing::debug!(
                event = "outbound.idle_timeout",
                finished = served.result.is_some(),
                "closed an idle connection from the app"
            );
        }
        match served.result {
            Some(Err(e)) if crate::http_conn::is_header_timeout(&e) => {
                metrics.count_header_timeout("outbound");
                tracing::debug!(
                    event = "outbound.header_timeout",
                    error = %e,
                    "closed a connection from the app that sent no request in time"
                );
            }
            Some(Err(e)) => tracing::debug!(error = %e, "outbound connection ended with an error"),
            _ => {}
        }
    }

    /// A redirected connection: detected as HTTP (returned to be served), or carried through
    /// an L4 tunnel to `dst` (or closed) here.
    async fn redirected(
        &self,
        tcp: tokio::net::TcpStream,
        dst: std::net::SocketAddr,
    ) -> Option<tokio::net::TcpStream> {
        {
            let host = dst.ip().to_string();
            let verdict = if self.detection.opaque_ports.contains(&dst.port())
                || self.routes.load().is_opaque(&host, dst.port())
            {
                detect::Detected::Opaque
            } else {
                detect::detect(&tcp, self.detection.timeout).await
            };
            self.metrics
                .protocol_detections
                .get_or_create(&crate::metrics::DetectLabels {
                    result: verdict.as_str(),
                })
                .inc();
            match verdict {
                detect::Detected::Http => Some(tcp),
                detect::Detected::Closed => None,
                detect::Detected::Opaque | detect::Detected::Timeout => {
                    tcp::carry(tcp, &host, dst.port(), &self.routes, &self.metrics).await;
                    None
                }
            }
        }
    }

    /// One request from the app: a client span around routing and forwarding, whose context
    /// replaces the app's `traceparent` so the next sidecar's server span is its child.
    /// `dst_port` is the redirected connection's original destination port (none when the app
    /// addressed this listener itself).
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        dst_port: Option<u16>,
    ) -> Response<ProxyBody> {
        use opentelemetry::KeyValue;
        use opentelemetry::trace::{SpanKind, Status, TraceContextExt};
        if !self.telemetry.enabled() {
            // No span to build: skip the attributes' allocations on every request.
            return self.route(req, dst_port).await;
        }
        let parent = self.telemetry.extract(req.headers()).cx;
        let cx = self
            .telemetry
            .start("meshgate.outbound", SpanKind::Client, &parent, || {
                let server = request_authority(&req).unwrap_or_default();
                vec![
                    KeyValue::new("http.request.method", req.method().as_str().to_string()),
                    KeyValue::new("server.address", host_without_port(server).into_owned()),
                    KeyValue::new("url.path", req.uri().path().to_string()),
                ]
            });
        // Sampled or not, the next sidecar and the app get the trace context (not sampled:
        // they do not record it either).
        self.telemetry.inject(&cx, req.headers_mut());
        let resp = self.route(req, dst_port).await;
        let span = cx.span();
        if span.is_recording() {
            let status = resp.status();
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            if status.is_client_error() || status.is_server_error() {
                span.set_status(Status::error(status.to_string()));
            }
            span.end();
        }
        resp
    }

    async fn route(
        &self,
        mut req: Request<Incoming>,
        dst_port: Option<u16>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let Some(authority) = request_authority(&req).map(str::to_string) else {
            self.record("bad-request", "", started);
            return error_response(
                req.headers(),
                StatusCode::BAD_REQUEST,
                "meshgate: request has no Host\n",
            );
        };
        let host = host_without_port(&authority);
        let Some(entry) = self.routes.load().by_host.get(host.as_ref()).cloned() else {
            tracing::warn!(
                event = "outbound.no_route",
                host = host.as_ref(),
                "no Service for this host; refusing (fail closed)"
            );
            self.record("no-route", "", started);
            return error_response(
                req.headers(),
                StatusCode::BAD_GATEWAY,
                "meshgate: no Service for this host\n",
            );
        };
        // The headers only this sidecar may set for the callee's sidecar: whatever the app sent
        // under these names is dropped, never forwarded (the callee would trust them).
        let headers = req.headers_mut();
        headers.remove(ORIG_PROTO_HEADER);
        headers.remove(APP_PORT_HEADER);
        if let Some(port) = app_port_for(&entry.route.http_ports, port_of(&authority), dst_port)
            && let Some((_, value)) = entry.port_values.iter().find(|(p, _)| *p == port)
        {
            headers.insert(APP_PORT_HEADER, value.clone());
        }
        if let Some(protocol) = requested_upgrade(&req) {
            // Boxed: rare, and 3.2 KB of future every request's would otherwise make room for.
            return Box::pin(self.forward_upgrade(req, protocol, &entry, started)).await;
        }
        let grpc = is_grpc(req.headers());
        let http1 =
            req.version() != Version::HTTP_2 && self.mesh_protocol == MeshProtocol::Preserve;
        strip_hop_by_hop(req.headers_mut());
        let Ok(parsed_authority) = http::uri::Authority::try_from(authority.as_str()) else {
            self.record("bad-request", &entry.route.name, started);
            return error_response(
                req.headers(),
                StatusCode::BAD_REQUEST,
                "meshgate: invalid Host\n",
            );
        };
        let sent = if http1 {
            // HTTP/1.1 as the app sent it: origin-form target, the authority in `Host` (the
            // callee judges it), on a kept-alive HTTP/1.1 connection.
            if !req.headers().contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(&authority)
            {
                req.headers_mut().insert(header::HOST, host);
            }
            *req.uri_mut() = origin_form(req.uri());
            *req.version_mut() = Version::HTTP_11;
            entry
                .pool
                .send_http1(req.map(MaybeIncoming::from))
                .await
                .map(|resp| resp.map(BodyExt::boxed_unsync))
        } else {
            if req.version() != Version::HTTP_2 {
                // HTTP/1.1 carried over HTTP/2: the callee's sidecar gives its app HTTP/1.1.
                req.headers_mut()
                    .insert(ORIG_PROTO_HEADER, HeaderValue::from_static("HTTP/1.1"));
            }
            req.headers_mut().remove(header::HOST);
            *req.uri_mut() = absolute_uri(req.uri(), parsed_authority);
            *req.version_mut() = Version::HTTP_2;
            entry.pool.send(req).await.map(|resp| resp.map(boxed))
        };
        match sent {
            Ok(resp) => {
                entry.forwarded(started);
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body)
            }
            Err(e) => {
                tracing::warn!(
                    event = "outbound.upstream_failed",
                    service = %entry.route.name,
                    expected.id = %entry.route.identity,
                    error = ?e,
                    "could not reach a verified sidecar of the Service"
                );
                self.record("error", &entry.route.name, started);
                error_response_for(
                    grpc,
                    StatusCode::BAD_GATEWAY,
                    "meshgate: upstream unavailable\n",
                )
            }
        }
    }

    /// An upgrade (WebSocket, …) cannot ride the pooled HTTP/2 connection: it gets its own
    /// HTTP/1.1 mTLS connection to the peer sidecar, verified the same way, then the two upgraded
    /// streams are joined.
    async fn forward_upgrade(
        &self,
        mut req: Request<Incoming>,
        protocol: HeaderValue,
        entry: &RouteEntry,
        started: Instant,
    ) -> Response<ProxyBody> {
        let downstream = hyper::upgrade::on(&mut req);
        strip_hop_by_hop(req.headers_mut());
        set_upgrade(req.headers_mut(), protocol);
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        *req.uri_mut() = pq.parse().expect("path and query form a URI");
        let request_headers = req.headers().clone();
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::warn!(event = "outbound.upstream_failed", service = %entry.route.name, error = %e, "upgrade could not reach a verified sidecar");
            error_response(
                &request_headers,
                StatusCode::BAD_GATEWAY,
                "meshgate: upstream unavailable\n",
            )
        };
        let io = match entry.connector.connect_http1().await {
            Ok(io) => io,
            Err(e) => {
                self.record("error", &entry.route.name, started);
                return unavailable(&e);
            }
        };
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(pair) => pair,
            Err(e) => {
                self.record("error", &entry.route.name, started);
                return unavailable(&e);
            }
        };
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        match sender.send_request(req).await {
            Ok(mut resp) => {
                entry.forwarded(started);
                let upstream = (resp.status() == StatusCode::SWITCHING_PROTOCOLS)
                    .then(|| hyper::upgrade::on(&mut resp));
                let (mut parts, body) = resp.into_parts();
                let accepted = parts.headers.get(header::UPGRADE).cloned();
                strip_hop_by_hop(&mut parts.headers);
                if let (Some(up), Some(protocol)) = (upstream, accepted) {
                    set_upgrade(&mut parts.headers, protocol);
                    bridge_upgrade(downstream, up, std::future::pending());
                }
                Response::from_parts(parts, boxed(body))
            }
            Err(e) => {
                self.record("error", &entry.route.name, started);
                unavailable(&e)
            }
        }
    }

    fn record(&self, decision: &'static str, service: &str, started: Instant) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                direction: "outbound",
                decision,
                policy: service.to_string(),
            })
            .inc();
        self.metrics
            .request_duration
            .get_or_create(&LatencyLabels {
                direction: "outbound",
                decision,
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::{Outbound, app_port_for};

    /// The size of what `f` returns, without calling it.
    fn returned_size<F, A, B, C, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every open connection of the app's holds its task's future for as long as it stays
    /// open, parked or not; an app's pool keeps many (5.4 KiB each while the redirected path's
    /// detection and tunnel were inline).
    #[test]
    fn a_connection_task_holds_no_tunnel_state() {
        let size = returned_size(Outbound::connection);
        assert!(
            size <= 1024,
            "Outbound::connection's future is {size} bytes: box the phase that grew it"
        );
    }

    #[test]
    fn the_app_port_named_to_the_callee() {
        let declared = [8080, 9090];
        for (host_port, dst_port, want) in [
            // The Host port wins over the original destination.
            (Some(9090), Some(8080), Some(9090)),
            (Some(9090), None, Some(9090)),
            // No Host port: the redirected connection's original port.
            (None, Some(9090), Some(9090)),
            // Undeclared ports are never named: the callee's default app serves them
            // (a Kubernetes Service port 80 in front of targetPort 8080).
            (Some(80), Some(9090), None),
            (None, Some(80), None),
            (None, None, None),
        ] {
            assert_eq!(
                app_port_for(&declared, host_port, dst_port),
                want,
                "Host port {host_port:?}, original port {dst_port:?}"
            );
        }
        // A Service without ports names none: one app per workload, as before.
        assert_eq!(app_port_for(&[], Some(8080), Some(8080)), None);
    }
}
