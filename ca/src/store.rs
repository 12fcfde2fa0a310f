//! The CA directory: what `meshgate ca init` writes and every other `ca` command reads.
//!
//! ```text
//! ca.json            trust domain (written last: its presence means "initialized")
//! root.pem           root certificate            root.key          its key (0600)
//! intermediate.pem   signing intermediate        intermediate.key  its key (0600)
//! bundle.pem         trusted roots (served at /v1/bundle; add a new root here to rotate)
//! token.key          join-token HMAC secret (0600)
//! used-tokens        ledger of spent single-use tokens
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::authority::Authority;
use crate::fsutil::{self, KeyFileError};
use crate::spiffe::TrustDomain;
use crate::tls::TrustBundle;
use crate::token::{NonceLedger, TokenError, TokenKey};

const CONFIG: &str = "ca.json";
const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root.key";
const INTERMEDIATE_CERT: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate.key";
const BUNDLE: &str = "bundle.pem";
const TOKEN_KEY: &str = "token.key";
const LEDGER: &str = "used-tokens";
const KEY_FILES: [&str; 3] = [ROOT_KEY, INTERMEDIATE_KEY, TOKEN_KEY];

/// Why the CA directory cannot be created or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "a CA already exists in {dir} ({file} is present); pass --force to replace it (every SVID it issued stops verifying)"
    )]
    Exists { dir: String, file: String },
    #[error(
        "{dir} holds no initialized CA ({file} is missing); run `meshgate ca init --dir {dir}`"
    )]
    Missing { dir: String, file: String },
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Contents of `ca.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaConfig {
    trust_domain: String,
}

/// A CA loaded from its directory, ready to sign.
pub struct LoadedCa {
    pub authority: Authority,
    pub tokens: TokenKey,
    pub dir: CaDir,
}

/// Paths inside one CA directory.
#[derive(Debug, Clone)]
pub struct CaDir {
    root: PathBuf,
}

impl CaDir {
    /// The CA directory at `dir` (not checked until used).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { root: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn display(&self) -> String {
        self.root.display().to_string()
    }

    /// Path of the trust bundle (`bundle.pem`).
    pub fn bundle_path(&self) -> PathBuf {
        self.path(BUNDLE)
    }

    /// Path of the root certificate (`root.pem`).
    pub fn root_cert_path(&self) -> PathBuf {
        self.path(ROOT_CERT)
    }

    /// Path of the intermediate certificate (`intermediate.pem`).
    pub fn intermediate_cert_path(&self) -> PathBuf {
        self.path(INTERMEDIATE_CERT)
    }

    /// Creates a new root, intermediate, bundle and token secret for `td`.
    pub fn init(&self, td: &TrustDomain, force: bool) -> Result<(), StoreError> {
        let io_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| StoreError::Io { path, source }
        };
        if !force {
            let all = [
                CONFIG,
                ROOT_CERT,
                INTERMEDIATE_CERT,
                BUNDLE,
                TOKEN_KEY,
                LEDGER,
            ];
            if let Some(file) = all
                .iter()
                .chain(KEY_FILES.iter())
                .find(|f| self.path(f).exists())
            {
                return Err(StoreError::Exists {
                    dir: self.display(),
                    file: file.to_string(),
                });
            }
        }
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let material = Authority::create(td).map_err(|e| StoreError::Invalid {
            path: self.display(),
            reason: format!("generating the CA failed: {e}"),
        })?;
        let secret = TokenKey::generate_secret();
        let config = serde_json::to_vec_pretty(&CaConfig {
            trust_domain: td.to_string(),
        })
        .expect("config serializes");
        // ca.json goes last: a crash mid-way leaves a directory `open` reports as not initialized.
        let _ = fs::remove_file(self.path(CONFIG));
        let files: [(&str, &[u8], u32); 8] = [
            (ROOT_KEY, material.root_key_pem.as_bytes(), 0o600),
            (
                INTERMEDIATE_KEY,
                material.intermediate_key_pem.as_bytes(),
                0o600,
            ),
            (TOKEN_KEY, &secret, 0o600),
            (ROOT_CERT, material.root_pem.as_bytes(), 0o644),
            (
                INTERMEDIATE_CERT,
                material.intermediate_pem.as_bytes(),
                0o644,
            ),
            (BUNDLE, material.root_pem.as_bytes(), 0o644),
            (LEDGER, b"", 0o600),
            (CONFIG, &config, 0o644),
        ];
        for (name, bytes, mode) in files {
            let path = self.path(name);
            fsutil::write_atomic(&path, bytes, mode).map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Starts a root rotation: a new root and signing intermediate take over, and the trust
    /// bundle keeps the old roots next to the new one, so every SVID issued so far still verifies
    /// while workloads pick up the new bundle (they re-fetch it; nothing restarts). The bundle is
    /// written first, so the new root is trusted before anything is signed under it. A running
    /// `meshgate ca serve` switches to the new intermediate by itself. Returns the bundle size.
    pub fn rotate(&self) -> Result<usize, StoreError> {
        let td = self.trust_domain()?;
        for name in KEY_FILES {
            let path = self.path(name);
            if path.exists() {
                fsutil::check_key_mode(&path)?;
            }
        }
        let material = Authority::create(&td).map_err(|e| StoreError::Invalid {
            path: self.display(),
            reason: format!("generating the new CA failed: {e}"),
        })?;
        let mut certs = self.read_bundle()?.certs().to_vec();
        certs.extend(
            crate::cert::certs_from_pem(material.root_pem.as_bytes()).map_err(|e| {
                StoreError::Invalid {
                    path: self.display(),
                    reason: e.to_string(),
                }
            })?,
        );
        let bundle = crate::cert::certs_to_pem(&certs);
        let io_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| StoreError::Io { path, source }
        };
        let files: [(&str, &[u8], u32); 5] = [
            (BUNDLE, bundle.as_bytes(), 0o644),
            (ROOT_KEY, material.root_key_pem.as_bytes(), 0o600),
            (
                INTERMEDIATE_KEY,
                material.intermediate_key_pem.as_bytes(),
                0o600,
            ),
            (ROOT_CERT, material.root_pem.as_bytes(), 0o644),
            (
                INTERMEDIATE_CERT,
                material.intermediate_pem.as_bytes(),
                0o644,
            ),
        ];
        for (name, bytes, mode) in files {
            let path = self.path(name);
            fsutil::write_atomic(&path, bytes, mode).map_err(io_err(&path))?;
        }
        Ok(certs.len())
    }

    /// Ends a rotation: the bundle keeps only the current root. Every SVID signed under an older
    /// root stops verifying, so run it only once they have all been renewed (one SVID TTL after
    /// the CA switched).
    pub fn finish_rotation(&self) -> Result<usize, StoreError> {
        self.trust_domain()?;
        let root = self.read_text(ROOT_CERT)?;
        let before = self.read_bundle()?.certs().len();
        let path = self.bundle_path();
        fsutil::write_atomic(&path, root.as_bytes(), 0o644).map_err(|source| StoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(before - 1)
    }

    /// The trust domain from `ca.json`.
    pub fn trust_domain(&self) -> Result<TrustDomain, StoreError> {
        let path = self.path(CONFIG);
        let raw = fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::Missing {
                dir: self.display(),
                file: CONFIG.into(),
            },
            _ => StoreError::Io {
                path: path.display().to_string(),
                source: e,
            },
        })?;
        let invalid = |reason: String| StoreError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let config: CaConfig = serde_json::from_slice(&raw).map_err(|e| invalid(e.to_string()))?;
        TrustDomain::new(&config.trust_domain).map_err(|e| invalid(e.to_string()))
    }

    fn read_key(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(name);
        if !path.exists() {
            return Err(StoreError::Missing {
                dir: self.display(),
                file: name.into(),
            });
        }
        Ok(fsutil::read_key_file(&path)?)
    }

    fn read_text(&self, name: &str) -> Result<String, StoreError> {
        let path = self.path(name);
        fs::read_to_string(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => StoreError::Missing {
                dir: self.display(),
                file: name.into(),
            },
            _ => StoreError::Io {
                path: path.display().to_string(),
                source,
            },
        })
    }

    /// Loads the CA, refusing key files that group or others can read.
    pub fn open(&self) -> Result<LoadedCa, StoreError> {
        let td = self.trust_domain()?;
        for name in KEY_FILES {
            let path = self.path(name);
            if path.exists() {
                fsutil::check_key_mode(&path)?;
            }
        }
        let authority = self.load_authority(td)?;
        let tokens = TokenKey::from_secret(&self.read_key(TOKEN_KEY)?);
        self.read_bundle()?;
        Ok(LoadedCa {
            authority,
            tokens,
            dir: self.clone(),
        })
    }

    /// Loads the signing intermediate (after the key-mode check).
    pub fn load_authority(&self, td: TrustDomain) -> Result<Authority, StoreError> {
        let intermediate_pem = self.read_text(INTERMEDIATE_CERT)?;
        let key_pem = String::from_utf8(self.read_key(INTERMEDIATE_KEY)?).map_err(|_| {
            StoreError::Invalid {
                path: self.path(INTERMEDIATE_KEY).display().to_string(),
                reason: "not a PEM file".into(),
            }
        })?;
        let authority =
            Authority::load(td, &intermediate_pem, &key_pem).map_err(|e| StoreError::Invalid {
                path: self.display(),
                reason: e.to_string(),
            })?;
        Ok(authority)
    }

    /// Modification time of the signing intermediate, to notice a rotation.
    pub fn intermediate_mtime(&self) -> Option<std::time::SystemTime> {
        fs::metadata(self.path(INTERMEDIATE_CERT))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Reads and parses `bundle.pem`.
    pub fn read_bundle(&self) -> Result<TrustBundle, StoreError> {
        let pem = self.read_text(BUNDLE)?;
        TrustBundle::from_pem(pem.as_bytes()).map_err(|e| StoreError::Invalid {
            path: self.bundle_path().display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Opens the ledger of spent single-use tokens.
    pub fn ledger(&self) -> Result<NonceLedger, StoreError> {
        Ok(NonceLedger::open(&self.path(LEDGER))?)
    }

    /// The files `meshgate ca serve` needs, as `(file name, contents)`, for copying the CA into
    /// another place such as a Kubernetes Secret: the trust domain, the signing intermediate and
    /// its key, the token secret, the bundle and the root certificate. Not the root key: serving
    /// and rotating never use it, so it stays where the CA was created. Key files are checked as
    /// [`CaDir::open`] checks them (a CA others can read is refused here too). The ledger of spent
    /// tokens is not included: it belongs to the running CA.
    pub fn serving_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>, StoreError> {
        self.open()?;
        let mut out = Vec::new();
        for name in [CONFIG, ROOT_CERT, INTERMEDIATE_CERT, BUNDLE] {
            out.push((name, self.read_text(name)?.into_bytes()));
        }
        for name in [INTERMEDIATE_KEY, TOKEN_KEY] {
            out.push((name, self.read_key(name)?));
        }
        Ok(out)
    }

    /// Reads only the token secret (minting needs nothing else).
    pub fn token_key(&self) -> Result<TokenKey, StoreError> {
        self.trust_domain()?;
        Ok(TokenKey::from_secret(&self.read_key(TOKEN_KEY)?))
    }
}
