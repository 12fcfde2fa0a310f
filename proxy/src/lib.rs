//! meshgate-proxy: the sidecar. Today it holds the workload identity client; the data plane
//! (inbound mTLS + authorization, outbound mTLS) arrives with the sidecar issue.

pub mod identity;
