//! Loading and validating policy-as-code directories. (Interface; implementation in progress.)

use std::path::{Path, PathBuf};

use crate::model::{AuthorizationPolicy, MeshConfig, NetworkPolicy, Service};

/// Every document of a policy directory, validated, with a content version.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub policies: Vec<AuthorizationPolicy>,
    pub services: Vec<Service>,
    pub network_policies: Vec<NetworkPolicy>,
    pub mesh_config: MeshConfig,
    /// Short hash of the documents' content: equal content, equal version.
    pub version: String,
}

/// One problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub file: PathBuf,
    pub line: usize,
    pub reason: String,
}

/// All problems found (the directory is refused as a whole).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.iter().map(|e| format!("{}:{}: {}", e.file.display(), e.line, e.reason)).collect::<Vec<_>>().join("\n"))]
pub struct LoadErrors(pub Vec<ValidationError>);

/// Loads every `*.yaml`/`*.yml` file under `dir` (recursively).
pub fn load_dir(dir: &Path) -> Result<PolicySet, LoadErrors> {
    let _ = dir;
    todo!()
}

/// Parses one file's documents into `set` (used for `--services FILE` too).
pub fn parse_file(path: &Path, set: &mut PolicySet) -> Result<(), LoadErrors> {
    let _ = (path, set);
    todo!()
}
