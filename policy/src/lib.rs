//! meshgate-policy: the policy as data and pure functions.
//!
//! - [`model`]: the documents as plain serde types (`deny_unknown_fields`);
//! - [`load`] / [`validate`]: reading a policy directory, refused as a whole with `file:line`;
//! - [`version`]: content-hash versions; [`scope`]: which documents apply to which workload;
//! - [`authz`]: the identity-indexed evaluator, compiled per workload;
//! - [`judge()`]: one request judged exactly as the sidecar judges it (method and path
//!   checks, normalization, evaluation) — the sidecar and `policy explain/test` both call it;
//! - [`schema`]: the OpenAPI schemas of the kinds for Kubernetes CRDs, generated from the model;
//! - [`record`]: the one decision record written to logs, spans, metrics and the decision feed,
//!   and read back by the flow tools.
//!
//! No async runtime, no HTTP stack, no TLS: the sidecar, the control plane (`meshgate-xds`) and
//! the operator tools (`meshgate-policy-tools`) build on it.

#![forbid(unsafe_code)]

pub mod authz;
mod docsplit;
mod index;
pub mod judge;
pub mod load;
mod matcher;
pub mod method;
pub mod model;
pub mod path;
pub mod pattern;
pub mod record;
pub mod request;
pub mod schema;
pub mod scope;
pub mod set;
pub mod validate;
mod version;

#[cfg(test)]
mod authz_tests;
#[cfg(test)]
mod hostile_paths_tests;
#[cfg(test)]
mod load_tests;
#[cfg(test)]
mod schema_tests;

pub use authz::{Decision, DecisionKind, PolicySnapshot};
pub use judge::{Judgement, Refusal, judge};
pub use load::{LoadErrors, ValidationError, load_dir, load_text, parse_file};
pub use method::{MethodError, check_method};
pub use path::{NormalizedPath, PathError, normalize_path};
pub use record::DecisionRecord;
pub use request::AuthzRequest;
pub use set::PolicySet;
