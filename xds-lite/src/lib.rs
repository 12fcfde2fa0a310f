//! meshgate-xds: the policy and discovery model (plain serde types), its validation, the compiled
//! per-workload `PolicySnapshot` that the sidecar consults per request, and request-path
//! normalization. The control-plane server and client arrive with the control-plane issue.

pub mod authz;
pub mod client;
mod docsplit;
mod index;
pub mod load;
mod matcher;
pub mod method;
pub mod model;
pub mod path;
pub mod pattern;
pub mod scope;
pub mod server;
pub mod tools;
pub mod validate;
mod version;
pub mod wire;

#[cfg(test)]
mod authz_tests;
#[cfg(test)]
mod hostile_paths_tests;
#[cfg(test)]
mod load_tests;

pub use authz::{AuthzRequest, Decision, DecisionKind, PolicySnapshot};
pub use load::{LoadErrors, PolicySet, ValidationError, load_dir, load_text, parse_file};
pub use method::{MethodError, check_method};
pub use path::{NormalizedPath, PathError, normalize_path};
