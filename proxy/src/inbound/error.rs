//! The inbound path's errors, and the one place they become responses.
//!
//! The layers return these instead of building responses, so the status code, the body and the
//! gRPC mapping of every refusal are decided here, and [`super::observe::Observe`] writes the
//! decision each refusal carries (the caller's response never says more than the status).

use http::{Response, StatusCode};
use meshgate_policy::DecisionRecord;

use crate::http_util::{ProxyBody, error_response_for};

/// Why the inbound path answered instead of the app.
#[derive(Debug)]
pub enum InboundError {
    /// Refused before any policy was consulted (bad method, path, Host): 400.
    BadRequest {
        record: Box<DecisionRecord>,
        /// What the caller reads.
        body: &'static str,
    },
    /// Denied by policy, or the caller's certificate expired while its connection stayed
    /// open: 403.
    Forbidden(Box<DecisionRecord>),
    /// The calling sidecar named an app port (`x-meshgate-app-port`) this sidecar does not
    /// serve (no such `--app`, and several apps to choose from): 421 Misdirected Request (RFC 9110 §15.5.20), "this server cannot
    /// answer for that target" — not 404, which the app itself answers for paths, so a caller
    /// can tell a mesh misconfiguration (the Service declares a port the workload does not
    /// serve) from a missing page.
    MisdirectedPort(Box<DecisionRecord>),
    /// This sidecar's own SVID has expired (the CA stayed unreachable past its lifetime): 503,
    /// not 403 — the caller is not at fault and may try another endpoint.
    LocalIdentityExpired,
}

impl InboundError {
    pub fn status(&self) -> StatusCode {
        match self {
            InboundError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            InboundError::Forbidden(_) => StatusCode::FORBIDDEN,
            InboundError::MisdirectedPort(_) => StatusCode::MISDIRECTED_REQUEST,
            InboundError::LocalIdentityExpired => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The decision behind the error, if one was made.
    pub fn record(&self) -> Option<&DecisionRecord> {
        match self {
            InboundError::BadRequest { record, .. }
            | InboundError::Forbidden(record)
            | InboundError::MisdirectedPort(record) => Some(record),
            InboundError::LocalIdentityExpired => None,
        }
    }

    /// The response the caller gets (gRPC callers get a gRPC status instead of a body).
    pub fn into_response(self, grpc: bool) -> Response<ProxyBody> {
        let body = match &self {
            InboundError::BadRequest { body, .. } => body,
            InboundError::Forbidden(_) => "forbidden\n",
            InboundError::MisdirectedPort(_) => "meshgate: no app on that port here\n",
            InboundError::LocalIdentityExpired => "meshgate: this sidecar's SVID has expired\n",
        };
        error_response_for(grpc, self.status(), body)
    }
}
