//! File helpers for secrets: atomic writes with a fixed mode, and the permission check that keeps
//! a CA from running on a key others can read.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, created with
/// `mode` (never briefly world-readable), fsynced, renamed over `path`, then the directory fsynced.
/// A crash leaves either the old file or the new one, never a torn key.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut suffix = [0u8; 6];
    crate::tls::random_bytes(&mut suffix);
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        crate::cert::hex(&suffix)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error(
        "key file {path} has mode {mode:04o}: it must not be readable by group or others; fix it with `chmod 600 {path}`"
    )]
    TooOpen { path: String, mode: u32 },
    #[error("cannot read key file {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Refuses a key file that group or others can access in any way.
pub fn check_key_mode(path: &Path) -> Result<(), KeyFileError> {
    let meta = fs::metadata(path).map_err(|source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

/// Reads a key file after [`check_key_mode`].
pub fn read_key_file(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    check_key_mode(path)?;
    fs::read(path).map_err(|source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_refuses_open_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        write_atomic(&key, b"secret", 0o600).unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_key_file(&key).unwrap(), b"secret");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_key_file(&key).unwrap_err().to_string();
            assert!(err.contains(&key.display().to_string()), "{err}");
            assert!(err.contains("chmod 600"), "{err}");
        }
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
