//! Request-path normalization. (Interface; implementation in progress.)

/// A path safe to judge and to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    /// The normalized path (starts with `/`, no query).
    pub path: String,
    /// The query, unchanged, without the `?`.
    pub query: Option<String>,
    /// True when `path` differs from the original path part.
    pub changed: bool,
}

/// Why a path was refused (the request gets 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is not in origin form")]
    NotOriginForm,
}

/// Normalizes a request target's path-and-query.
pub fn normalize_path(target: &str) -> Result<NormalizedPath, PathError> {
    let _ = target;
    todo!()
}
