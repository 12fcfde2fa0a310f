//! Identity from files (`--svid-cert`, `--svid-key`, `--trust-bundle`): certificates made by any
//! tool (`meshgate ca issue`, openssl, cert-manager, SPIRE's helper) work.
//!
//! The files are polled rather than watched with inotify: bind mounts, Kubernetes Secret volumes
//! (symlink swaps) and editors that replace files all defeat inotify in one way or another, and a
//! stat of three files per second costs nothing. A set of files that does not load (half-written,
//! mismatched key, wrong chain) is logged and the current certificate stays in use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshgate_ca::{TrustBundle, cert};

use super::{Identity, IdentityError};

/// The three files of a static identity.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

struct Loaded {
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    bundle: TrustBundle,
}

impl IdentityFiles {
    fn read(&self) -> Result<Loaded, IdentityError> {
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| IdentityError::Config(format!("cannot read {}: {e}", p.display())))
        };
        let config = |p: &PathBuf, e: &dyn std::fmt::Display| {
            IdentityError::Config(format!("{}: {e}", p.display()))
        };
        let chain = cert::certs_from_pem(&read(&self.cert)?).map_err(|e| config(&self.cert, &e))?;
        // The key file must be private to its owner, as everywhere meshgate reads a key.
        let key_pem = meshgate_ca::fsutil::read_key_file(&self.key)
            .map_err(|e| IdentityError::Config(e.to_string()))?;
        let key = cert::key_from_pem(&key_pem).map_err(|e| config(&self.key, &e))?;
        let bundle =
            TrustBundle::from_pem(&read(&self.bundle)?).map_err(|e| config(&self.bundle, &e))?;
        Ok(Loaded { chain, key, bundle })
    }

    /// A set of files that loaded but does not form a usable SVID, said in terms of the files
    /// (no CA is involved in file mode).
    fn unusable(&self, e: IdentityError) -> IdentityError {
        let IdentityError::BadSvid(reason) = e else {
            return e;
        };
        let fix = if reason.contains("Key") || reason.contains("key") {
            format!(
                "{} must hold the private key of the first certificate in {}",
                self.key.display(),
                self.cert.display()
            )
        } else {
            format!(
                "{} must chain to a root in {} and be valid now",
                self.cert.display(),
                self.bundle.display()
            )
        };
        IdentityError::Config(format!(
            "the SVID files {} + {} (bundle {}) are unusable: {reason}; {fix}",
            self.cert.display(),
            self.key.display(),
            self.bundle.display()
        ))
    }

    fn stamp(&self) -> Vec<(Option<SystemTime>, u64)> {
        use std::os::unix::fs::MetadataExt;
        [&self.cert, &self.key, &self.bundle]
            .iter()
            .map(|p| std::fs::metadata(p).map_or((None, 0), |m| (m.modified().ok(), m.ino())))
            .collect()
    }

    /// Loads the files once (failing if they are unusable) and keeps polling them every
    /// `interval`, publishing each new valid set.
    pub fn start(self, interval: Duration) -> Result<Arc<Identity>, IdentityError> {
        // Stamp before reading: a change landing between the two is then seen by the first poll.
        let mut seen = self.stamp();
        let loaded = self.read()?;
        let id = cert::spiffe_id_from_der(&loaded.chain[0])
            .map_err(|e| IdentityError::Config(format!("{}: {e}", self.cert.display())))?;
        let identity = Arc::new(Identity::new(id, loaded.bundle.clone()));
        identity
            .publish(loaded.chain, loaded.key, loaded.bundle, 0)
            .map_err(|e| self.unusable(e))?;
        let handle = identity.clone();
        tokio::spawn(async move {
            let mut reloads = 0;
            loop {
                tokio::time::sleep(interval).await;
                let now = self.stamp();
                if now == seen {
                    continue;
                }
                seen = now;
                match self.read().and_then(|l| {
                    reloads += 1;
                    handle
                        .publish(l.chain, l.key, l.bundle, reloads)
                        .map_err(|e| self.unusable(e))
                }) {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::error!(event = "identity.files_rejected", error = %e, "keeping the current certificate");
                        handle.note_error(&e.to_string());
                    }
                }
            }
        });
        Ok(identity)
    }
}
