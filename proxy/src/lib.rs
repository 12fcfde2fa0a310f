//! meshgate-proxy: the sidecar. Inbound mTLS termination with per-request authorization,
//! outbound mTLS origination that verifies the server's SPIFFE ID, the workload identity
//! client, the admin endpoint and metrics.

pub mod admin;
pub mod conn_task;
pub mod console;
pub mod control_plane;
pub mod decision;
pub mod ebpf_flows;
pub mod flows;
pub mod h1_pool;
pub mod h2_conn;
pub mod http_conn;
pub mod http_util;
pub mod identity;
pub mod inbound;
pub mod local_http;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod quarantine;
pub mod serve;
pub mod sidecar;
pub mod tap;
pub mod telemetry;
pub mod tls;
pub mod tls_stream;
pub mod trace_ui;
pub mod tunnel;
