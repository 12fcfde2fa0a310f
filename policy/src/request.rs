//! The facts a request is judged on, as the evaluator and the rule matchers see them.

use meshgate_spiffe::SpiffeId;

/// What a request is judged on. `method`/`path` are `None` for L4 (TCP) connections: rules with
/// L7 conditions never match those.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    pub peer: &'a SpiffeId,
    pub method: Option<&'a str>,
    /// Already normalized (see [`crate::path::normalize_path`]).
    pub path: Option<&'a str>,
    /// The destination port of the workload's app.
    pub port: u16,
    pub headers: Option<&'a http::HeaderMap>,
}
