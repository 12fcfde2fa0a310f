//! The emergency quarantine of one identity as a policy file: what `meshgate quarantine` and the
//! console's quarantine button both write, so the two can never disagree on the file's name or
//! content (the console's "lift" must remove exactly what the CLI wrote, and vice versa).
//!
//! The file lives in the policy directory, in the root namespace `meshgate`, and holds one DENY
//! rule for the identity: DENY is evaluated before any ALLOW, and every replica reading the
//! directory serves it.

use std::path::{Path, PathBuf};

use meshgate_ca::{SpiffeId, cert, fsutil};

/// Why a quarantine could not be written or lifted.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("{id} is not quarantined (no {})", file.display())]
    NotQuarantined { id: String, file: PathBuf },
    #[error("writing {}: {source}; check the policy directory exists and is writable", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the policy directory does not validate, so the quarantine would not apply; fix it first:\n{0}"
    )]
    Invalid(String),
}

/// `quarantine-<first 12 hex digits of SHA-256(id)>`: stable, and no ID text in a file name.
pub fn policy_name(id: &SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
    format!("quarantine-{}", &cert::hex(digest.as_ref())[..12])
}

/// The quarantine file of `id` in `dir`.
pub fn file_of(dir: &Path, id: &SpiffeId) -> PathBuf {
    dir.join(format!("{}.yaml", policy_name(id)))
}

/// Whether `id` is quarantined in `dir` (its file exists).
pub fn is_quarantined(dir: &Path, id: &SpiffeId) -> bool {
    file_of(dir, id).exists()
}

/// Writes the quarantine of `id` into `dir` and checks the directory still validates (if it
/// does not, the file is removed again and the reason returned: a quarantine that no control
/// plane would serve must not look applied). Returns the file written.
pub fn write(dir: &Path, id: &SpiffeId) -> Result<PathBuf, QuarantineError> {
    let name = policy_name(id);
    let file = file_of(dir, id);
    let doc = format!(
        "# Emergency quarantine written by `meshgate quarantine`; remove with --lift.\napiVersion: meshgate.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: {name}, namespace: meshgate }}\nspec:\n  action: DENY\n  rules:\n    - from: [{{ principals: [\"{id}\"] }}]\n"
    );
    fsutil::write_atomic(&file, doc.as_bytes(), 0o644).map_err(|source| QuarantineError::Io {
        file: file.clone(),
        source,
    })?;
    if let Err(e) = meshgate_policy::load_dir(dir) {
        let _ = std::fs::remove_file(&file);
        return Err(QuarantineError::Invalid(e.to_string()));
    }
    Ok(file)
}

/// Removes the quarantine of `id` from `dir`. Returns the file removed.
pub fn lift(dir: &Path, id: &SpiffeId) -> Result<PathBuf, QuarantineError> {
    let file = file_of(dir, id);
    match std::fs::remove_file(&file) {
        Ok(()) => Ok(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(QuarantineError::NotQuarantined {
                id: id.to_string(),
                file,
            })
        }
        Err(source) => Err(QuarantineError::Io { file, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";

    #[test]
    fn write_lift_and_refuse_a_broken_directory() {
        let dir = tempfile::tempdir().unwrap();
        let id = SpiffeId::parse(WEB).unwrap();
        assert!(matches!(
            lift(dir.path(), &id),
            Err(QuarantineError::NotQuarantined { .. })
        ));
        let file = write(dir.path(), &id).unwrap();
        assert_eq!(file, file_of(dir.path(), &id));
        assert!(is_quarantined(dir.path(), &id));
        // What it wrote is a valid policy (the DENY the control plane will serve).
        let set = meshgate_policy::load_dir(dir.path()).unwrap();
        assert_eq!(set.policies.len(), 1);
        assert_eq!(lift(dir.path(), &id).unwrap(), file);
        assert!(!is_quarantined(dir.path(), &id));
        // A directory that does not validate: the quarantine would not apply, so it is not left.
        std::fs::write(dir.path().join("broken.yaml"), "kind: Nonsense\n").unwrap();
        assert!(matches!(
            write(dir.path(), &id),
            Err(QuarantineError::Invalid(_))
        ));
        assert!(!is_quarantined(dir.path(), &id));
    }
}
