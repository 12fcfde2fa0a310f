//! Wire types of the CA's HTTPS API (JSON). Documented in docs/operations.md ("Serving").

use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;

/// `POST /v1/svid` with `Authorization: Bearer <join token>`, and `POST /v1/svid/renew` over
/// mTLS: the request body is the CSR as PEM. Both answer with this.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvidResponse {
    pub spiffe_id: SpiffeId,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// Leaf then intermediate, PEM.
    pub svid_pem: String,
    /// Every root currently trusted, PEM.
    pub bundle_pem: String,
}

/// Every refusal: a stable machine-readable `error` code and a `message` saying what to fix.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorResponse {
    pub error: String,
    pub message: String,
}

/// API paths.
pub const PATH_SVID: &str = "/v1/svid";
pub const PATH_RENEW: &str = "/v1/svid/renew";
pub const PATH_BUNDLE: &str = "/v1/bundle";
pub const PATH_HEALTH: &str = "/healthz";
/// Connection counters (refusals, timeouts, open connections) as OpenMetrics text.
pub const PATH_METRICS: &str = "/metrics";
/// Largest request body the CA reads (a P-256 CSR in PEM is well under 1 KiB).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
